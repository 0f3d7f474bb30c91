"""Image classification with task_vectors' ImageEncoders (open_clip) and their classification heads."""

import hashlib
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool
from fusion_bench.modelpool.open_clip_vision import OpenCLIPVisionModelPool, load_classification_head
from fusion_bench.models.open_clip import OPEN_CLIP_SCHEMAS, ClassificationHead, import_open_clip
from fusion_bench.taskpool.base import BaseTaskPool, TaskMetrics
from fusion_bench.taskpool.clip_vision.images import check_dataloader_kwargs, evaluation_indices, load_test_dataset
from fusion_bench.taskpool.clip_vision.scoring import score_images
from fusion_bench.taskpool.clip_vision.zeroshot_heads import HeadCache, head_key
from fusion_bench.tasks.clip_classification import ClassificationTask, classification_task
from fusion_bench.utils.cache import cache_dir
from fusion_bench.utils.errors import InputError, first_line
from fusion_bench.utils.instantiation import plain
from fusion_bench.utils.local_paths import local_paths_in
from fusion_bench.utils.progress import progress_bar

_TO_TENSOR = ("ToTensor", "MaybeToTensor")  # open_clip's evaluation transforms end: ..., to tensor, Normalize
_PROMPTS_PER_BATCH = 256


class OpenCLIPVisionModelTaskPool(BaseTaskPool):
    """Scores an image encoder (task_vectors' ImageEncoder: images → embeddings) with each task's
    classification head: accuracy, and cross-entropy averaged over samples.

    test_datasets: task name → dataset with columns `image` and `label`.
    classification_heads: task → head_<Task>.pt (a pickled ClassificationHead, read without
        running it). A task without one gets the zero-shot head of open_clip's `model_name` with
        `pretrained` weights (a tag such as "openai", or a local checkpoint file; a "local-dir:"
        model_name brings its own): the task's class names in its prompt templates through the
        text tower, normalised, averaged, times the logit scale, as task_vectors builds its heads;
        computed once and cached on disk.
    model_name / model_dir: FusionBench's keys (the base model's open_clip name; the folder the
        paths are written under).
    dataloader_kwargs: batch_size, num_workers, pin_memory, prefetch_factor (shuffle and drop_last
        accepted as False).
    fast_dev_run: score one batch per task. max_samples: at most this many images per task, drawn
        at random with a fixed seed.

    Images are prepared as the model's own `val_preprocess` (open_clip's evaluation transform)
    prepares them: resize and crop in the DataLoader's workers, normalisation per batch on the device.
    """

    uses_fabric = True
    shards_across_processes = True

    def __init__(
        self,
        test_datasets: Mapping[str, Any],
        *,
        classification_heads: Mapping[str, Any] | None = None,
        dataloader_kwargs: Mapping[str, Any] | None = None,
        model_name: str | None = None,
        model_dir: str | None = None,
        pretrained: str = "openai",
        fast_dev_run: bool = False,
        max_samples: int | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        if not test_datasets:
            raise InputError("the task pool has no test_datasets; list them as <task>: <dataset>")
        self._test_datasets = dict(test_datasets.items())
        self.tasks: dict[str, ClassificationTask] = {name: classification_task(name) for name in self._test_datasets}
        self._head_specs = dict(plain(classification_heads) or {})
        headless = [task for task in self.tasks if task not in self._head_specs]
        if headless and model_name is None:
            raise InputError(
                f"task {headless[0]!r} has no classification head; add its head_<Task>.pt under classification_heads, "
                "or set model_name (and pretrained) to build zero-shot heads"
            )
        self.model_name = model_name
        self.model_dir = model_dir
        self.pretrained = pretrained
        self.dataloader_kwargs = check_dataloader_kwargs(plain(dataloader_kwargs) or {})
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
            raise InputError(f"max_samples={max_samples!r} must be a positive integer, or null for every sample")
        self.fast_dev_run = bool(fast_dev_run)
        self.max_samples = max_samples
        self.head_cache = HeadCache(cache_dir("open_clip_zeroshot_heads"))
        self._heads: dict[str, ClassificationHead] = {}
        self._datasets: dict[str, Any] = {}
        self._text: tuple[nn.Module, Any, str] | None = None  # the text tower, its tokenizer and digest, for zero-shot heads

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        """Before merging: the heads read here take the pool's embeddings (read from shapes only)."""
        if not isinstance(modelpool, OpenCLIPVisionModelPool):
            return
        name = PRETRAINED if modelpool.has_pretrained else modelpool.model_names[0]
        state_dict = modelpool.state_dict(name)
        if "model.visual.proj" not in state_dict:
            return
        embed_dim = state_dict.shape("model.visual.proj")[1]
        for task in self._head_specs:
            features = self.head(task).in_features
            if features != embed_dim:
                raise InputError(f"the classification head of {task!r} takes {features} features, but the pool's model {name!r} gives {embed_dim}; are they of the same model?")

    def prepare(self) -> None:
        """Before merging: every test set loads and has the task's classes, and so does every head read."""
        for task in self.tasks:
            self.dataset(task)
            if task in self._head_specs:
                classes, expected = self.head(task).out_features, len(self.tasks[task].classnames)
                if classes != expected:
                    raise InputError(f"the classification head of {task!r} has {classes} classes, but task {task!r} has {expected}; is it that task's head?")

    def local_paths(self) -> dict[str, Path]:
        specs = {"test_datasets": self._test_datasets, "classification_heads": self._head_specs, "model_dir": self.model_dir, "pretrained": self.pretrained}
        return {f"the task pool's {where}": path for key, spec in specs.items() for where, path in local_paths_in(spec, key).items()}

    def task_names(self) -> list[str]:
        return list(self.tasks)

    @torch.no_grad()
    def evaluate_tasks(self, model: nn.Module, fabric: Any = None, tasks: Sequence[str] | None = None) -> TaskMetrics:
        preprocess = getattr(model, "val_preprocess", None)
        if preprocess is None:
            raise InputError(f"the model ({type(model).__name__}) has no val_preprocess; score an ImageEncoder of OpenCLIPVisionModelPool")
        transform = OpenCLIPImageTransform(preprocess)
        device = fabric.device if fabric is not None else torch.device("cpu")
        encoder = model.eval().to(device)
        autocast = fabric.autocast if fabric is not None else nullcontext
        results = {}
        for task in self.tasks if tasks is None else tasks:
            head = self.head(task).to(device)

            def logits_of(images: Tensor, head: ClassificationHead = head) -> Tensor:
                with autocast():
                    features = encoder(images)
                return head(features.float())

            results[task] = score_images(task, self.dataset(task), self._indices(task), transform, logits_of, self.dataloader_kwargs, device, fabric)
        return results

    def head(self, task: str) -> ClassificationHead:
        """Task `task`'s head: its classification_heads entry, else the zero-shot head (disk cache, else computed)."""
        if task not in self._heads:
            if task in self._head_specs:
                head = load_classification_head(self._head_specs[task], f"the classification head of {task!r}")
            else:
                head = self._zero_shot_head(task)
            self._heads[task] = head.eval().requires_grad_(False)
        return self._heads[task]

    def dataset(self, task: str) -> Any:
        """The test dataset of `task`, loaded once and checked against the task's classes."""
        if task not in self._datasets:
            self._datasets[task] = load_test_dataset(task, self.tasks[task], self._test_datasets[task])
        return self._datasets[task]

    def _zero_shot_head(self, task: str) -> ClassificationHead:
        clip, tokenizer, digest = self._text_tower()
        key = head_key(digest, self.tasks[task])
        weights = self.head_cache.load(key)
        if weights is None:
            weights = zero_shot_weights(clip, tokenizer, self.tasks[task], description=task)
            self.head_cache.save(key, weights, {"task": task, "model_name": self.model_name, "pretrained": str(self.pretrained)})
        return ClassificationHead(True, weights)

    def _text_tower(self):
        """open_clip's `model_name` with `pretrained` weights (its image tower dropped), its
        tokenizer, and a hash of what heads are computed from."""
        if self._text is None:
            open_clip = import_open_clip()
            pretrained = None if self.model_name.startswith(OPEN_CLIP_SCHEMAS) else self.pretrained  # such a model brings its weights
            tag = open_clip.get_pretrained_cfg(self.model_name, pretrained) if pretrained else {}
            try:  # OpenAI's weights need QuickGELU, which open_clip's configs of the same names lack
                clip = open_clip.create_model(self.model_name, pretrained=pretrained, force_quick_gelu=bool(tag.get("quick_gelu")))
            except (RuntimeError, OSError, ValueError) as error:
                raise InputError(
                    f"the zero-shot heads' text tower, open_clip {self.model_name} with pretrained={self.pretrained!r}, cannot be built "
                    f"({first_line(error)}); give a local checkpoint file as pretrained, or every task's classification head"
                ) from None
            clip.visual = None
            clip.eval().requires_grad_(False)
            digest = hashlib.sha256(f"open_clip:{self.model_name}".encode())
            for key, tensor in clip.state_dict().items():
                tensor = tensor.detach().cpu().contiguous()
                digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(-1).view(torch.uint8).numpy())
            self._text = clip, open_clip.get_tokenizer(self.model_name), digest.hexdigest()
        return self._text

    def _indices(self, task: str) -> list[int]:
        indices = evaluation_indices(len(self.dataset(task)), self.max_samples)
        return indices[: self.dataloader_kwargs["batch_size"]] if self.fast_dev_run else indices


