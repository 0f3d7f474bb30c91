"""RegMean (Jin et al., 2023, arXiv 2212.09849); the math is fusion_bench.merging.regmean.

Each task model's Gram matrices (the mean xᵀx of every nn.Linear's inputs over its own task's
calibration tokens) are computed one model at a time and cached on disk, keyed by the model's
weights, the examples drawn and the rule they are computed by; the merge then streams key by key.
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fusion_bench.merging.regmean import GramSum, Solution, regmean_merge, token_rows
from fusion_bench.method.base import BaseAlgorithm, MergeInputs, merge_inputs, output_model
from fusion_bench.method.data_settings import DATALOADER_DEFAULTS, DataloaderSettings, check_num_examples, check_param_regexes, check_seed, device_batches, excluded_keys
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.modelpool.task_data import TaskData
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.progress import progress_bar
from fusion_bench.utils.statistics_cache import cached_statistics

log = logging.getLogger(__name__)

# Part of the cache key: bump when what a cached Gram holds changes.
GRAM_RULE = "mean x^T x of each nn.Linear's inputs, float32, attention_mask 0 left out; v1"


class GramRecorder:
    """Forward hooks that add each call's input rows (padding left out) to its module's GramSum.

    Set `attention_mask` to the current batch's mask (or None) before each forward."""

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.attention_mask: Tensor | None = None
        self.sums = {name: GramSum() for name in modules}
        self.handles = [module.register_forward_hook(self._hook(name), with_kwargs=True) for name, module in modules.items()]

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            inputs = args[0] if args else kwargs["input"]
            self.sums[name].add(token_rows(inputs, self.attention_mask))

        return record

    def close(self) -> dict[str, Tensor]:
        """Remove the hooks; the mean Gram of every module that saw at least one token."""
        for handle in self.handles:
            handle.remove()
        return {name: total.mean() for name, total in self.sums.items() if total.count}


