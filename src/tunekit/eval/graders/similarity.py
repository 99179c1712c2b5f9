"""text_similarity metrics, computed by the libraries of the `graders` extra (rapidfuzz, nltk, rouge-score).

- fuzzy_match: rapidfuzz `fuzz.WRatio(input, reference, processor=utils.default_process) / 100`.
- bleu: nltk `sentence_bleu([reference], input)` (4-grams, equal weights) with
  `SmoothingFunction().method1` (a count of 0 n-grams becomes epsilon=0.1), so a short answer without a
  matching 4-gram does not score exactly 0.
- gleu: nltk `sentence_gleu([reference], input)` (1- to 4-grams; GLEU needs no smoothing).
- rouge_1 .. rouge_5, rouge_l: rouge-score's F-measure of rouge1..rouge5 / rougeL, no stemming. Tokens are
  rouge-score's own rule (lower-case, runs of letters and digits) widened to every alphabet: for ASCII text
  they are exactly rouge-score's default tokens; rouge-score's default drops every non-ASCII letter.
- meteor: nltk `meteor_score`, only where NLTK's WordNet corpus is installed (it cannot be downloaded by
  tunekit); otherwise check_grader refuses it.
- cosine: not available (it needs an embedding model; OpenAI uses text-embedding-3-large): check_grader
  refuses it.

bleu, gleu and meteor tokens: nltk's NLTKWordTokenizer (the word tokenizer of nltk.word_tokenize, which needs
no downloaded data) applied to the whole text; case is kept. An empty input or reference scores 0 with every
metric (what rapidfuzz and rouge-score give; nltk's BLEU/GLEU are defined so as well).
"""

from __future__ import annotations

import re

METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "cosine",
           "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
ROUGE_TYPES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_3": "rouge3", "rouge_4": "rouge4",
               "rouge_5": "rouge5", "rouge_l": "rougeL"}
LIBRARY = {"fuzzy_match": "rapidfuzz", "bleu": "nltk", "gleu": "nltk", "meteor": "nltk", **{
    k: "rouge_score" for k in ROUGE_TYPES}}
WORDNET_HINT = "python -m nltk.downloader wordnet omw-1.4"


def library_missing(metric: str) -> str | None:
    """The module a metric needs when it is not installed, else None."""
    import importlib.util

    module = LIBRARY.get(metric)
    if module and importlib.util.find_spec(module) is None:
        return module
    return None


def wordnet_available() -> bool:
    """True when NLTK finds its WordNet corpus (needed by meteor) in one of its data folders."""
    try:
        import nltk
    except ImportError:
        return False
    for name in ("corpora/wordnet", "corpora/wordnet.zip"):
        try:
            nltk.data.find(name)
            return True
        except LookupError:
            continue
    return False


class UnicodeRougeTokenizer:
    """rouge-score's default tokenization (lower-case, split on anything but letters and digits), keeping
    letters of every alphabet instead of only a-z."""

    WORD = re.compile(r"[^\W_]+")

    def tokenize(self, text: str) -> list[str]:
        return self.WORD.findall(text.lower())


def _words(text: str) -> list[str]:
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer().tokenize(text)


def similarity(metric: str, text: str, reference: str) -> float:
    """The score in [0, 1] of `text` against `reference`. Raises ValueError for a metric not available here."""
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz, utils

        return fuzz.WRatio(text, reference, processor=utils.default_process) / 100.0
    if metric in ROUGE_TYPES:
        from rouge_score import rouge_scorer

        kind = ROUGE_TYPES[metric]
        scorer = rouge_scorer.RougeScorer([kind], use_stemmer=False, tokenizer=UnicodeRougeTokenizer())
        return float(scorer.score(reference, text)[kind].fmeasure)
    if metric in ("bleu", "gleu", "meteor"):
        hyp, ref = _words(text), _words(reference)
        if not hyp or not ref:
            return 0.0
        if metric == "bleu":
            from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

            return float(sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method1))
        if metric == "gleu":
            from nltk.translate.gleu_score import sentence_gleu

            return float(sentence_gleu([ref], hyp))
        if not wordnet_available():
            raise ValueError(f"meteor is not available: needs NLTK's WordNet corpus ({WORDNET_HINT})")
        from nltk.translate.meteor_score import meteor_score

        return float(meteor_score([ref], hyp))
    if metric == "cosine":
        raise ValueError("cosine is not available: it needs an embedding model, and tunekit serves none")
    raise ValueError(f"unknown evaluation_metric {metric!r}")
