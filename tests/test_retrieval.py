"""tunekit.eval.retrieval: BM25 sparse vectors in Qdrant's local mode (no server, no network)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("qdrant_client", reason="retrieval needs the rag extra: TUNEKIT_EXTRAS=rag bash scripts/setup.sh")

from tunekit.eval.retrieval import K1, B, TextIndex, document_vector, query_vector, term_id, words  # noqa: E402

DOCS = ["the red fox jumps over the lazy dog",
        "a lazy cat sleeps all day",
        "the dog barks at the red car",
        "fresh bread with salt and butter"]


def bm25(query: str, docs: list[str]) -> list[float]:
    """Okapi BM25 by hand (Lucene's IDF, as Qdrant's IDF modifier computes it)."""
    tokenized = [words(d) for d in docs]
    avg = sum(map(len, tokenized)) / len(docs)
    scores = []
    for doc in tokenized:
        score = 0.0
        for term in set(words(query)):
            n = sum(term in d for d in tokenized)
            if not n:
                continue
            idf = math.log((len(docs) - n + 0.5) / (n + 0.5) + 1)
            tf = doc.count(term)
            score += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * len(doc) / avg))
        scores.append(score)
    return scores


def test_scores_are_bm25_with_qdrant_idf():
    index = TextIndex.build(DOCS, [{"doc": i} for i in range(len(DOCS))])
    for query in ["lazy dog", "red fox", "salt", "the dog and the cat"]:
        expected = bm25(query, DOCS)
        hits = index.search(query, k=len(DOCS))
        got = {payload["doc"]: score for payload, score in hits}
        assert set(got) == {i for i, s in enumerate(expected) if s > 0}, query  # no shared word: no hit
        for i, score in got.items():
            assert score == pytest.approx(expected[i], rel=1e-4), (query, i)
        assert [p["doc"] for p, _ in hits] == sorted(got, key=lambda i: -expected[i])
    assert index.search("zebra", k=3) == [] and index.search("", k=3) == []


def test_vectors_are_stable_and_length_normalised():
    import zlib

    assert term_id("fox") == zlib.crc32(b"fox") & 0x7FFFFFFF  # the same id in every process
    short_i, short_v = document_vector("fox", avg_len=4)
    long_i, long_v = document_vector("fox one two three four five six seven", avg_len=4)
    assert short_i[0] in long_i
    assert short_v[0] > long_v[long_i.index(short_i[0])]  # the same term counts less in a longer document
    indices, values = query_vector("fox fox dog")
    assert len(indices) == 2 and values == [1.0, 1.0]


def test_index_on_disk_opens_again(tmp_path):
    index = TextIndex.build(DOCS, [{"doc": i} for i in range(len(DOCS))], path=tmp_path / "qdrant")
    before = index.search("red dog", k=2)
    index.close()
    again = TextIndex.open(tmp_path / "qdrant")
    assert again.size == len(DOCS)
    assert again.search("red dog", k=2) == before
    again.close()


def test_equal_scores_rank_by_document_id_whatever_the_noise():
    """Documents of the same shape score alike; the k-th place's tie is resolved by id, on any machine."""
    from types import SimpleNamespace

    from tunekit.eval.retrieval import rank, tied

    noisy = [SimpleNamespace(id=i, score=s) for i, s in [(7, 2.0000001), (3, 1.9999999), (5, 2.0), (1, 0.5)]]
    assert [p.id for p in rank(noisy)] == [3, 5, 7, 1]
    assert tied(2.0, 2.0001) and not tied(2.0, 2.001)

    # 30 passages that differ only by a made-up name: every question matching them all ties them all
    docs = [f"The {name} kettle is made by Acme. It costs 10 euros." for name in
            [f"Brand{i:02d}" for i in range(30)]]
    index = TextIndex.build(docs, [{"i": i} for i in range(len(docs))])
    for k in (1, 3, 10):
        hits = index.search("Which company makes the kettle?", k)
        assert [payload["i"] for payload, _ in hits] == list(range(k))  # the tie reaches past 2k+8 fetched
    # a word of one passage lifts it above the tie; the rest of the top 3 are the lowest ids
    assert [p["i"] for p, _ in index.search("Which company makes the Brand17 kettle?", 3)] == [17, 0, 1]
    index.close()