@torch.no_grad()
def zero_shot_weights(clip: nn.Module, tokenizer: Any, task: ClassificationTask, description: str = "") -> Tensor:
    """task_vectors' zero-shot head weights: per class, the prompts' text embeddings normalised,
    averaged and normalised again, times exp(logit_scale); (classes × embedding), float32."""
    prompts = task.prompts()
    embeddings = []
    for start in progress_bar(range(0, len(prompts), _PROMPTS_PER_BATCH), desc=f"zero-shot head {description}".strip()):
        embeddings.append(clip.encode_text(tokenizer(prompts[start : start + _PROMPTS_PER_BATCH])).float())
    per_prompt = F.normalize(torch.cat(embeddings), dim=-1)
    per_class = F.normalize(per_prompt.view(len(task.classnames), len(task.templates), -1).mean(dim=1), dim=-1)
    return (clip.logit_scale.exp().float() * per_class).contiguous()


class OpenCLIPImageTransform:
    """open_clip's evaluation transform split in two, as the CLIP task pool splits the CLIP
    processor: the steps before to-tensor (resize, crop, RGB) per image, giving uint8 arrays, in
    the DataLoader's workers; to-tensor's scaling and Normalize per batch, on the device. The
    result equals the transform's own to float rounding."""

    def __init__(self, preprocess: Any):
        steps = list(getattr(preprocess, "transforms", [preprocess]))
        names = [type(step).__name__ for step in steps]
        cut = next((i for i, name in enumerate(names) if name in _TO_TENSOR), None)
        if cut is None or names[cut + 1 :] != ["Normalize"]:
            raise InputError(f"the model's val_preprocess ({', '.join(names)}) does not end with to-tensor and Normalize, as open_clip's evaluation transforms do")
        self.image_steps = steps[:cut]
        normalize = steps[-1]
        self.mean = torch.tensor(normalize.mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(normalize.std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        for step in self.image_steps:
            image = step(image)
        array = np.asarray(image.convert("RGB") if image.mode != "RGB" else image)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def normalize(self, images: Tensor) -> Tensor:
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() / 255 - mean) / std
