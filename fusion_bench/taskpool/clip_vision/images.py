"""Image classification data as CLIP input, in batches; the test datasets and DataLoader settings
both image task pools (CLIP's and open_clip's) take, checked the same way.

The CLIP image processor's steps are split in two. The per-image part (RGB, resize of the shortest
edge, centre crop) runs in DataLoader workers and yields uint8 arrays: four times fewer bytes to
move than floats. The per-pixel part (rescale, normalise) runs once per batch on the device. The
result equals the processor's (transformers' PIL backend, which FusionBench uses) to float rounding.
"""

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fusion_bench.tasks.clip_classification import ClassificationTask
from fusion_bench.utils.dataset_loading import load_dataset_spec
from fusion_bench.utils.errors import InputError

_DATALOADER_DEFAULTS = {"batch_size": 128, "num_workers": 8, "pin_memory": True, "prefetch_factor": 2}
_DATALOADER_FIXED = {"shuffle": False, "drop_last": False}  # accepted as in FusionBench's YAML; other values change the metrics


def _size_field(size: Any, key: str) -> int | None:
    """One entry of an image processor's size: a dict in transformers 4.x, a SizeDict in 5.x."""
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class CLIPImageTransform:
    """The steps of a CLIP image processor (`CLIPProcessor.image_processor`)."""

    def __init__(self, image_processor: Any):
        p = image_processor
        self.shortest_edge = _size_field(p.size, "shortest_edge") if p.do_resize else None
        if p.do_resize and not self.shortest_edge:
            raise InputError(f"the image processor resizes to {p.size}; CLIP's resize the shortest edge, and only those are supported")
        self.crop = (_size_field(p.crop_size, "height"), _size_field(p.crop_size, "width")) if p.do_center_crop else None
        self.resample = Image.Resampling(int(p.resample))
        self.scale = float(p.rescale_factor) if p.do_rescale else 1.0
        mean = p.image_mean if p.do_normalize else (0.0, 0.0, 0.0)
        std = p.image_std if p.do_normalize else (1.0, 1.0, 1.0)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to_uint8(self, image: Image.Image) -> np.ndarray:
        """One image, resized and cropped: uint8, channels first."""
        image = image.convert("RGB")  # as FusionBench does, before the processor
        if self.shortest_edge:
            image = image.resize(_shortest_edge_size(image.size, self.shortest_edge), resample=self.resample)
        array = np.asarray(image)
        if self.crop:
            array = _center_crop(array, *self.crop)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def normalize(self, images: Tensor) -> Tensor:
        """A batch of uint8 images (on any device) as the model's float32 pixel values."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        return (images.float() * self.scale - mean) / std


def _shortest_edge_size(size: tuple[int, int], shortest: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shortest`, the longer rounded down, as transformers does."""
    width, height = size
    if width <= height:
        return shortest, int(shortest * height / width)
    return int(shortest * width / height), shortest


def _center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre (height, width) of an HWC array, zero-padded evenly where the image is smaller."""
    pad_h, pad_w = max(height - array.shape[0], 0), max(width - array.shape[1], 0)
    if pad_h or pad_w:
        array = np.pad(array, ((math.ceil(pad_h / 2), pad_h // 2), (math.ceil(pad_w / 2), pad_w // 2), (0, 0)))
    top, left = (array.shape[0] - height) // 2, (array.shape[1] - width) // 2
    return array[top : top + height, left : left + width]


class ImageBatches(torch.utils.data.Dataset):
    """An image classification dataset read in batches: item i is (uint8 images, labels) of batch i.

    Rows are dicts with `image` and `label` (Hugging Face datasets) or (image, label) pairs.
    Giving the DataLoader whole batches (batch_size=None) lets each worker build a batch in one go.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], batch_size: int, transform: CLIPImageTransform):
        self.dataset = dataset
        self.indices = list(indices)
        self.batch_size = batch_size
        self.transform = transform

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def __getitem__(self, batch: int) -> tuple[Tensor, Tensor]:
        return self.batch_of(self.batch_indices(batch))

    def batch_indices(self, batch: int) -> list[int]:
        """The dataset rows of batch `batch`."""
        return self.indices[batch * self.batch_size : (batch + 1) * self.batch_size]

    def batch_of(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(uint8 images, labels) of the dataset's rows `indices`."""
        rows = [self.dataset[i] for i in indices]
        pairs = [(row["image"], row["label"]) if isinstance(row, dict) else row for row in rows]
        images = np.stack([self.transform.to_uint8(image) for image, _ in pairs])
        labels = torch.tensor([int(label) for _, label in pairs], dtype=torch.long)
        return torch.from_numpy(images), labels


def evaluation_indices(size: int, max_samples: int | None, seed: int = 0) -> list[int]:
    """Which rows to score: all, or `max_samples` drawn at random with a fixed seed (test sets are
    often sorted by class, so the first rows would be a biased sample), in row order."""
    if max_samples is None or max_samples >= size:
        return list(range(size))
    return sorted(random.Random(seed).sample(range(size), max_samples))


def check_dataloader_kwargs(given: Mapping[str, Any]) -> dict[str, Any]:
    """A task pool's dataloader_kwargs, checked, with the defaults for what `given` leaves out."""
    for key, value in given.items():
        if key in _DATALOADER_FIXED and value != _DATALOADER_FIXED[key]:
            raise InputError(f"dataloader_kwargs.{key}={value!r} would change the metrics; evaluation uses {key}={_DATALOADER_FIXED[key]}")
        if key not in _DATALOADER_FIXED and key not in _DATALOADER_DEFAULTS:
            raise InputError(f"dataloader_kwargs has an unknown key {key!r}; its keys are: {', '.join(_DATALOADER_DEFAULTS)}")
    kwargs = {**_DATALOADER_DEFAULTS, **{k: v for k, v in given.items() if k in _DATALOADER_DEFAULTS}}
    if not isinstance(kwargs["batch_size"], int) or kwargs["batch_size"] < 1:
        raise InputError(f"dataloader_kwargs.batch_size={kwargs['batch_size']!r} must be a positive integer")
    if not isinstance(kwargs["num_workers"], int) or kwargs["num_workers"] < 0:
        raise InputError(f"dataloader_kwargs.num_workers={kwargs['num_workers']!r} must be 0 (load in this process) or more")
    return kwargs


def load_test_dataset(name: str, task: ClassificationTask, spec: Any) -> Any:
    """The test dataset `spec` of task `name`, checked: one split, columns `image` and `label`, as
    many classes as the task has class names (where the dataset says), and not empty."""
    dataset = load_dataset_spec(name, spec, "test")
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, dict):  # a DatasetDict: load_dataset without `split`
        raise InputError(f"the test dataset of {name!r} has splits {', '.join(columns)}; choose one, e.g. split: test")
    if columns is not None and not {"image", "label"} <= set(columns):
        raise InputError(f"the test dataset of {name!r} has columns {columns}; it needs `image` and `label`")
    label = getattr(dataset, "features", {}).get("label") if columns is not None else None
    classes = len(task.classnames)
    if getattr(label, "num_classes", classes) != classes:
        raise InputError(f"the test dataset of {name!r} has {label.num_classes} classes, but task {name!r} has {classes} class names; is it that task's dataset?")
    if len(dataset) == 0:
        raise InputError(f"the test dataset of {name!r} is empty")
    return dataset
