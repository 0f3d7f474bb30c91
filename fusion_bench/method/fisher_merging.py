"""Fisher merging (Matena & Raffel, 2022, arXiv 2111.09832); the math is fusion_bench.merging.fisher.

Each task model's diagonal Fisher is computed on its own task's train examples (the pool's
`task_data(split="train")`: calibration images of a CLIP pool, texts of OfflineTextPool), one model
at a time, and cached on disk keyed by the model's weights, the data and the estimate; the merge
then streams key by key from the cached files. docs/methods/fisher_merging.md.
"""

import logging
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fusion_bench.merging.fisher import ESTIMATES, PER_EXAMPLE, add_fisher_terms, fisher_coefficients, fisher_weighted_average, merged_fisher_norms
from fusion_bench.merging.streaming import progress
from fusion_bench.method.base import BaseAlgorithm, merge_inputs, output_model
from fusion_bench.method.data_settings import DATALOADER_DEFAULTS, DataloaderSettings, check_num_examples, check_param_regexes, check_seed, device_batches, excluded_keys
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.modelpool.lazy_state_dict import LazyStateDict
from fusion_bench.modelpool.task_data import Batch, TaskData
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.progress import progress_bar
from fusion_bench.utils.statistics_cache import cached_statistics

log = logging.getLogger(__name__)
METHOD = "Fisher merging"


