"""DARE (Yu et al., ICML 2024): drop and rescale each task vector, then average, add or TIES-merge.

The math is fusion_bench.merging.dare. Task arithmetic and averaging drop each chunk of τ_t inside
their stream, so they cost a plain task arithmetic plus the draws. TIES, which reads samples of the
task vectors out of order, gets the dropped task vectors as TaskVectorViews over a zero θ₀, and θ₀
is added at the end (see merging.task_vector_views). Either way the merges, their streaming and
their rounding are those of task arithmetic and TIES.
"""

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merging.dare import check_sparsity_ratio, chunk_drops, dare_transform
from fusion_bench.merging.disjoint_merge import check_merge_func
from fusion_bench.merging.streaming import RowTransformsPerKey
from fusion_bench.merging.task_arithmetic import task_arithmetic_merge
from fusion_bench.merging.task_vector_views import TaskVectorView, ZerosView, add_pretrained
from fusion_bench.merging.ties import check_trim_scope, ties_merge
from fusion_bench.merging.trim import keep_fraction
from fusion_bench.method.base import BaseAlgorithm, MergeInputs, check_remove_keys, check_scaling_factor, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.utils.errors import InputError


def _check_flag(name: str, value: bool) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name}={value!r} must be true or false")
    return value


class _DareAlgorithm(BaseAlgorithm):
    """The DARE keys, checked, and the dropped task vectors they define.

    sparsity_ratio: p, the share of entries dropped. only_on_linear_weights: drop only in the
    weights of nn.Linear modules; other entries keep their whole τ. rescale: divide the kept
    entries by 1 − p. seed: the masks' seed; None takes torch.initial_seed() when `run` starts
    (the program's `seed`, where one is set).
    """

    def __init__(self, sparsity_ratio: float, only_on_linear_weights: bool, rescale: bool, seed: int | None):
        self.sparsity_ratio = check_sparsity_ratio(sparsity_ratio)
        self.only_on_linear_weights = _check_flag("only_on_linear_weights", only_on_linear_weights)
        self.rescale = _check_flag("rescale", rescale)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(f"seed={seed!r} must be an integer, or null to use torch's seed (the program's `seed`)")
        self.seed = seed

    def dropped_task_vectors(self, inputs: MergeInputs, merged: nn.Module) -> dict[str, TaskVectorView]:
        """d(τ_t) for every task model, as views computed key by key when a merge asks."""
        seed, dropped_keys = self._seed_and_dropped_keys(inputs, merged)
        return {
            name: TaskVectorView(inputs.pretrained, state_dict, dare_transform(seed, name, self.sparsity_ratio, rescale=self.rescale, dropped_keys=dropped_keys))
            for name, state_dict in inputs.finetuned.items()
        }

    def drops(self, inputs: MergeInputs, merged: nn.Module) -> RowTransformsPerKey:
        """The same drops, applied to the chunks of a stream over the task models (equal masks)."""
        seed, dropped_keys = self._seed_and_dropped_keys(inputs, merged)
        return chunk_drops(seed, list(inputs.finetuned), self.sparsity_ratio, rescale=self.rescale, dropped_keys=dropped_keys)

    def _seed_and_dropped_keys(self, inputs: MergeInputs, merged: nn.Module) -> tuple[int, set[str] | None]:
        seed = self.seed if self.seed is not None else torch.initial_seed()
        return seed, _linear_weight_keys(merged, inputs) if self.only_on_linear_weights else None


def _linear_weight_keys(model: nn.Module, inputs: MergeInputs) -> set[str]:
    """The keys to merge that are (under any of their tied names) the weight of an nn.Linear."""
    names = {f"{prefix}.weight".lstrip(".") for prefix, module in model.named_modules(remove_duplicate=False) if isinstance(module, nn.Linear)}
    return {key for key in inputs.keys if any(alias in names for alias in inputs.pretrained.aliases(key))}


class DareTaskArithmetic(_DareAlgorithm):
    """θ = θ₀ + λ·Σ_t d(τ_t)."""

    def __init__(
        self,
        scaling_factor: float = 0.3,
        sparsity_ratio: float = 0.5,
        only_on_linear_weights: bool = False,
        rescale: bool = True,
        seed: int | None = None,
    ):
        super().__init__(sparsity_ratio, only_on_linear_weights, rescale, seed)
        self.scaling_factor = check_scaling_factor(scaling_factor)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="dare/task_arithmetic", need_pretrained=True)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        out = merged.state_dict()
        drops = self.drops(inputs, merged)
        task_arithmetic_merge(inputs.pretrained, inputs.finetuned, out, inputs.keys, scaling_factor=self.scaling_factor, task_vector_transforms=drops)
        return merged


class DareSimpleAverage(_DareAlgorithm):
    """θ = θ₀ + (1/T)·Σ_t d(τ_t) over the T task models: DareTaskArithmetic with λ = 1/T, as
    FusionBench computes it (with p = 0 that is the average of the task models)."""

    def __init__(self, sparsity_ratio: float = 0.5, only_on_linear_weights: bool = False, rescale: bool = True, seed: int | None = None):
        super().__init__(sparsity_ratio, only_on_linear_weights, rescale, seed)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        task_arithmetic = DareTaskArithmetic(
            scaling_factor=1 / max(1, len(pool.model_names)),  # no task model: merge_inputs says so
            sparsity_ratio=self.sparsity_ratio,
            only_on_linear_weights=self.only_on_linear_weights,
            rescale=self.rescale,
            seed=self.seed,
        )
        return task_arithmetic.run(pool)


class DareTiesMerging(_DareAlgorithm):
    """TIES-merging (fusion_bench.merging.ties) of the dropped task vectors d(τ_t): the global trim
    counts every entry, dropped ones as zeros, as FusionBench's does. The TIES keys are
    TiesMergingAlgorithm's."""

    def __init__(
        self,
        sparsity_ratio: float = 0.5,
        only_on_linear_weights: bool = False,
        rescale: bool = True,
        scaling_factor: float = 0.5,
        threshold: float = 20,
        remove_keys: Sequence[str] = (),
        merge_func: str = "sum",
        trim_scope: str = "global",
        elect: bool = True,
        seed: int | None = None,
    ):
        super().__init__(sparsity_ratio, only_on_linear_weights, rescale, seed)
        self.scaling_factor = check_scaling_factor(scaling_factor)
        keep_fraction(threshold)
        self.threshold = threshold
        self.remove_keys = check_remove_keys(remove_keys)
        self.merge_func = check_merge_func(merge_func)
        self.trim_scope = check_trim_scope(trim_scope)
        self.elect = _check_flag("elect", elect)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="dare/ties_merging", need_pretrained=True, remove_keys=self.remove_keys)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        out = merged.state_dict()
        ties_merge(
            ZerosView(inputs.pretrained),
            self.dropped_task_vectors(inputs, merged),
            out,
            inputs.keys,
            scaling_factor=self.scaling_factor,
            threshold=self.threshold,
            merge_func=self.merge_func,
            trim_scope=self.trim_scope,
            multiplicity=inputs.multiplicity,
            zero_entries=inputs.untouched_entries(),
            elect=self.elect,
        )
        add_pretrained(inputs.pretrained, out, inputs.keys)
        return merged
