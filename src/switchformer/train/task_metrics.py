"""Task metrics of fine-tuning (paper §4.1, Table 5's metrics), all on a 0-100 scale, higher is better.

- ``exact_match`` / ``accuracy``: the share of predictions equal to their reference (surrounding whitespace
  ignored); T5's ``sequence_accuracy`` and, for class labels, its ``accuracy``.
- ``subtoken_f1``: identifiers split into lower-case sub-tokens (``getHTTPResponse_code`` -> get, http, response,
  code), the F1 of the sub-token multisets, averaged over examples: partial credit for a nearly right name (the
  usual metric of code-name prediction).
- ``rouge1`` / ``rouge2`` / ``rougeL`` / ``rougeLsum``: Google's ``rouge-score`` package (the scorer T5 uses, with
  Porter stemming), the mean F-measure over examples.
- ``bleu``: ``sacrebleu``'s corpus BLEU (13a tokenisation, exponential smoothing: its defaults).

``rouge-score`` and ``sacrebleu`` come with ``pip install 'switchformer[finetune]'``; ``require`` checks for them
before a run starts, so a missing package is reported at once, not after training.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

FINETUNE_EXTRA = "pip install 'switchformer[finetune]'"

METRICS = ("exact_match", "accuracy", "subtoken_f1", "rouge1", "rouge2", "rougeL", "rougeLsum", "bleu")
"""Every metric name ``compute`` knows."""

_ROUGE = "rouge_score.rouge_scorer"
_PACKAGES = {"rouge1": _ROUGE, "rouge2": _ROUGE, "rougeL": _ROUGE, "rougeLsum": _ROUGE, "bleu": "sacrebleu"}
_PIP_NAMES = {_ROUGE: "rouge-score", "sacrebleu": "sacrebleu"}


def _import(module: str, metric: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ModuleNotFoundError(f"the {metric} metric needs the {_PIP_NAMES[module]} package, which is not "
                                  f"installed: {FINETUNE_EXTRA}") from None


def require(metrics: Sequence[str]) -> None:
    """Check that every metric is known and its package importable.

    Raises:
        ValueError: an unknown metric name (the message lists the known ones).
        ModuleNotFoundError: a package is missing (the message names it and the extra that installs it).
    """
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown metric {m!r}; choose one of {list(METRICS)}")
        if m in _PACKAGES:
            _import(_PACKAGES[m], m)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise ValueError("no predictions to score")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Percentage of predictions equal to their reference, surrounding whitespace ignored."""
    _check_pairs(predictions, references)
    hits = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True))
    return 100.0 * hits / len(predictions)


_SUBTOKEN_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z]|\d|\b|_)|[A-Z]?[a-z]+|[A-Z]+|\d+")


def subtokens(identifier: str) -> list[str]:
    """Lower-case sub-tokens of an identifier: split at underscores, digits and case changes
    (``parseHTTPHeader_v2`` -> ``['parse', 'http', 'header', 'v', '2']``)."""
    return [t.lower() for t in _SUBTOKEN_RE.findall(identifier)]


def subtoken_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean over examples of the F1 between the sub-token multisets of prediction and reference (x 100); a pair
    that both have no sub-token scores 100."""
    _check_pairs(predictions, references)
    total = 0.0
    for p, r in zip(predictions, references, strict=True):
        ps, rs = Counter(subtokens(p)), Counter(subtokens(r))
        if not ps and not rs:
            total += 1.0
            continue
        common = sum((ps & rs).values())
        if common:
            precision, recall = common / sum(ps.values()), common / sum(rs.values())
            total += 2 * precision * recall / (precision + recall)
    return 100.0 * total / len(predictions)


def rouge(predictions: Sequence[str], references: Sequence[str], types: Sequence[str] = ("rougeL",)) -> dict:
    """Mean ROUGE F-measures (x 100) by ``rouge-score`` with Porter stemming, one entry per type."""
    _check_pairs(predictions, references)
    rouge_scorer = _import(_ROUGE, types[0])
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=True)
    sums = dict.fromkeys(types, 0.0)
    for p, r in zip(predictions, references, strict=True):
        scores = scorer.score(r, p)  # score(target, prediction)
        for t in types:
            sums[t] += scores[t].fmeasure
    return {t: 100.0 * s / len(predictions) for t, s in sums.items()}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU of the predictions against one reference each."""
    _check_pairs(predictions, references)
    sacrebleu = _import("sacrebleu", "bleu")
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def compute(metrics: Sequence[str], predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Every metric in ``metrics`` (names from ``METRICS``) of the prediction/reference pairs."""
    require(metrics)
    out: dict[str, float] = {}
    rouge_types = [m for m in metrics if m.startswith("rouge")]
    if rouge_types:
        out.update(rouge(predictions, references, rouge_types))
    for m in metrics:
        if m in ("exact_match", "accuracy"):
            out[m] = exact_match(predictions, references)
        elif m == "subtoken_f1":
            out[m] = subtoken_f1(predictions, references)
        elif m == "bleu":
            out[m] = bleu(predictions, references)
    return {m: out[m] for m in metrics}
