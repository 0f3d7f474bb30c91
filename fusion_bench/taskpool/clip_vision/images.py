"""Image classification data as CLIP input, in batches.

The CLIP image processor's steps are split in two. The per-image part (RGB, resize of the shortest
edge, centre crop) runs in DataLoader workers and yields uint8 arrays: four times fewer bytes to
move than floats. The per-pixel part (rescale, normalise) runs once per batch on the device. The
result equals the processor's (transformers' PIL backend, which FusionBench uses) to float rounding.
"""

import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fusion_bench.utils.errors import InputError


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
