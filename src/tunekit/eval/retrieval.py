"""A small text index for retrieval: BM25-style sparse vectors in Qdrant's embedded local mode.

    index = TextIndex.build(texts, payloads)          # in memory, or path=DIR to keep it on disk
    hits = index.search("question text", k=3)        # [(payload, score), ...], best first

Used by the evaluation's `rag:K` baseline (the K training examples most similar to each evaluated prompt)
and by examples/rag/ (passages of a knowledge base). Needs `qdrant-client` (`TUNEKIT_EXTRAS=rag bash scripts/setup.sh`).

Why sparse BM25 vectors: they are computed from the text alone, offline, with no embedding model to
download (a dense embedder would need weights this machine cannot fetch, and the tiny chat model's
hidden states are not trained to embed). Each document vector holds BM25's term-frequency part,
tf * (k1 + 1) / (tf + k1 * (1 - b + b * len / avg_len)), under a stable hash of each lower-cased word; the
query vector is 1 per distinct query word. The collection is created with Qdrant's IDF modifier, so Qdrant
weighs each term by its inverse document frequency over the indexed documents at query time: the
score is BM25's, and adding documents never makes stored vectors stale. Qdrant's local mode (`QdrantClient
(":memory:")` or `QdrantClient(path=...)`) runs in this process: no server, no network.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Any

from tunekit.errors import ConfigError, Problem, install_command

VECTOR = "bm25"  # the name of the sparse vector in the collection
K1 = 1.2  # BM25 term-frequency saturation
B = 0.75  # BM25 length normalisation
_WORD = re.compile(r"\w+", re.UNICODE)
# Scores this close (relative) are equal: BM25 gives equal scores to documents of the same shape (the same
# words but a name), and floating-point noise that differs between machines would otherwise order them.
TIE = 1e-4


def words(text: str) -> list[str]:
    """Lower-cased words (runs of letters, digits and underscores)."""
    return _WORD.findall(text.lower())


def term_id(word: str) -> int:
    """A stable 31-bit id of a word (CRC-32): the same in every process, no vocabulary to store."""
    return zlib.crc32(word.encode("utf-8")) & 0x7FFFFFFF


def document_vector(text: str, avg_len: float) -> tuple[list[int], list[float]]:
    """(indices, values): BM25's term-frequency weight of each word of a document (IDF comes from Qdrant)."""
    counts = Counter(term_id(w) for w in words(text))
    length = sum(counts.values())
    norm = K1 * (1 - B + B * length / max(avg_len, 1e-9))
    indices = sorted(counts)
    return indices, [counts[i] * (K1 + 1) / (counts[i] + norm) for i in indices]


def query_vector(text: str) -> tuple[list[int], list[float]]:
    """(indices, values): 1 for each distinct word of the query."""
    indices = sorted({term_id(w) for w in words(text)})
    return indices, [1.0] * len(indices)


def tied(a: float, b: float) -> bool:
    return abs(a - b) <= TIE * max(1.0, abs(a), abs(b))


def rank(points: list) -> list:
    """Points (with .score and .id) best first, each run of tied scores in id order."""
    by_score = sorted(points, key=lambda p: -p.score)
    out: list = []
    while by_score:
        group = list(takewhile(lambda p, top=by_score[0].score: tied(top, p.score), by_score))  # a prefix
        out += sorted(group, key=lambda p: p.id)
        by_score = by_score[len(group):]
    return out


def _qdrant():
    try:
        from qdrant_client import QdrantClient, models
    except ImportError:
        raise ConfigError(Problem("qdrant-client", "is not installed (retrieval needs it)",
                                  install_command("rag"))) from None
    return QdrantClient, models


@dataclass
class TextIndex:
    """A Qdrant collection of documents with BM25 sparse vectors; payloads come back with each hit."""

    client: Any  # qdrant_client.QdrantClient (local mode)
    collection: str
    size: int

    @classmethod
    def build(cls, texts: list[str], payloads: list[dict] | None = None, *, path: str | Path | None = None,
              collection: str = "documents", batch: int = 512) -> TextIndex:
        """Index `texts` (payload i goes with text i) in memory, or under `path` (created; a collection
        of the same name there is replaced)."""
        QdrantClient, models = _qdrant()
        payloads = payloads if payloads is not None else [{} for _ in texts]
        if len(payloads) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(payloads)} payloads")
        client = QdrantClient(":memory:") if path is None else QdrantClient(path=str(path))
        if client.collection_exists(collection):
            client.delete_collection(collection)
        client.create_collection(collection, vectors_config={}, sparse_vectors_config={
            VECTOR: models.SparseVectorParams(modifier=models.Modifier.IDF)})
        avg_len = sum(len(words(t)) for t in texts) / max(len(texts), 1)
        for start in range(0, len(texts), batch):
            points = []
            for i in range(start, min(start + batch, len(texts))):
                indices, values = document_vector(texts[i], avg_len)
                points.append(models.PointStruct(id=i, payload=payloads[i], vector={
                    VECTOR: models.SparseVector(indices=indices, values=values)}))
            client.upsert(collection, points=points)
        return cls(client, collection, len(texts))

    @classmethod
    def open(cls, path: str | Path, collection: str = "documents") -> TextIndex:
        """An index that `build(..., path=path)` wrote earlier."""
        QdrantClient, _ = _qdrant()
        client = QdrantClient(path=str(path))
        if not client.collection_exists(collection):
            raise ConfigError(Problem(str(path), f"holds no collection '{collection}'",
                                      "build the index first"))
        return cls(client, collection, client.count(collection).count)

    def search(self, query: str, k: int) -> list[tuple[dict, float]]:
        """The k documents with the highest BM25 score for `query`: (payload, score), best first.

        Documents sharing no word with the query score nothing and are not returned. The ranking is the same
        on every machine: scores within `TIE` (relative) of each other are a tie, whatever floating-point
        noise puts one above the other, and a tie goes to the lower document id (the order of indexing). So
        that a tie straddling the k-th place is seen whole, more than k are fetched until the last one
        fetched scores below the k-th.
        """
        _, models = _qdrant()
        indices, values = query_vector(query)
        if not indices or k < 1:
            return []
        vector = models.SparseVector(indices=indices, values=values)
        limit = 2 * k + 8
        while True:
            points = self.client.query_points(self.collection, query=vector, using=VECTOR, limit=limit,
                                              with_payload=True).points
            ranked = rank(points)
            if len(points) < limit or len(ranked) <= k or not tied(ranked[k - 1].score, ranked[-1].score):
                return [(point.payload or {}, float(point.score)) for point in ranked[:k]]
            limit *= 4  # the k-th place's tie may go on past what was fetched

    def close(self) -> None:
        self.client.close()
