"""Task arithmetic (Ilharco et al., ICLR 2023): θ = θ₀ + λ·Σ_t (θ_t − θ₀)."""

from collections.abc import Mapping

import torch
from torch import nn

from fusion_bench.merging.task_arithmetic import task_arithmetic_merge
from fusion_bench.method.base import BaseAlgorithm, check_scaling_factor, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool


class TaskArithmeticAlgorithm(BaseAlgorithm):
    """Adds the scaled sum of the task vectors to the pretrained model."""

    def __init__(self, scaling_factor: float = 0.3):
        self.scaling_factor = check_scaling_factor(scaling_factor)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="task_arithmetic", need_pretrained=True)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        task_arithmetic_merge(
            inputs.pretrained, inputs.finetuned, merged.state_dict(), inputs.keys, scaling_factor=self.scaling_factor
        )
        return merged
