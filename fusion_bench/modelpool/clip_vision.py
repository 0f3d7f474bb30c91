"""CLIP vision towers (transformers.CLIPVisionModel) by name, read from FusionBench's YAML unchanged.

    _target_: fusion_bench.modelpool.CLIPVisionModelPool
    _recursive_: false
    processor: openai/clip-vit-base-patch32
    models: {_pretrained_: openai/clip-vit-base-patch32, sun397: tanganke/clip-vit-base-patch32_sun397}
    platform: hf

`_pretrained_` may be a full CLIPModel checkpoint (the openai/* ones are): the vision tower is read
out of it, lazily like every other model, and the text tower is never loaded.
"""

import copy
from collections.abc import Mapping
from typing import Any

import torch
from hydra.utils import instantiate

from fusion_bench.modelpool.base import PRETRAINED
from fusion_bench.modelpool.huggingface import AutoModelPool
from fusion_bench.modelpool.task_data import Batch, Batches, TaskData, check_data_request, check_enough_examples, dataset_source, draw_indices
from fusion_bench.models.task_heads import CLIPZeroShotHead
from fusion_bench.taskpool.clip_vision.images import CLIPImageTransform, ImageBatches
from fusion_bench.taskpool.clip_vision.zeroshot_heads import HeadCache, compute_head, head_key, text_tower_digest
from fusion_bench.tasks.clip_classification import classification_task
from fusion_bench.utils.cache import cache_dir, fingerprint
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain

_PLATFORMS = ("hf", "huggingface")


class CLIPVisionModelPool(AutoModelPool):
    """An AutoModelPool of CLIPVisionModel, with the CLIP processor and image datasets of its tasks.

    processor: hub id or folder of the CLIPProcessor (or a `_target_` config).
    platform: where hub ids live; only the Hugging Face hub ("hf") is supported.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        processor: str | Mapping[str, Any] | None = None,
        platform: str = "hf",
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ):
        if platform not in _PLATFORMS:
            raise InputError(
                f"platform={platform!r} is not supported: fusion_bench reads models from the Hugging Face hub "
                "(platform: hf) or from local folders; download the models and list their folders"
            )
        super().__init__(
            models,
            model_class="transformers.CLIPVisionModel",
            train_datasets=train_datasets,
            val_datasets=val_datasets,
            test_datasets=test_datasets,
        )
        self.platform = platform
        self._processor = plain(processor)

    def load_processor(self):
        """The CLIPProcessor (image processor and tokenizer) named by `processor`."""
        if self._processor is None:
            raise InputError("the model pool has no `processor`; set it to the CLIP model's hub id or folder")
        if isinstance(self._processor, Mapping):
            return instantiate(self._processor)
        from transformers import CLIPProcessor

        try:
            return CLIPProcessor.from_pretrained(self._processor)
        except OSError as error:
            raise InputError(f"processor {self._processor!r} cannot be loaded ({error}); check the hub id or folder") from error

    def check_task_data(self, split: str, what: str) -> None:
        check_data_request(split, None, 1, what)
        datasets = self._train_datasets if split == "train" else self._test_datasets
        key = f"{split}_datasets"
        missing = [task for task in self.model_names if task not in (datasets or {})]
        if missing:
            raise InputError(f"{what} needs the {split} images of every task, but the model pool's {key} lacks {missing[0]!r}; add it under {key}")
        if self._processor is None:
            raise InputError(f"{what} prepares images with the pool's processor; set `processor` to the CLIP model's hub id or folder")
        if not self.has_pretrained:
            raise InputError(f"{what} builds zero-shot heads from the base CLIP model; add `_pretrained_: <CLIP model>` under `models`")

    def task_data(self, task: str, *, split: str, num_examples: int | None, batch_size: int, seed: int = 0) -> TaskData:
        """Images of `task` from train_datasets ("train", with labels) or test_datasets ("test",
        unlabeled), prepared by the pool's processor as the task pool prepares them; the head is the
        zero-shot head of the `_pretrained_` CLIP model's text tower (as FusionBench's methods use)."""
        what = f"the {split} images of {task!r}"
        check_data_request(split, num_examples, batch_size, what)
        self.check_task_data(split, "the method")
        dataset = self.load_train_dataset(task) if split == "train" else self.load_test_dataset(task)
        check_enough_examples(task, split, len(dataset), num_examples, "the method")
        drawn = draw_indices(len(dataset), num_examples, seed)
        processor = self.load_processor()  # read from disk on each call: once here
        transform = CLIPImageTransform(getattr(processor, "image_processor", processor))
        images = ImageBatches(dataset, drawn, batch_size, transform)

        def make(indices: list[int]) -> Batch:
            pixels, labels = images.batch_of(indices)
            return Batch({"pixel_values": transform.normalize(pixels)}, labels if split == "train" else None)

        clip, digest = self._zero_shot_parts()
        classes = classification_task(task)
        head_cache = HeadCache(cache_dir("clip_zeroshot_heads"))
        key = head_key(digest, classes)
        class_embeddings = head_cache.load(key)
        if class_embeddings is None:
            class_embeddings = compute_head(clip, processor.tokenizer, classes, torch.device("cpu"), description=task)
            head_cache.save(key, class_embeddings, {"task": task})
        head = CLIPZeroShotHead(copy.deepcopy(clip.visual_projection), float(clip.logit_scale.exp()), class_embeddings)
        source = getattr(dataset, "_fingerprint", None) or dataset_source((self._train_datasets if split == "train" else self._test_datasets)[task])
        data_key = fingerprint("clip", task, split, source, digest, _image_steps(transform), drawn, batch_size)
        return TaskData(task, split, Batches(drawn, batch_size, make), head, data_key)

    def _zero_shot_parts(self):
        """The `_pretrained_` CLIPModel without its vision tower, and its text tower's digest."""
        if getattr(self, "_zero_shot", None) is None:
            clip = self.load_clip_model(PRETRAINED).eval().requires_grad_(False)
            clip.vision_model = None
            self._zero_shot = clip, text_tower_digest(clip, self.load_processor().tokenizer)
        return self._zero_shot

    def load_clip_model(self, name: str):
        """The whole CLIPModel (text tower included) of model `name`, e.g. `_pretrained_`."""
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.model_path(name))


def _image_steps(transform: CLIPImageTransform) -> list:
    """What the image preparation does, for fingerprints."""
    return [transform.shortest_edge, transform.crop, int(transform.resample), transform.scale, transform.mean.flatten().tolist(), transform.std.flatten().tolist()]
