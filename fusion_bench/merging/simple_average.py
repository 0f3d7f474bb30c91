"""Simple average, streamed: θ = (1/n)·Σ_t θ_t."""

from collections.abc import Mapping, Sequence

from fusion_bench.merging.streaming import FlatOutput, StateDict, aligned_chunks, progress


def simple_average_merge(models: Mapping[str, StateDict], out: StateDict, keys: Sequence[str]) -> None:
    """Write the mean of the models' tensors into out[key] for every key, chunk by chunk."""
    for key in progress(keys, "simple average"):
        output = FlatOutput(out[key])
        for positions, stack in aligned_chunks(models, key, task_vectors=False, check_finite=True):
            output[positions] = stack.sum(dim=0) / len(models)
        output.finish()
