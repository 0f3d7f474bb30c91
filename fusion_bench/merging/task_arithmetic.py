"""Task arithmetic, streamed: θ = θ₀ + λ·Σ_t (θ_t − θ₀)."""

from collections.abc import Mapping, Sequence

from fusion_bench.merging.streaming import RowTransformsPerKey, StateDict, merge_elementwise


def task_arithmetic_merge(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    out: StateDict,
    keys: Sequence[str],
    *,
    scaling_factor: float,
    task_vector_transforms: RowTransformsPerKey | None = None,
) -> None:
    """Write θ₀ + λ·Σ_t τ_t into out[key] for every key, chunk by chunk; task_vector_transforms
    change the τ_t in the stream first (merge_elementwise's `row_transforms`: DARE's drops)."""
    models = {"_pretrained_": pretrained, **finetuned}
    merge_elementwise(
        models,
        out,
        keys,
        lambda stack: stack[0] + scaling_factor * stack[1:].sum(dim=0),
        task_vectors=True,
        desc="task arithmetic",
        row_transforms=task_vector_transforms,
    )
