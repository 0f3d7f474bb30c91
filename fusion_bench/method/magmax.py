"""MagMax (Marczak et al., ECCV 2024); the math is fusion_bench.merging.magmax."""

from collections.abc import Mapping

import torch
from torch import nn

from fusion_bench.merging.magmax import magmax_merge
from fusion_bench.method.base import BaseAlgorithm, check_scaling_factor, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.utils.errors import InputError


class MagMaxAlgorithm(BaseAlgorithm):
    """Per entry, the task-vector value of largest magnitude (on a tie the later task's), scaled:
    θ = θ₀ + scaling_factor·τ_max.

    inplace is FusionBench's key, accepted for its configs: the merge is written into a copy of the
    pretrained model either way, and the pool's models are never modified.
    """

    def __init__(self, scaling_factor: float = 0.5, inplace: bool = True):
        self.scaling_factor = check_scaling_factor(scaling_factor)
        if not isinstance(inplace, bool):
            raise InputError(f"inplace={inplace!r} must be true or false")
        self.inplace = inplace

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="MagMax", need_pretrained=True)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        magmax_merge(inputs.pretrained, inputs.finetuned, merged.state_dict(), inputs.keys, scaling_factor=self.scaling_factor)
        return merged
