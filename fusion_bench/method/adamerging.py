"""AdaMerging (Yang et al., ICLR 2024), task-wise and layer-wise; the math is
fusion_bench.merging.adamerging, the data any pool's `task_data(split="test")`.

Memory: θ₀ (the output model, on the method's device), the T task vectors (T models' parameters,
float32 or `task_vector_dtype`), the merged parameters and their gradients (one model each), one
task's activations, and the task pool's heads. No model is copied per step: the merged forward is
`torch.func.functional_call` of the base model with θ₀ + Σ λ τ.
"""

import inspect
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Dataset

from fusion_bench.merging.adamerging import entropy_loss, initial_weights, loss_and_gradient, merged_parameters, per_layer, stack_task_vectors
from fusion_bench.method.base import BaseAlgorithm, merge_inputs
from fusion_bench.method.data_settings import check_seed
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.modelpool.task_data import Batch, Batches, TaskData, draw_indices
from fusion_bench.utils.cache import fingerprint, write_atomically
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain
from fusion_bench.utils.model_saving import check_writable
from fusion_bench.utils.progress import progress_bar

log = logging.getLogger(__name__)
TASK_VECTOR_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HYDRA_KEYS = ("_target_", "_recursive_", "_convert_")


class TaskWiseAdaMergingAlgorithm(BaseAlgorithm):
    """θ = θ₀ + Σ_t λ_t τ_t, λ (one per task, from init_values) learnt by Adam on the summed
    entropy of the merged model's predictions on one batch of each task's unlabeled test inputs per
    step; `weights` given: that λ, no adaptation. Keys as FusionBench's adamerging/clip.yaml."""

    uses_fabric = True
    layer_wise = False
    fusionbench_name = "clip_task_wise_adamerging"

    def __init__(
        self,
        *algorithm_config: Any,
        name: str | None = None,
        weights: Any = None,
        optimizer: str = "adam",
        lr: float = 1e-3,
        init_values: float | None = 0.3,
        clamp_weights: bool = False,
        tie_weights: bool = True,
        strict: bool = False,
        devices: int = 1,
        batch_size: int = 16,
        num_workers: int = 0,
        max_steps: int = 1000,
        fast_dev_run: bool = False,
        save_merging_weights: str | bool | None = False,
        cache_dir: str | None = None,
        seed: int = 0,
        task_vector_dtype: str | None = None,
    ):
        if algorithm_config:  # FusionBench's classes take one DictConfig
            parameters = inspect.signature(type(self).__init__).parameters
            given = locals()
            if len(algorithm_config) > 1 or any(given[key] is not p.default for key, p in parameters.items() if p.kind is p.KEYWORD_ONLY):
                raise InputError(f"{type(self).__name__} takes its keys either as one config (FusionBench's algorithm_config) or by name, not both")
            self.__init__(**_config_keys(type(self), algorithm_config[0]))
            return
        if name is not None and name != self.fusionbench_name:
            raise InputError(f"name={name!r} does not name {type(self).__name__}; use name={self.fusionbench_name} or leave it out")
        if optimizer != "adam":
            raise InputError(f"optimizer={optimizer!r} is not supported; AdaMerging uses optimizer=adam (as FusionBench's)")
        for key, value in (("clamp_weights", clamp_weights), ("tie_weights", tie_weights), ("strict", strict), ("fast_dev_run", fast_dev_run)):
            if not isinstance(value, bool):
                raise InputError(f"{key}={value!r} must be true or false")
        _check_number("lr", lr, positive=True)
        if init_values is not None:
            _check_number("init_values", init_values)
        for key, value, least in (("devices", devices, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0), ("max_steps", max_steps, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InputError(f"{key}={value!r} must be a whole number, {least} or more")
        check_seed(seed, "it orders the test inputs each step sees")
        if task_vector_dtype is not None and task_vector_dtype not in TASK_VECTOR_DTYPES:
            raise InputError(f"task_vector_dtype={task_vector_dtype!r} is unknown; use null (the model's dtype), {', '.join(TASK_VECTOR_DTYPES)}")
        if save_merging_weights not in (False, None, "") and not isinstance(save_merging_weights, (str, Path)):
            raise InputError(f"save_merging_weights={save_merging_weights!r} must be a file path (e.g. merging_weights.pt) or false")
        if cache_dir is not None and not isinstance(cache_dir, (str, Path)):
            raise InputError(f"cache_dir={cache_dir!r} must be a folder path or null")
        self.weights = _given_weights(weights)
        self.lr, self.init_values, self.clamp_weights = float(lr), init_values, clamp_weights
        self.tie_weights, self.strict, self.devices, self.cache_dir = tie_weights, strict, devices, cache_dir
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.steps = 1 if fast_dev_run else max_steps
        self.save_merging_weights = str(save_merging_weights) if save_merging_weights else None
        self.task_vector_dtype = TASK_VECTOR_DTYPES.get(task_vector_dtype)
        self.learned: torch.Tensor | None = None
        self.names: list[str] = []
        self.tasks: list[str] = []
        self.losses: list[float] = []

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        if self.weights is None and self.steps:
            modelpool.check_task_data("test", "AdaMerging")
        if self.weights is not None and self.weights.shape[0] != len(modelpool.model_names):
            raise InputError(f"weights holds {self.weights.shape[0]} rows, one per task model, but the pool has {len(modelpool.model_names)} task models")
        if self.save_merging_weights and self.weights is None:  # given weights are not saved again, as in FusionBench
            target = self.merging_weights_path()
            if target.exists() or target.is_symlink():
                raise InputError(f"save_merging_weights={self.save_merging_weights}: {target} exists and this run did not write it; move it or give another path")
            check_writable(target, "save_merging_weights")

    def merging_weights_path(self) -> Path:
        """As FusionBench: a path that starts with neither '/' nor '.' lies in the run's output
        folder (Hydra's, when run from the command line; else the working directory)."""
        path = Path(self.save_merging_weights).expanduser()
        if not self.save_merging_weights.startswith(("/", ".", "~")):
            from hydra.core.hydra_config import HydraConfig

            if HydraConfig.initialized():
                path = Path(HydraConfig.get().runtime.output_dir) / path
        return path.absolute()

    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        self.check_modelpool(pool)
        inputs = merge_inputs(pool, method="AdaMerging", need_pretrained=True)
        self.tasks = list(pool.model_names)
        model = pool.load_model_copy(PRETRAINED).requires_grad_(False)
        training = model.training
        model.eval()  # FusionBench adapts in train mode: dropout on where the model has it (CLIP has none)
        self.names = [name for name, tensor in model.named_parameters() if tensor.is_floating_point()]
        weights = self._start_weights()
        adapting = self.weights is None and self.steps > 0
        # every task's data is built (and checked) before the task vectors are
        data = {task: pool.task_data(task, split="test", num_examples=None, batch_size=self.batch_size, seed=self.seed) for task in self.tasks} if adapting else {}
        device = self.method_device()
        model.to(device)
        pretrained = {name: tensor.detach() for name, tensor in model.named_parameters()}
        task_vectors = self._task_vectors(inputs, pretrained)
        self.losses = []
        if adapting:
            weights = self._adapt(model, pretrained, task_vectors, {task: d.to(device) for task, d in data.items()}, weights.to(device))
        self.learned = weights.detach().cpu()
        merged = merged_parameters(pretrained, task_vectors, per_layer(self._effective(self.learned), len(self.names)), self.names)
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                if name in task_vectors:
                    tensor.copy_(merged[name])
        del task_vectors, merged
        if self.save_merging_weights and self.weights is None:
            path = write_atomically(self.merging_weights_path(), lambda temporary: torch.save(self.learned.clone(), temporary))
            log.info("AdaMerging: merging weights saved to %s", path)
        return model.train(training).cpu()

    def method_outputs(self) -> dict:
        if self.learned is None:
            return {}
        outputs = {"merging_weights": self._by_name(self.learned), "steps": len(self.losses), "entropy": self.losses}
        if self.clamp_weights:
            outputs["clamped_merging_weights"] = self._by_name(self._effective(self.learned))
        return outputs

    def _by_name(self, weights: torch.Tensor) -> dict:
        rows = weights.tolist()
        if not self.layer_wise:
            return dict(zip(self.tasks, rows))
        return {task: dict(zip(self.names, row)) for task, row in zip(self.tasks, rows)}

    def _effective(self, weights: torch.Tensor) -> torch.Tensor:
        return weights.clamp(0, 1) if self.clamp_weights else weights

    def _start_weights(self) -> torch.Tensor:
        layers = len(self.names) if self.layer_wise else None
        if self.weights is None:
            return initial_weights(len(self.tasks), layers, self.init_values)
        expected = (len(self.tasks),) if layers is None else (len(self.tasks), layers)
        if tuple(self.weights.shape) != expected:
            what = "one per task model" if layers is None else f"one per task model and parameter tensor ({layers} tensors)"
            raise InputError(f"weights has shape {tuple(self.weights.shape)}; {type(self).__name__} needs {list(expected)}, {what}")
        return self.weights.clone()

    def _task_vectors(self, inputs, pretrained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """[T, *shape] per parameter some task changes, read one tensor of each model at a time. A
        parameter no task changes (all τ zero, e.g. frozen embeddings) is left out: its λ has no
        gradient and no effect, and it then needs no gradient of its own."""
        keys = {alias: key for key in inputs.pretrained for alias in inputs.pretrained.aliases(key)}
        changed = set(inputs.keys)
        task_vectors = {}
        for name in self.names:
            if keys.get(name) in changed:
                stack = stack_task_vectors(pretrained[name], [inputs.finetuned[task][keys[name]] for task in self.tasks], self.task_vector_dtype)
                if stack.any():
                    task_vectors[name] = stack
        return task_vectors

    def _adapt(self, model, pretrained, task_vectors, data: dict[str, TaskData], weights: torch.Tensor) -> torch.Tensor:
        device = weights.device
        weights = weights.requires_grad_()
        optimizer = torch.optim.Adam([weights], lr=self.lr)
        buffers = dict(model.named_buffers())

        def forward(parameters):
            state = {**buffers, **parameters}
            return lambda **batch_inputs: functional_call(model, state, kwargs=batch_inputs, tie_weights=self.tie_weights, strict=self.strict)

        steps = StepBatches(data, self.steps, self.seed)
        loader = DataLoader(steps, batch_size=None, num_workers=min(self.num_workers, self.steps), pin_memory=device.type == "cuda")
        log.info("AdaMerging: %d steps of %d tasks × batch %d on %s", self.steps, len(data), self.batch_size, device)
        bar = progress_bar(loader, total=self.steps, desc="AdaMerging test-time adaptation")
        for batches in bar:

            def task_losses(parameters):
                model_call = forward(parameters)
                for task, batch in batches.items():
                    yield entropy_loss(data[task].logits(model_call, Batch(*batch).to(device)))

            loss, gradient = loss_and_gradient(weights, pretrained, task_vectors, self.names, task_losses, self.clamp_weights)
            weights.grad = gradient
            optimizer.step()
            optimizer.zero_grad()
            self.losses.append(loss.item())
            bar.set_postfix(entropy=f"{self.losses[-1]:.4f}")
        log.info("AdaMerging: summed entropy %.4f at the first step, %.4f at the last", self.losses[0], self.losses[-1])
        return weights.detach()


class LayerWiseAdaMergingAlgorithm(TaskWiseAdaMergingAlgorithm):
    """As TaskWiseAdaMergingAlgorithm with one λ per task and parameter tensor: λ [T, L], L the
    model's named parameters in order (FusionBench's LayerWiseMergedModel)."""

    layer_wise = True
    fusionbench_name = "clip_layer_wise_adamerging"


class CLIPTaskWiseAdaMergingAlgorithm(TaskWiseAdaMergingAlgorithm):
    """FusionBench's name; the CLIP pool serves the test images and zero-shot heads."""


class CLIPLayerWiseAdaMergingAlgorithm(LayerWiseAdaMergingAlgorithm):
    """FusionBench's name; the CLIP pool serves the test images and zero-shot heads."""


CLIP_ADAMERGING = {cls.fusionbench_name: cls for cls in (CLIPTaskWiseAdaMergingAlgorithm, CLIPLayerWiseAdaMergingAlgorithm)}


def clip_adamerging(name: str = "clip_layer_wise_adamerging", **keys: Any) -> TaskWiseAdaMergingAlgorithm:
    """FusionBench's adamerging/clip.yaml selects its class by `name`; so does this."""
    if name not in CLIP_ADAMERGING:
        raise InputError(f"name={name!r} is unknown; adamerging/clip takes name={' or name='.join(CLIP_ADAMERGING)}")
    cls = CLIP_ADAMERGING[name]
    return cls(**_config_keys(cls, {"name": name, **keys}))


clip_adamerging.selects = CLIP_ADAMERGING  # for reports: the class each `name` builds


class StepBatches(Dataset):
    """Item s: each task's batch for step s. A task's batches go through its test inputs in a
    seeded shuffle, a fresh one on each pass, as FusionBench's shuffled, endlessly repeated loaders
    do (pools may hand out their inputs in an order of their own, e.g. by length)."""

    def __init__(self, data: Mapping[str, TaskData], steps: int, seed: int):
        self.batches = {task: d.batches for task, d in data.items()}
        self.steps, self.seed = steps, seed
        self._passes: dict[tuple[str, int], Batches] = {}

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int) -> dict[str, Batch]:
        return {task: self._pass(task, step // len(batches))[step % len(batches)] for task, batches in self.batches.items()}

    def _pass(self, task: str, number: int) -> Batches:
        if (task, number) not in self._passes:
            given = self.batches[task]
            self._passes = {key: value for key, value in self._passes.items() if key[0] != task}  # one pass per task kept
            order = draw_indices(len(given.indices), None, int(fingerprint(self.seed, task, number), 16))
            self._passes[task, number] = Batches([given.indices[i] for i in order], given.batch_size, given.make)
        return self._passes[task, number]


def _config_keys(cls: type, config: Any) -> dict[str, Any]:
    """A config's keys, checked against the class's (one line naming an unknown key)."""
    keys = plain(config)
    if not isinstance(keys, Mapping):
        raise InputError(f"{cls.__name__} takes a config of keys (a DictConfig or dict), got {type(config).__name__}")
    keys = {key: value for key, value in keys.items() if key not in _HYDRA_KEYS}
    known = [name for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self" and p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(keys) - set(known))
    if unknown:
        raise InputError(f"the method config has an unknown key {unknown[0]!r} for {cls.__name__}; its keys are: {', '.join(known)}")
    return keys


def _check_number(key: str, value: Any, positive: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (positive and value <= 0):
        raise InputError(f"{key}={value!r} must be a finite{' positive' if positive else ''} number")


def _given_weights(weights: Any) -> torch.Tensor | None:
    """FusionBench's `weights`: null, a list (nested [T][L] for layer-wise), or a .pt / .pth / .np
    / .npy file holding the tensor (as save_merging_weights writes it)."""
    if weights is None:
        return None
    weights = plain(weights)
    if isinstance(weights, (str, Path)):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InputError(f"weights={weights} is not a file; give a .pt or .np file of merging weights, a list, or null to learn them")
        try:
            if path.suffix in (".pt", ".pth"):
                loaded = torch.load(path, map_location="cpu", weights_only=True)
            elif path.suffix in (".np", ".npy"):
                loaded = torch.from_numpy(np.load(path, allow_pickle=False))
            else:
                raise InputError(f"weights={weights}: unknown file type {path.suffix!r}; use .pt, .pth, .np or .npy")
        except (OSError, ValueError, RuntimeError) as error:
            if isinstance(error, InputError):
                raise
            raise InputError(f"weights={weights} cannot be read ({type(error).__name__}); give a file written by torch.save or numpy.save") from None
        if not isinstance(loaded, torch.Tensor):
            raise InputError(f"weights={weights} holds a {type(loaded).__name__}, not a tensor of merging weights")
        tensor = loaded.detach().float()
    elif isinstance(weights, (list, tuple)):
        try:
            tensor = torch.tensor(weights, dtype=torch.float32)
        except (TypeError, ValueError):
            raise InputError(f"weights={weights!r} must be a list of numbers (task-wise) or of lists of numbers (layer-wise)") from None
    else:
        raise InputError(f"weights={weights!r} must be null, a list of numbers or a .pt / .np file")
    if tensor.dim() not in (1, 2) or tensor.numel() == 0 or not torch.isfinite(tensor).all():
        raise InputError(f"weights must be finite numbers, [tasks] or [tasks, tensors]; got shape {tuple(tensor.shape)}")
    return tensor

