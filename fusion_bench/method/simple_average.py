"""Simple averaging (model soups, Wortsman et al., 2022): θ = (1/n)·Σ_t θ_t."""

from collections.abc import Mapping

import torch
from torch import nn

from fusion_bench.merging.simple_average import simple_average_merge
from fusion_bench.method.base import BaseAlgorithm, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool


class SimpleAverageAlgorithm(BaseAlgorithm):
    """The mean of the task models' parameters; `_pretrained_`, if present, is not averaged."""

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="simple_average", need_pretrained=False)
        # untouched tensors are the same in every model: those of the base, which the pool then has
        merged = output_model(pool, PRETRAINED if inputs.untouched else pool.model_names[0], inputs.keys)
        simple_average_merge(inputs.finetuned, merged.state_dict(), inputs.keys)
        return merged
