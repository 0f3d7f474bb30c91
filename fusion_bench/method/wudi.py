"""WUDI merging (Cheng et al., 2025, arXiv 2503.08099); the math is fusion_bench.merging.wudi."""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merging.per_tensor import check_exclude_keys
from fusion_bench.merging.wudi import wudi_merge
from fusion_bench.method.base import BaseAlgorithm, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.utils.errors import InputError


class WUDIMerging(BaseAlgorithm):
    """Per 2-D weight, the task vector that minimises Σ_t ‖(τ − τ_t)τ_tᵀ‖²_F / ‖τ_t‖²_F, found by
    iter_num Adam steps from Σ_t τ_t; the other tensors (and exclude_keys) take the mean task
    vector; θ = θ₀ + τ. iter_num=0 gives θ₀ + Σ_t τ_t on the matrices."""

    def __init__(self, iter_num: int = 400, exclude_keys: Sequence[str] | None = None):
        if isinstance(iter_num, bool) or not isinstance(iter_num, int) or iter_num < 0:
            raise InputError(f"iter_num={iter_num!r} must be a whole number of Adam steps, 0 or more, e.g. iter_num=400")
        self.iter_num = iter_num
        self.exclude_keys = check_exclude_keys(exclude_keys)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="WUDI", need_pretrained=True)
        pretrained = inputs.pretrained
        names = {alias: key for key in pretrained for alias in pretrained.aliases(key)}
        for key in self.exclude_keys:
            if key not in names:
                raise InputError(f"exclude_keys names {key!r}, which is not a key of model {PRETRAINED!r}")
        # a tied tensor is excluded under any of its names
        excluded = [names[key] for key in self.exclude_keys]
        if not any(len(pretrained.shape(key)) == 2 and key not in excluded for key in inputs.keys):
            why = "exclude_keys names all its 2-D weights" if any(len(pretrained.shape(key)) == 2 for key in inputs.keys) else "the pool has none"
            raise InputError(
                f"WUDI optimises 2-D weights and {why}; on the other tensors it is the mean task vector, "
                "which is simple averaging: use method=simple_average"
            )
        merged = output_model(pool, PRETRAINED, inputs.keys)
        wudi_merge(pretrained, inputs.finetuned, merged.state_dict(), inputs.keys, iter_num=self.iter_num, exclude_keys=excluded)
        return merged
