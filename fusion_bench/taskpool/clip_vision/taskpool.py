"""Zero-shot image classification with CLIP: the merged vision tower, the base model's text tower."""

import os
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from torch import Tensor, nn

from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool
from fusion_bench.taskpool.base import BaseTaskPool, TaskMetrics
from fusion_bench.taskpool.clip_vision.images import CLIPImageTransform, check_dataloader_kwargs, evaluation_indices, load_test_dataset
from fusion_bench.taskpool.clip_vision.scoring import score_images
from fusion_bench.taskpool.clip_vision.tower_check import check_tower_fits
from fusion_bench.taskpool.clip_vision.zeroshot_heads import HeadCache, compute_head, head_key, text_tower_digest
from fusion_bench.tasks.clip_classification import ClassificationTask, classification_task
from fusion_bench.utils.cache import cache_dir
from fusion_bench.utils.errors import InputError, first_line
from fusion_bench.utils.instantiation import plain
from fusion_bench.utils.local_paths import local_paths_in

# The tokenizer runs (for heads) before DataLoader workers fork; tokenizers would warn at every fork
# and turn its threads off anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class CLIPVisionModelTaskPool(BaseTaskPool):
    """Scores a CLIP vision tower on image classification tasks, zero-shot.

    The tower replaces the vision tower of `base_model`, a full CLIPModel (hub id or folder; or
    `clip_model`, `processor` and `data_processor` as FusionBench configs them: data_processor
    prepares the images, processor's tokenizer the class prompts). Each task's head is its class names
    in its prompt templates through the text tower (`fusion_bench.tasks.clip_classification`),
    computed once and cached on disk. Per task: accuracy, and cross-entropy averaged over samples.

    test_datasets: task name → dataset (`_target_` config, hub id, folder or dataset object) with
        columns `image` and `label`.
    dataloader_kwargs: batch_size, num_workers, pin_memory, prefetch_factor.
    fast_dev_run: score one batch per task. max_samples: score at most this many images per task,
        drawn at random with a fixed seed.
    layer_wise_feature_save_path: FusionBench's dump of every layer's features; not supported, so
        only null is taken (layer_wise_feature_first_token_only and _max_num only apply with it).
    """

    uses_fabric = True
    shards_across_processes = True  # fabric.devices=N: each process scores a share of the batches

    def __init__(
        self,
        test_datasets: Mapping[str, Any],
        *,
        base_model: str = "openai/clip-vit-base-patch32",
        clip_model: str | Mapping[str, Any] | None = None,
        processor: str | Mapping[str, Any] | None = None,
        data_processor: str | Mapping[str, Any] | None = None,
        dataloader_kwargs: Mapping[str, Any] | None = None,
        fast_dev_run: bool = False,
        max_samples: int | None = None,
        layer_wise_feature_save_path: str | None = None,
        layer_wise_feature_first_token_only: bool = True,
        layer_wise_feature_max_num: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if layer_wise_feature_save_path is not None:
            raise InputError(
                f"layer_wise_feature_save_path={layer_wise_feature_save_path} asks for FusionBench's layer-wise feature dump, "
                "which fusion_bench does not support; set it to null"
            )
        if not test_datasets:
            raise InputError("the task pool has no test_datasets; list them as <task>: <dataset>")
        self._test_datasets = dict(test_datasets.items())
        self.tasks: dict[str, ClassificationTask] = {name: classification_task(name) for name in self._test_datasets}
        self._clip_spec = plain(clip_model) if clip_model is not None else base_model
        self._base_name = self._clip_spec if isinstance(self._clip_spec, str) else base_model  # for messages
        self._clip_key = "base_model" if clip_model is None else "clip_model"  # the key messages name
        self._processor_spec = plain(processor) if processor is not None else base_model
        self._data_processor_spec = plain(data_processor) if data_processor is not None else self._processor_spec
        self.dataloader_kwargs = check_dataloader_kwargs(plain(dataloader_kwargs) or {})
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
            raise InputError(f"max_samples={max_samples!r} must be a positive integer, or null for every sample")
        self.fast_dev_run = bool(fast_dev_run)
        self.max_samples = max_samples
        self.head_cache = HeadCache(cache_dir("clip_zeroshot_heads"))
        self._clip: nn.Module | None = None
        self._processor: Any = None
        self._data_processor: Any = None
        self._text_digest: str | None = None
        self._heads: dict[str, Tensor] = {}
        self._datasets: dict[str, Any] = {}

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        """Before merging: the pool's base tower must fit `base_model` (read from config files only)."""
        clip_path = _pretrained_path(self._clip_spec)
        if clip_path is None:
            return  # a clip_model built by some other config: checked on the merged model
        base = _read_config(clip_path, f"the task pool's {self._clip_key}")
        if base is None or base.model_type != "clip":
            raise InputError(f"the task pool's {self._clip_key} {clip_path!r} is not a CLIP model; name a CLIPModel's hub id or folder")
        name = PRETRAINED if modelpool.has_pretrained else modelpool.model_names[0]
        spec = modelpool.model_spec(name)
        if isinstance(spec, nn.Module):
            tower = getattr(spec, "config", None)
        elif isinstance(spec, str) and not spec.endswith(".safetensors"):
            tower = _read_config(spec, f"model {name!r}")
        else:
            return
        tower = tower.vision_config if getattr(tower, "model_type", None) == "clip" else tower
        check_tower_fits(tower, base.vision_config, self._base_name, what=f"the pool's model {name!r}")

    def prepare(self) -> None:
        """Before merging: every test set loads and has the task's classes; the processors' configs read."""
        for spec, key in ((self._processor_spec, "processor"), (self._data_processor_spec, "data_processor")):
            path = _pretrained_path(spec)
            if path is not None:
                _read_config(path, f"the task pool's {key}")
        for task in self.tasks:
            self.dataset(task)

    def local_paths(self) -> dict[str, Path]:
        specs = {"base_model": self._clip_spec, "processor": self._processor_spec, "data_processor": self._data_processor_spec, "test_datasets": self._test_datasets}
        return {f"the task pool's {where}": path for key, spec in specs.items() for where, path in local_paths_in(spec, key).items()}

    def task_names(self) -> list[str]:
        return list(self.tasks)

    @torch.no_grad()
    def evaluate_tasks(self, model: nn.Module, fabric: Any = None, tasks: Sequence[str] | None = None) -> TaskMetrics:
        clip = self._load_clip()
        check_tower_fits(getattr(model, "config", None), clip.config.vision_config, self._base_name)
        device = fabric.device if fabric is not None else torch.device("cpu")
        model.eval()
        tower = model.to(device)
        projection = clip.visual_projection.to(device)
        logit_scale = clip.logit_scale.exp().to(device)
        transform = CLIPImageTransform(self._load_data_processor())
        autocast = fabric.autocast if fabric is not None else nullcontext
        results = {}
        for task in self.tasks if tasks is None else tasks:
            head = self.head(task, device)

            def logits_of(images: Tensor, head: Tensor = head) -> Tensor:
                with autocast():
                    embeddings = projection(tower(pixel_values=images).pooler_output)
                return logit_scale * F.normalize(embeddings.float(), dim=-1) @ head.T

            results[task] = score_images(task, self.dataset(task), self._indices(task), transform, logits_of, self.dataloader_kwargs, device, fabric)
        return results

    def head(self, task: str, device: torch.device) -> Tensor:
        """Task `task`'s zero-shot head on `device`: from memory, else the disk cache, else computed."""
        if task not in self._heads:
            clip, tokenizer = self._load_clip(), self._load_processor().tokenizer
            if self._text_digest is None:
                self._text_digest = text_tower_digest(clip, tokenizer)
            key = head_key(self._text_digest, self.tasks[task])
            head = self.head_cache.load(key)
            if head is None:
                clip.text_model.to(device)
                clip.text_projection.to(device)
                head = compute_head(clip, tokenizer, self.tasks[task], device, description=task)
                self.head_cache.save(key, head, {"task": task, "base_model": self._base_name})
            self._heads[task] = head
        return self._heads[task].to(device)

    def dataset(self, task: str) -> Any:
        """The test dataset of `task`, loaded once and checked against the task's classes."""
        if task not in self._datasets:
            self._datasets[task] = load_test_dataset(task, self.tasks[task], self._test_datasets[task])
        return self._datasets[task]

    def _indices(self, task: str) -> list[int]:
        indices = evaluation_indices(len(self.dataset(task)), self.max_samples)
        return indices[: self.dataloader_kwargs["batch_size"]] if self.fast_dev_run else indices

    def _load_clip(self) -> nn.Module:
        if self._clip is None:
            clip = _load_pretrained(self._clip_spec, "transformers.CLIPModel", self._clip_key).eval().requires_grad_(False)
            clip.vision_model = None  # the merged tower stands in for it; free its memory (1.2 GB for ViT-L/14)
            self._clip = clip
        return self._clip

    def _load_processor(self) -> Any:
        if self._processor is None:
            self._processor = _load_pretrained(self._processor_spec, "transformers.CLIPProcessor", "processor")
        return self._processor

    def _load_data_processor(self) -> Any:
        """The image processor: data_processor's (a CLIPProcessor's image part, or an image processor)."""
        if self._data_processor is None:
            if self._data_processor_spec == self._processor_spec:
                processor = self._load_processor()
            else:
                processor = _load_pretrained(self._data_processor_spec, "transformers.CLIPProcessor", "data_processor")
            self._data_processor = getattr(processor, "image_processor", processor)
        return self._data_processor


def _pretrained_path(spec: Any) -> str | None:
    """The hub id or folder a model spec loads: itself, or a from_pretrained config's
    pretrained_model_name_or_path (FusionBench's form); None for other configs."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Mapping) and str(spec.get("_target_", "")).endswith(".from_pretrained"):
        path = spec.get("pretrained_model_name_or_path")
        return path if isinstance(path, str) else None
    return None


def _load_pretrained(spec: Any, class_path: str, key: str) -> Any:
    """A `_target_` config, or a hub id or folder loaded with `class_path`.from_pretrained."""
    try:
        if isinstance(spec, Mapping):
            return instantiate(spec)
        return get_class(class_path).from_pretrained(spec)
    except InstantiationException as error:
        cause = error.__cause__ or error
        raise InputError(f"the task pool's {key} cannot be built ({type(cause).__name__}: {first_line(cause)}); check its config") from None
    except OSError as error:
        raise InputError(f"the task pool's {key} {spec!r} cannot be loaded ({first_line(error)}); check the hub id or folder") from error


def _read_config(spec: str, what: str) -> Any:
    """The transformers config of a hub id or folder (config.json only, no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(spec)
    except OSError as error:
        raise InputError(f"{what} {spec!r} has no readable config ({first_line(error)}); check the hub id or folder") from error
    except ValueError:  # a config.json that is no transformers model
        return None
