"""The RAG example's two scores, for `tunekit eval --scorer examples/rag/scorer.py:score`.

- answerable questions (the reference is a fact): `answer_exact`, the reply equals the fact;
  `answer_idk`, the reply is "I don't know" (a refusal where the passages did hold the answer);
- unanswerable ones (the reference is "I don't know"): `unanswerable_idk`, the reply is "I don't know";
  1 - unanswerable_idk is the hallucination rate.

Each key applies to its kind of question only, so the report's mean of each is over that kind.
"""

from __future__ import annotations

IDK = "I don't know"


def _norm(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .!")


def score(prediction: str, reference: str, example: dict) -> dict[str, float]:
    said_idk = float(_norm(prediction) == _norm(IDK))
    if _norm(reference) == _norm(IDK):
        return {"unanswerable_idk": said_idk}
    return {"answer_exact": float(_norm(prediction) == _norm(reference)), "answer_idk": said_idk}