def linear_modules(model: nn.Module, prefix: str = "") -> dict[str, nn.Module]:
    return {f"{prefix}{name}": module for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def check_ratio(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise InputError(
            f"reduce_non_diagonal_ratio={value!r} must be a number in [0, 1]: the factor on the Gram matrices' "
            "off-diagonal entries (1 keeps them, 0 keeps only the diagonal), e.g. 0.95"
        )
    return float(value)


class RegMeanAlgorithm(BaseAlgorithm):
    """For every nn.Linear weight, Wᵀ = (Σ_t G'_t)⁻¹ Σ_t G'_t W_tᵀ, G_t the mean Gram of that
    layer's inputs in task t's model on its own task's train examples, G'_t with off-diagonals
    scaled by reduce_non_diagonal_ratio; every other floating-point parameter is the task models'
    mean; parameters matching exclude_param_names_regex (re.match) keep `_pretrained_`'s value.

    Any pool that serves `task_data(split="train")` (OfflineTextPool, CLIPVisionModelPool with
    train_datasets). `seed` chooses which examples are drawn."""

    uses_fabric = True
    method_name = "RegMean"

    def __init__(
        self,
        num_regmean_examples: int = 256,
        exclude_param_names_regex: Sequence[str] = (),
        reduce_non_diagonal_ratio: float = 0.95,
        weight_transpose: bool = True,
        dataloader_kwargs: Mapping[str, Any] | None = DATALOADER_DEFAULTS,
        seed: int = 0,
    ):
        self.num_regmean_examples = check_num_examples(num_regmean_examples, "num_regmean_examples")
        self.exclude_param_names_regex = check_param_regexes(exclude_param_names_regex)
        self.reduce_non_diagonal_ratio = check_ratio(reduce_non_diagonal_ratio)
        if weight_transpose is not True:
            raise InputError(
                f"weight_transpose={weight_transpose!r}: {self.method_name} merges nn.Linear layers, whose weights are "
                "stored [out, in] and must be transposed; keep weight_transpose=true (false is for GPT-2's Conv1D)"
            )
        self.weight_transpose = True
        self.dataloader = DataloaderSettings.from_kwargs(dataloader_kwargs)
        self.seed = check_seed(seed)
        self.pseudo_inverse_layers: list[str] = []

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        modelpool.check_task_data("train", self.method_name)

    def method_outputs(self) -> dict:
        return {"pseudo_inverse_layers": self.pseudo_inverse_layers}

    def prepare(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> tuple[BaseModelPool, MergeInputs, set[str], dict[str, TaskData]]:
        """Every check that reads no data, then every task's TaskData (cheap; checks its size)."""
        pool = as_modelpool(modelpool)
        self.check_modelpool(pool)
        inputs = merge_inputs(pool, method=self.method_name, need_pretrained=True)
        excluded = excluded_keys(inputs.pretrained, self.exclude_param_names_regex)
        data = {
            task: pool.task_data(task, split="train", num_examples=self.num_regmean_examples, batch_size=self.dataloader.batch_size, seed=self.seed)
            for task in pool.model_names
        }
        self.pseudo_inverse_layers = []
        return pool, inputs, excluded, data

    def merged_weight(self, key: str, solution: Solution) -> Tensor:
        """The solved weight; a singular system is logged and listed in the method's outputs."""
        if solution.singular:
            log.warning("%s: the Gram matrix of %s is singular; took the least-squares solution nearest the task models' mean", self.method_name, key)
            self.pseudo_inverse_layers.append(key)
        return solution.weight

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool, inputs, excluded, data = self.prepare(modelpool)
        device = self.method_device()
        grams = {}
        for task in pool.model_names:
            key = (pool.model_fingerprint(task), data[task].fingerprint, GRAM_RULE)
            grams[task] = cached_statistics("regmean_gram", key, lambda task=task: task_grams(pool, task, data[task], self.dataloader, device), f"RegMean {task}")
        keys = [key for key in inputs.keys if key not in excluded]
        merged = output_model(pool, PRETRAINED, keys)
        target = merged.state_dict()
        for key in progress_bar(keys, desc="RegMean merge"):
            module = key.removesuffix(".weight")
            if key.endswith(".weight") and all(module in task_grams_ for task_grams_ in grams.values()):
                pairs = ((grams[task][module].to(device), inputs.finetuned[task][key].to(device)) for task in pool.model_names)
                target[key].copy_(self.merged_weight(key, regmean_merge(pairs, self.reduce_non_diagonal_ratio, self.weight_transpose)))
            else:
                target[key].copy_(mean_tensor(inputs, key))
        return merged


class RegMeanAlgorithmForCLIP(RegMeanAlgorithm):
    """RegMean on a CLIPVisionModelPool with train_datasets (FusionBench's class and keys)."""


def mean_tensor(inputs: MergeInputs, key: str) -> Tensor:
    """The task models' mean of one tensor (FusionBench averages every parameter RegMean does not solve)."""
    return torch.stack([state_dict[key] for state_dict in inputs.finetuned.values()]).mean(dim=0)


def task_grams(pool: BaseModelPool, task: str, data: TaskData, settings: DataloaderSettings, device: torch.device) -> dict[str, Tensor]:
    """The mean Gram of every nn.Linear's inputs in model `task` over its task's batches."""
    model = pool.load_model(task) if device.type == "cpu" else pool.load_model_copy(task).to(device)
    training = model.training
    model.eval()
    recorder = GramRecorder(linear_modules(model))
    try:
        for batch in progress_bar(device_batches(data, settings, device), total=len(data.batches), desc=f"RegMean Grams of {task}"):
            recorder.attention_mask = batch.inputs.get("attention_mask")
            model(**batch.inputs)
    finally:
        grams = recorder.close()
        model.train(training)
    log.info("RegMean: Gram matrices of %d linear layers of %s on %d examples", len(grams), task, data.num_examples)
    return grams
