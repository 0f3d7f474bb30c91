"""TIES-merging (Yadav et al., NeurIPS 2023); the math is fusion_bench.merging.ties."""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merging.disjoint_merge import check_merge_func
from fusion_bench.merging.ties import check_trim_scope, ties_merge
from fusion_bench.merging.trim import keep_fraction
from fusion_bench.method.base import BaseAlgorithm, check_remove_keys, check_scaling_factor, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.utils.errors import InputError


class TiesMergingAlgorithm(BaseAlgorithm):
    """Trim each task vector to its top `threshold`% by magnitude, elect a sign per parameter,
    merge the agreeing values with `merge_func`, and return θ₀ + scaling_factor·τ_m.

    trim_scope: "global" cuts over each whole task vector (the paper, FusionBench), "tensor"
    within each tensor (mergekit, peft). remove_keys keep their pretrained values. The paper's
    ablations: threshold=100 is TIES without trimming, elect=False without sign election.

    The global statistics count every state-dict name, as FusionBench flattens a state dict: a
    tensor tied under m names (T5's embeddings) counts m times, yet is merged once and stays tied.
    """

    def __init__(
        self,
        scaling_factor: float = 0.3,
        threshold: float = 20,
        remove_keys: Sequence[str] = (),
        merge_func: str = "sum",
        trim_scope: str = "global",
        elect: bool = True,
    ):
        self.scaling_factor = check_scaling_factor(scaling_factor)
        keep_fraction(threshold)
        self.threshold = threshold
        self.remove_keys = check_remove_keys(remove_keys)
        self.merge_func = check_merge_func(merge_func)
        self.trim_scope = check_trim_scope(trim_scope)
        if not isinstance(elect, bool):
            raise InputError(f"elect={elect!r} must be true or false")
        self.elect = elect

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="ties_merging", need_pretrained=True, remove_keys=self.remove_keys)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        ties_merge(
            inputs.pretrained,
            inputs.finetuned,
            merged.state_dict(),
            inputs.keys,
            scaling_factor=self.scaling_factor,
            threshold=self.threshold,
            merge_func=self.merge_func,
            trim_scope=self.trim_scope,
            multiplicity=inputs.multiplicity,
            zero_entries=inputs.untouched_entries(),
            elect=self.elect,
        )
        return merged