class FisherMergingAlgorithm(BaseAlgorithm):
    """θ = Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε) over every floating tensor not matched by
    exclude_param_names_regex (those keep `_pretrained_`'s value); F_t the diagonal Fisher of task
    t's model on num_fisher_examples of its train examples (`fisher_estimate`), ε =
    minimal_fisher_weight, c_t ∝ 1/‖F_t‖ with normalize_fisher_weight, else 1/T."""

    uses_fabric = True

    def __init__(
        self,
        exclude_param_names_regex: Sequence[str] = (),
        normalize_fisher_weight: bool = True,
        minimal_fisher_weight: float = 1e-6,
        num_fisher_examples: int = 256,
        dataloader_kwargs: Mapping | None = DATALOADER_DEFAULTS,
        seed: int = 0,
        fisher_estimate: str = "empirical",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.exclude_param_names_regex = check_param_regexes(exclude_param_names_regex)
        if not isinstance(normalize_fisher_weight, bool):
            raise InputError(f"normalize_fisher_weight={normalize_fisher_weight!r} must be true or false")
        self.normalize_fisher_weight = normalize_fisher_weight
        valid = isinstance(minimal_fisher_weight, (int, float)) and not isinstance(minimal_fisher_weight, bool)
        if not valid or not math.isfinite(minimal_fisher_weight) or minimal_fisher_weight <= 0:
            raise InputError(
                f"minimal_fisher_weight={minimal_fisher_weight!r} must be a positive number (it keeps Σ F > 0 where no model has Fisher mass), e.g. 1e-6"
            )
        self.minimal_fisher_weight = float(minimal_fisher_weight)
        self.num_fisher_examples = check_num_examples(num_fisher_examples, "num_fisher_examples")
        self.dataloader = DataloaderSettings.from_kwargs(dataloader_kwargs)
        self.seed = check_seed(seed)
        if fisher_estimate not in ESTIMATES:
            raise InputError(f"fisher_estimate={fisher_estimate!r} is unknown; use empirical (the default), exact or fusionbench")
        self.fisher_estimate = fisher_estimate
        self._outputs: dict = {}

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        modelpool.check_task_data("train", METHOD)

    def method_outputs(self) -> dict:
        return self._outputs

    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        self.check_modelpool(pool)
        inputs = merge_inputs(pool, method=METHOD, need_pretrained=True)
        excluded = excluded_keys(inputs.pretrained, self.exclude_param_names_regex)
        keys = [key for key in inputs.keys if key not in excluded]
        if not keys:
            raise InputError(f"exclude_param_names_regex {self.exclude_param_names_regex} excludes every tensor, so nothing is merged; narrow it")
        # every task's data first: a task with too few examples fails before any Fisher is computed
        data = {
            task: pool.task_data(task, split="train", num_examples=self.num_fisher_examples, batch_size=self.dataloader.batch_size, seed=self.seed)
            for task in pool.model_names
        }
        fishers = {task: _FisherOf(self.task_fisher(pool, task, data[task]), inputs.pretrained) for task in pool.model_names}
        norms = merged_fisher_norms(fishers, keys)
        coefficients = fisher_coefficients(norms, self.normalize_fisher_weight, self.minimal_fisher_weight)
        merged = output_model(pool, PRETRAINED, keys)
        out = merged.state_dict()
        for key in progress(keys, METHOD):
            tensors = [inputs.finetuned[task][key] for task in pool.model_names]
            out[key].copy_(fisher_weighted_average(tensors, [fishers[task][key] for task in pool.model_names], coefficients, self.minimal_fisher_weight))
        self._outputs = {
            "fisher_norms": dict(zip(pool.model_names, norms.tolist())),
            "fisher_coefficients": dict(zip(pool.model_names, coefficients.tolist())),
        }
        return merged

    def task_fisher(self, pool: BaseModelPool, task: str, data: TaskData) -> LazyStateDict:
        """Task model `task`'s Fisher diagonal of every floating parameter, from the cache when the
        same model, data and estimate were seen before (exclusion, normalisation and ε are not part
        of the key: they only change the merge)."""
        key = (pool.model_fingerprint(task), data.fingerprint, self.fisher_estimate, self.num_fisher_examples)
        device = self.method_device()
        return cached_statistics(
            "fisher", key, lambda: fisher_diagonal(pool.load_model(task), data, self.fisher_estimate, self.dataloader, device), description=f"Fisher of {task!r}"
        )


class FisherMergingForCLIPVisionModel(FisherMergingAlgorithm):
    """FusionBench's CLIP class (config fisher_merging/clip_fisher_merging): the same method; the
    CLIPVisionModelPool serves the train images and the zero-shot heads of the `_pretrained_` CLIP."""


def fisher_diagonal(model: nn.Module, data: TaskData, estimate: str, dataloader: DataloaderSettings, device: torch.device) -> dict[str, Tensor]:
    """{parameter name: F} of every floating parameter of `model` on `data` (float32), the model in
    eval mode. The model itself is not moved or changed: its tensors are copied to `device` and
    used through torch.func.functional_call."""
    training = model.training
    model.eval()
    params = {name: tensor.detach().to(device).requires_grad_(True) for name, tensor in model.named_parameters() if tensor.is_floating_point()}
    constants = {name: tensor.detach().to(device) for name, tensor in model.named_parameters() if name not in params}
    constants |= {name: tensor.to(device) for name, tensor in model.named_buffers()}

    def forward(**inputs):
        return functional_call(model, {**params, **constants}, args=(), kwargs=inputs)

    data.to(device)
    sums = [torch.zeros(tensor.shape, dtype=torch.float32, device=device) for tensor in params.values()]
    try:
        batches = progress_bar(device_batches(data, dataloader, device), total=len(data.batches), desc=f"Fisher of {data.task}", unit="batch")
        for batch in batches:
            pieces = [_example(batch, i) for i in range(len(batch))] if PER_EXAMPLE[estimate] else [batch]
            for piece in pieces:
                add_fisher_terms(sums, data.logits(forward, piece), piece.labels, list(params.values()), estimate)
    finally:
        model.train(training)
    log.info("%s: %s Fisher of %d parameters on %d examples", data.task, estimate, len(params), data.num_examples)
    return {name: total / data.num_examples for name, total in zip(params, sums)}


def _example(batch: Batch, i: int) -> Batch:
    labels = None if batch.labels is None else batch.labels[i : i + 1]
    return Batch({key: value[i : i + 1] for key, value in batch.inputs.items()}, labels)


class _FisherOf(Mapping):
    """One model's cached Fisher by merge key: the tensor stored under any of the key's names
    (tied tensors), None for tensors without one (buffers)."""

    def __init__(self, fisher: LazyStateDict, reference: LazyStateDict):
        self.fisher, self.reference = fisher, reference

    def __getitem__(self, key: str) -> Tensor | None:
        return next((self.fisher[name] for name in self.reference.aliases(key) if name in self.fisher), None)

    def __iter__(self):
        return iter(self.reference)

    def __len__(self) -> int:
        return len(self.reference)
