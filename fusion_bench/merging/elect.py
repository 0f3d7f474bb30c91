"""TIES step 2, elect: one sign per parameter, the sign of the larger total mass."""

import torch
from torch import Tensor


def elect_sign(trimmed: Tensor) -> Tensor:
    """γ = sign(Σ_t τ̂_t) over dim 0; 0 where the sum is exactly zero (see resolve_zero_signs)."""
    return torch.sign(trimmed.sum(dim=0))


def majority_sign(sign_total: int) -> int:
    """The sign of Σγ over every parameter: the reference's fill-in for exactly-zero sums."""
    return (sign_total > 0) - (sign_total < 0)


def resolve_zero_signs(sign: Tensor, majority: int) -> Tensor:
    """Replace the zeros of γ by the majority sign (which is itself 0 only if Σγ is 0)."""
    return torch.where(sign == 0, float(majority), sign)
