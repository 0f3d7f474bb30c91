"""Scores of generated answers against expected ones, with the answers that make no sense counted.

FusionBench scores GLUE for Flan-T5 by exact match of the decoded answer, and STS-B by Spearman's ρ
of the numbers parsed from the answers, where an answer that is no number counts as 0.0. Both are
kept, so the numbers are comparable; what FusionBench leaves silent is reported: `unparseable`, how
many answers are no label word of the task (or, for STS-B, no number).
"""

import math
from collections.abc import Sequence


def exact_match(predictions: Sequence[str], targets: Sequence[str], label_words: Sequence[str]) -> dict[str, float]:
    """accuracy: the share of predictions equal to their target; unparseable: how many predictions
    are none of the label words."""
    correct = sum(prediction == target for prediction, target in zip(predictions, targets, strict=True))
    return {
        "accuracy": correct / len(targets),
        "unparseable": sum(prediction not in label_words for prediction in predictions),
    }


def parse_score(text: str) -> float | None:
    """The number an answer states, or None (non-finite numbers included)."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def spearman_of_scores(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """spearman_rho between the parsed predictions and targets, unparseable predictions taken as
    0.0 as FusionBench does; unparseable: how many there were. ρ is NaN if either side is constant."""
    from scipy.stats import spearmanr  # a second to import; only STS-B needs it
    parsed = [parse_score(prediction) for prediction in predictions]
    expected = [parse_score(target) for target in targets]
    if None in expected:
        raise ValueError(f"a target is not a number: {targets[expected.index(None)]!r}")
    scores = [0.0 if value is None else value for value in parsed]
    constant = len(set(scores)) < 2 or len(set(expected)) < 2
    return {
        "spearman_rho": math.nan if constant else float(spearmanr(scores, expected).statistic),
        "unparseable": sum(value is None for value in parsed),
    }
