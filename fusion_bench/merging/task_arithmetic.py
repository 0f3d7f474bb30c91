"""Task arithmetic, streamed: θ = θ₀ + λ·Σ_t (θ_t − θ₀)."""

from collections.abc import Mapping, Sequence

from fusion_bench.merging.streaming import FlatOutput, StateDict, aligned_chunks, progress


def task_arithmetic_merge(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    out: StateDict,
    keys: Sequence[str],
    *,
    scaling_factor: float,
) -> None:
    """Write θ₀ + λ·Σ_t τ_t into out[key] for every key, chunk by chunk."""
    models = {"_pretrained_": pretrained, **finetuned}
    for key in progress(keys, "task arithmetic"):
        output = FlatOutput(out[key])
        for positions, stack in aligned_chunks(models, key, task_vectors=True, check_finite=True):
            output[positions] = stack[0] + scaling_factor * stack[1:].sum(dim=0)
        output.finish()
