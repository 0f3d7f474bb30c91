"""Simple average, streamed: θ = (1/n)·Σ_t θ_t."""

from collections.abc import Mapping, Sequence

from fusion_bench.merging.streaming import StateDict, merge_elementwise


def simple_average_merge(models: Mapping[str, StateDict], out: StateDict, keys: Sequence[str]) -> None:
    """Write the mean of the models' tensors into out[key] for every key, chunk by chunk."""
    merge_elementwise(models, out, keys, lambda stack: stack.sum(dim=0) / len(models), task_vectors=False, desc="simple average")
