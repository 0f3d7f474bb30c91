"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024); the math is fusion_bench.merging.breadcrumbs.

Each task vector is masked tensor by tensor and handed to task arithmetic as a TaskVectorView over a
zero θ₀; θ₀ is added at the end (see merging.task_vector_views).
"""

from collections.abc import Mapping

import torch
from torch import nn

from fusion_bench.merging.breadcrumbs import breadcrumbs_sparsify, check_density_and_gamma
from fusion_bench.merging.task_arithmetic import task_arithmetic_merge
from fusion_bench.merging.task_vector_views import TaskVectorView, ZerosView, add_pretrained
from fusion_bench.method.base import BaseAlgorithm, check_scaling_factor, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool


class ModelBreadcrumbs(BaseAlgorithm):
    """θ = θ₀ + λ·Σ_t m_t ⊙ τ_t, where per tensor m_t drops the largest `gamma` share of |τ_t| and
    the smallest, so that a `density` share stays (mergekit's `breadcrumbs`, no rescaling)."""

    def __init__(self, density: float = 0.9, gamma: float = 0.01, scaling_factor: float = 0.3):
        self.density, self.gamma = check_density_and_gamma(density, gamma)
        self.scaling_factor = check_scaling_factor(scaling_factor)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="breadcrumbs/task_arithmetic", need_pretrained=True)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        out = merged.state_dict()

        def sparsify(key: str, task_vector: torch.Tensor) -> torch.Tensor:
            return breadcrumbs_sparsify(task_vector, self.density, self.gamma)

        task_vectors = {name: TaskVectorView(inputs.pretrained, state_dict, sparsify) for name, state_dict in inputs.finetuned.items()}
        task_arithmetic_merge(ZerosView(inputs.pretrained), task_vectors, out, inputs.keys, scaling_factor=self.scaling_factor)
        add_pretrained(inputs.pretrained, out, inputs.keys)
        return merged

