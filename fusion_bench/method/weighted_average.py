"""Weighted average: θ = Σ_t w_t·θ_t, the weights normalised to sum 1 if asked."""

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merging.weighted_average import weighted_average_merge
from fusion_bench.method.base import BaseAlgorithm, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain

log = logging.getLogger(__name__)


class WeightedAverageAlgorithm(BaseAlgorithm):
    """Σ_t w_t·θ_t over the task models, `weights` listing one w_t per task model in the pool's
    order; normalize divides them by their sum first. `_pretrained_` is not averaged; integer
    buffers keep the first task model's values. verbose logs the weights used."""

    def __init__(self, normalize: bool, weights: Sequence[float], verbose: bool = True):
        for name, value in (("normalize", normalize), ("verbose", verbose)):
            if not isinstance(value, bool):
                raise InputError(f"{name}={value!r} must be true or false")
        weights = plain(weights)
        if not isinstance(weights, (list, tuple)) or not all(_is_finite_number(weight) for weight in weights):
            raise InputError(f"weights={weights!r} must be a list of finite numbers, one per task model, e.g. weights=[0.3,0.7]")
        if not weights:
            raise InputError("weights is empty; list one number per task model, e.g. weights=[0.3,0.7]")
        if normalize and sum(weights) == 0:
            raise InputError(f"weights={list(weights)} sum to 0, so normalize cannot divide by their sum; change them, or set normalize=false")
        self.normalize, self.weights, self.verbose = normalize, list(weights), verbose

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        """One weight per task model."""
        names = modelpool.model_names
        if len(self.weights) != len(names):
            raise InputError(
                f"weights lists {len(self.weights)} numbers but the pool has {len(names)} task models ({', '.join(names)}); "
                f"give one weight per model, in that order, e.g. method.weights=[{','.join(['1'] * len(names))}]"
            )

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        self.check_modelpool(pool)
        total = sum(self.weights)
        weights = [weight / total for weight in self.weights] if self.normalize else self.weights
        if self.verbose:
            log.info("weighted average of %s with weights %s (normalized: %s)", ", ".join(pool.model_names), weights, self.normalize)
        inputs = merge_inputs(pool, method="weighted_average", need_pretrained=False)
        # untouched tensors are θ₀ in every task model, so Σ_t w_t·θ₀: rewritten unless Σ_t w_t is 1
        rescaled = [] if self.normalize else inputs.untouched
        merged = output_model(pool, PRETRAINED if inputs.untouched else pool.model_names[0], inputs.keys + rescaled)
        state = merged.state_dict()
        weighted_average_merge(inputs.finetuned, state, inputs.keys, weights=weights)
        for key in rescaled:
            state[key].copy_(total * inputs.pretrained[key].float())
        return merged


def _is_finite_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
