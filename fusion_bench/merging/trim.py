"""TIES step 1, trim: keep the largest-magnitude entries of each task vector, zero the rest."""

import torch
from torch import Tensor

from fusion_bench.utils.errors import InputError


def keep_fraction(threshold: float) -> float:
    """The fraction of entries to keep: `threshold` > 1 is a percentage, otherwise a fraction."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise InputError(f"threshold={threshold!r} must be a number, e.g. threshold=20 keeps the top 20%")
    if not 0 < threshold <= 100:
        raise InputError(
            f"threshold={threshold} is out of range; use a percentage in (1, 100] "
            "or a fraction in (0, 1], e.g. threshold=20 keeps the top 20%"
        )
    return threshold / 100 if threshold > 1 else threshold


def keep_count(numel: int, threshold: float) -> int:
    """How many of `numel` entries the trim keeps (more where magnitudes tie at the cut).

    ⌊numel·f⌋ + 1, as in the reference: it cuts at the (numel − ⌊numel·f⌋)-th smallest |τ| and
    keeps everything at or above it. Capped at numel, so 100% keeps all (the reference fails there).
    """
    return min(numel, int(numel * keep_fraction(threshold)) + 1)


def trim(task_vectors: Tensor, cuts: Tensor) -> Tensor:
    """Zero the entries of row i with |τ| < cuts[i]; entries equal to the cut are kept.

    hardshrink keeps |x| > λ; with λ the float32 just below the cut that is |x| ≥ cut, in one op
    (several times faster on CPU than a boolean mask and a select).
    """
    below = torch.nextafter(cuts.float(), torch.tensor(-float("inf")))
    trimmed = torch.empty_like(task_vectors)
    for row, lam, out in zip(task_vectors, below.tolist(), trimmed):
        torch.hardshrink(row, lam, out=out)
    return trimmed
