"""Weighted average, streamed: θ = Σ_t w_t·θ_t."""

from collections.abc import Mapping, Sequence

import torch

from fusion_bench.merging.streaming import FlatOutput, StateDict, aligned_chunks, progress


def weighted_average_merge(models: Mapping[str, StateDict], out: StateDict, keys: Sequence[str], *, weights: Sequence[float]) -> None:
    """Write Σ_t w_t·θ_t into out[key] for every key, chunk by chunk; weights[t] is the t-th model's
    (used as given: normalising them is the caller's choice)."""
    column = torch.tensor(weights, dtype=torch.float32).view(-1, 1)
    for key in progress(keys, "weighted average"):
        output = FlatOutput(out[key])
        for positions, stack in aligned_chunks(models, key, task_vectors=False, check_finite=True):
            output[positions] = stack.mul_(column).sum(dim=0)
        output.finish()
