"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., 2025, "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces"); the math is fusion_bench.merging.isotropic."""

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.merging.isotropic import iso_c_merge, iso_cts_merge
from fusion_bench.merging.per_tensor import check_exclude_keys, merge_per_tensor
from fusion_bench.method.base import BaseAlgorithm, check_scaling_factor, merge_inputs, output_model
from fusion_bench.method.task_singular_vector import matrix_keys, mean_outside
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.utils.errors import InputError


def _isotropic_merge(modelpool, method: str, merge_matrix: Callable[[Tensor], Tensor], scaling_factor: float, exclude_keys: Sequence[str]) -> nn.Module:
    """θ₀ + λ·Δ, Δ = merge_matrix(τ stack) per 2-D weight not excluded, the mean of the τ_t elsewhere."""
    pool = as_modelpool(modelpool)
    inputs = merge_inputs(pool, method=method, need_pretrained=True)
    matrices = matrix_keys(inputs, exclude_keys, method)
    merged = output_model(pool, PRETRAINED, inputs.keys)
    merge_per_tensor(
        inputs.pretrained, inputs.finetuned, merged.state_dict(), inputs.keys, mean_outside(matrices, merge_matrix), scaling_factor=scaling_factor, desc=method
    )
    return merged


class IsotropicMergingInCommonSubspace(BaseAlgorithm):
    """Iso-C: per 2-D weight, Σ_t τ_t = UΣVᵀ with a flat spectrum, Δ = σ̄·UVᵀ; every other tensor
    (and exclude_keys) is the mean of the task vectors; θ = θ₀ + scaling_factor·Δ."""

    def __init__(self, scaling_factor: float = 1.0, exclude_keys: Sequence[str] | None = None):
        self.scaling_factor = check_scaling_factor(scaling_factor)
        self.exclude_keys = check_exclude_keys(exclude_keys)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        return _isotropic_merge(modelpool, "Iso-C", iso_c_merge, self.scaling_factor, self.exclude_keys)


class IsotropicMergingInCommonAndTaskSubspace(BaseAlgorithm):
    """Iso-CTS: per 2-D weight, the top common_space_fraction of the directions of Σ_t τ_t plus
    each task's own top directions outside them, orthogonalised, with a flat spectrum; every other
    tensor (and exclude_keys) is the mean of the task vectors; θ = θ₀ + scaling_factor·Δ."""

    def __init__(self, scaling_factor: float = 1.0, common_space_fraction: float = 0.8, exclude_keys: Sequence[str] | None = None):
        self.scaling_factor = check_scaling_factor(scaling_factor)
        fraction = common_space_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
            raise InputError(f"common_space_fraction={fraction!r} must be a number in (0, 1], e.g. common_space_fraction=0.8")
        self.common_space_fraction = float(fraction)
        self.exclude_keys = check_exclude_keys(exclude_keys)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        fraction = self.common_space_fraction
        return _isotropic_merge(modelpool, "Iso-CTS", lambda task_vectors: iso_cts_merge(task_vectors, fraction), self.scaling_factor, self.exclude_keys)


ISO_C_Merge = IsotropicMergingInCommonSubspace  # FusionBench's names
ISO_CTS_Merge = IsotropicMergingInCommonAndTaskSubspace
