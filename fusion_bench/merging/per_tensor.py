"""Merge methods that need each tensor whole (SVD-based TSV-M, Iso-C/CTS, WUDI): one key at a time.

For each key, every task's task vector of that key is stacked ([tasks, *shape], float32) and
handed to the method's function, which returns the merged task vector; θ₀ + that is written out.
Memory: the output model + (tasks + 2) × the largest tensor, never all models at once.
"""

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.merging.streaming import StateDict, progress
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.key_checks import check_string_list

# (key, θ₀, task vectors [tasks, *shape]) → the merged task vector, of θ₀'s shape
TensorMerge = Callable[[str, Tensor, Tensor], Tensor]


def task_vectors_of(pretrained: StateDict, finetuned: Mapping[str, StateDict], key: str) -> tuple[Tensor, Tensor]:
    """(θ₀, [τ_t]) of one key, float32; InputError, naming the model, on NaN or Inf."""
    theta0 = pretrained[key].float()
    stack = torch.empty((len(finetuned), *theta0.shape))
    for row, state_dict in enumerate(finetuned.values()):
        torch.sub(state_dict[key].float(), theta0, out=stack[row])
    # a float32 sum is NaN or inf whenever an element is, at a twentieth of isfinite's cost; only
    # then look closer (a sum of large finite values may overflow)
    if not torch.isfinite(stack.sum()):
        for name, state_dict in {"_pretrained_": pretrained, **finetuned}.items():
            if not torch.isfinite(state_dict[key]).all():
                raise InputError(f"model {name!r} has NaN or Inf values in {key!r}; fix or drop that checkpoint")
    return theta0, stack


def merge_per_tensor(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    out: StateDict,
    keys: Sequence[str],
    merge: TensorMerge,
    *,
    scaling_factor: float = 1.0,
    desc: str,
) -> None:
    """Write θ₀ + scaling_factor·merge(key, θ₀, τ) into out[key] for every key."""
    for key in progress(keys, desc):
        theta0, task_vectors = task_vectors_of(pretrained, finetuned, key)
        merged = merge(key, theta0, task_vectors)
        out[key].copy_(theta0 + scaling_factor * merged)


def is_merged_as_matrix(key: str, shape: Sequence[int], exclude_keys: Sequence[str]) -> bool:
    """Whether the SVD methods treat `key` as a matrix: 2-D and not excluded (the rest is averaged),
    as FusionBench does (embeddings included)."""
    return len(shape) == 2 and key not in exclude_keys


def check_exclude_keys(exclude_keys: Sequence[str] | None) -> list[str]:
    return check_string_list(exclude_keys, "exclude_keys", "keys", "[vision_model.embeddings.position_embedding.weight]")
