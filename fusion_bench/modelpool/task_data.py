"""What a method that learns from data sees of a task: ready batches and the task's logits.

The model pool owns how raw examples become model inputs (CLIP's image processor, a tokenizer, a
prompt template) and how a model's output becomes class logits (a zero-shot head). A method only
iterates batches and calls `logits(model, batch)`, for any model of the pool's architecture; so
Fisher merging, RegMean and AdaMerging run unchanged on CLIP towers and on text encoders.

Splits: "train" holds calibration examples (with labels), "test" the unlabeled test inputs that
test-time methods (AdaMerging) adapt on; their labels are never handed out.
"""

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from fusion_bench.utils.errors import InputError

SPLITS = ("train", "test")


class Batch(NamedTuple):
    """inputs: the keyword arguments of the model's forward; labels: None for unlabeled inputs."""

    inputs: dict[str, Tensor]
    labels: Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        labels = None if self.labels is None else self.labels.to(device)
        return Batch({key: value.to(device) for key, value in self.inputs.items()}, labels)

    def __len__(self) -> int:  # the examples in the batch
        return len(next(iter(self.inputs.values())))


class Batches(torch.utils.data.Dataset):
    """Item i is batch i, built on access (`make(indices)`), so large test sets are never held in
    memory; a DataLoader with batch_size=None builds them in workers."""

    def __init__(self, indices: list[int], batch_size: int, make: Callable[[list[int]], Batch]):
        self.indices, self.batch_size, self.make = indices, batch_size, make

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.make(self.indices[i * self.batch_size : (i + 1) * self.batch_size])


@dataclass
class TaskData:
    """One task's examples for a method.

    batches: the drawn examples in batches (a map-style Dataset of Batch).
    head: (model output, batch) -> logits [examples, classes]; an nn.Module, so `.to(device)` works.
    fingerprint: a hash of everything the batches and the head were built from (data, processor,
        examples drawn, head), for keys of statistics caches.
    """

    task: str
    split: str
    batches: Batches
    head: nn.Module
    fingerprint: str

    @property
    def num_examples(self) -> int:
        return len(self.batches.indices)

    def logits(self, model: Callable[..., Any], batch: Batch) -> Tensor:
        """The task's class logits of `model` (any module of the pool's architecture, or a
        functional call of one) on `batch`."""
        return self.head(model(**batch.inputs), batch)

    def to(self, device: torch.device | str) -> "TaskData":
        self.head.to(device)
        return self


def draw_indices(size: int, num_examples: int | None, seed: int) -> list[int]:
    """`num_examples` rows of a dataset of `size` (all for None), in an order shuffled with `seed`:
    datasets are often sorted by class, so the first rows would be a biased sample."""
    order = list(range(size))
    random.Random(seed).shuffle(order)
    return order if num_examples is None else order[:num_examples]


def check_data_request(split: str, num_examples: int | None, batch_size: int, what: str) -> None:
    """One-line errors for a bad request, before any data is read."""
    if split not in SPLITS:
        raise InputError(f"{what}: split={split!r} is unknown; use train (calibration examples) or test (unlabeled test inputs)")
    if num_examples is not None and (isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 1):
        raise InputError(f"{what}: the number of examples must be a positive integer, got {num_examples!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"{what}: batch_size={batch_size!r} must be a positive integer")


def check_enough_examples(task: str, split: str, available: int, num_examples: int | None, what: str) -> None:
    if available == 0:
        raise InputError(f"{what}: the {split} data of task {task!r} is empty")
    if num_examples is not None and available < num_examples:
        raise InputError(
            f"{what} asks for {num_examples} {split} examples of task {task!r}, which has {available}; "
            f"ask for at most {available}, or give a larger dataset"
        )


def dataset_source(spec: Any) -> Any:
    """A JSON-able description of a dataset spec, for fingerprints (configs and paths as given)."""
    if isinstance(spec, Mapping):
        return {str(key): dataset_source(value) for key, value in spec.items()}
    if isinstance(spec, (str, int, float, bool)) or spec is None:
        return spec
    return getattr(spec, "_fingerprint", None) or f"{type(spec).__name__}:{id(spec)}"
