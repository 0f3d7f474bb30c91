"""Consensus merging (Wang et al., ICML 2024): task arithmetic or TIES, keeping only the entries
that at least k tasks' TALL masks mark; the math is fusion_bench.merging.tall_masks."""

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merging.disjoint_merge import check_merge_func
from fusion_bench.merging.tall_masks import check_consensus_k, check_tall_mask_lambda, consensus_task_arithmetic_merge, consensus_ties_merge, lambdas_per_task
from fusion_bench.merging.trim import keep_fraction
from fusion_bench.method.base import BaseAlgorithm, MergeInputs, check_remove_keys, check_scaling_factor, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool

log = logging.getLogger(__name__)


class ConsensusTaskArithmetic(BaseAlgorithm):
    """θ = θ₀ + scaling_factor·(m ⊙ Σ_t τ_t), m = 1[Σ_t m_t ≥ consensus_k], m_t the TALL mask of
    task t built from Σ_t τ_t with tall_mask_lambda (a number, or one λ_t per task).
    consensus_k = 0 is task arithmetic; consensus_k above the number of tasks leaves θ₀."""

    def __init__(self, consensus_k: int = 2, tall_mask_lambda: float | Sequence[float] = 0.6, scaling_factor: float = 0.3):
        self.consensus_k = check_consensus_k(consensus_k)
        self.tall_mask_lambda = check_tall_mask_lambda(tall_mask_lambda)
        self.scaling_factor = check_scaling_factor(scaling_factor)

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        """A list of λs has one per task model."""
        lambdas_per_task(self.tall_mask_lambda, modelpool.model_names)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="consensus task arithmetic", need_pretrained=True)
        lambdas = _lambdas(self, inputs)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        consensus_task_arithmetic_merge(
            inputs.pretrained, inputs.finetuned, merged.state_dict(), inputs.keys,
            lambdas=lambdas, consensus_k=self.consensus_k, scaling_factor=self.scaling_factor,
        )  # fmt: skip
        return merged


class ConsensusTiesMerging(BaseAlgorithm):
    """θ = θ₀ + scaling_factor·(m ⊙ τ_m), τ_m the TIES merge of the task vectors (threshold,
    remove_keys, merge_func as in TiesMergingAlgorithm), m = 1[Σ_t m_t ≥ consensus_k], m_t the TALL
    mask of task t built from τ_m with tall_mask_lambda. consensus_k = 0 is TIES; consensus_k
    above the number of tasks leaves θ₀."""

    def __init__(
        self,
        consensus_k: int = 2,
        tall_mask_lambda: float | Sequence[float] = 0.6,
        scaling_factor: float = 0.3,
        threshold: float = 20,
        remove_keys: Sequence[str] = (),
        merge_func: str = "sum",
    ):
        self.consensus_k = check_consensus_k(consensus_k)
        self.tall_mask_lambda = check_tall_mask_lambda(tall_mask_lambda)
        self.scaling_factor = check_scaling_factor(scaling_factor)
        keep_fraction(threshold)
        self.threshold = threshold
        self.remove_keys = check_remove_keys(remove_keys)
        self.merge_func = check_merge_func(merge_func)

    check_modelpool = ConsensusTaskArithmetic.check_modelpool

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="consensus TIES merging", need_pretrained=True, remove_keys=self.remove_keys)
        lambdas = _lambdas(self, inputs)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        consensus_ties_merge(
            inputs.pretrained, inputs.finetuned, merged.state_dict(), inputs.keys,
            lambdas=lambdas, consensus_k=self.consensus_k, scaling_factor=self.scaling_factor,
            threshold=self.threshold, merge_func=self.merge_func,
            multiplicity=inputs.multiplicity, zero_entries=inputs.untouched_entries(),
        )  # fmt: skip
        return merged


def _lambdas(method: ConsensusTaskArithmetic | ConsensusTiesMerging, inputs: MergeInputs) -> torch.Tensor:
    """λ_t per task, checked against the pool; warns where consensus_k keeps nothing."""
    tasks = list(inputs.finetuned)
    if method.consensus_k > len(tasks):
        log.warning("consensus_k=%d exceeds the %d tasks: no entry can be kept, so the result is the pretrained model", method.consensus_k, len(tasks))
    return lambdas_per_task(method.tall_mask_lambda, tasks)
