"""Weighted average, streamed: θ = Σ_t w_t·θ_t."""

from collections.abc import Mapping, Sequence

import torch

from fusion_bench.merging.streaming import StateDict, merge_elementwise


def weighted_average_merge(models: Mapping[str, StateDict], out: StateDict, keys: Sequence[str], *, weights: Sequence[float]) -> None:
    """Write Σ_t w_t·θ_t into out[key] for every key, chunk by chunk; weights[t] is the t-th model's
    (used as given: normalising them is the caller's choice)."""
    column = torch.tensor(weights, dtype=torch.float32).view(-1, 1)
    merge_elementwise(models, out, keys, lambda stack: stack.mul_(column).sum(dim=0), task_vectors=False, desc="weighted average")
