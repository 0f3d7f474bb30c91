"""What methods that learn from data share: their data keys, checked, and batches on a device."""

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch.utils.data import DataLoader

from fusion_bench.modelpool.base import PRETRAINED
from fusion_bench.modelpool.lazy_state_dict import LazyStateDict
from fusion_bench.modelpool.task_data import Batch, TaskData
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain
from fusion_bench.utils.key_checks import check_string_list

# FusionBench's dataloader_kwargs defaults, as a constructor default (read-only); reports compare
# a config's value to it, so a config that repeats it is not marked as changed.
DATALOADER_DEFAULTS = MappingProxyType({"batch_size": 32, "num_workers": 0})


@dataclass(frozen=True)
class DataloaderSettings:
    """FusionBench's `dataloader_kwargs`: batch_size, and num_workers that build batches in parallel."""

    batch_size: int = 32
    num_workers: int = 0

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any] | None, default_batch_size: int = 32) -> "DataloaderSettings":
        given = dict(plain(kwargs) or {})
        unknown = [key for key in given if key not in ("batch_size", "num_workers")]
        if unknown:
            raise InputError(f"dataloader_kwargs has an unknown key {unknown[0]!r}; its keys are batch_size and num_workers")
        settings = cls(given.get("batch_size", default_batch_size), given.get("num_workers", 0))
        if isinstance(settings.batch_size, bool) or not isinstance(settings.batch_size, int) or settings.batch_size < 1:
            raise InputError(f"dataloader_kwargs.batch_size={settings.batch_size!r} must be a positive integer")
        if isinstance(settings.num_workers, bool) or not isinstance(settings.num_workers, int) or settings.num_workers < 0:
            raise InputError(f"dataloader_kwargs.num_workers={settings.num_workers!r} must be 0 (build batches in this process) or more")
        return settings


def check_num_examples(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{key}={value!r} must be a positive number of examples, e.g. {key}=256")
    return value


def check_seed(value: Any, purpose: str = "it chooses which examples are drawn") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"seed={value!r} must be an integer: {purpose}")
    return value


def check_param_regexes(patterns: Any) -> list[str]:
    """FusionBench's exclude_param_names_regex: a list of regular expressions."""
    patterns = check_string_list(patterns, "exclude_param_names_regex", "regular expressions", "['.*layer_norm.*']")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise InputError(f"exclude_param_names_regex has {pattern!r}, which is not a regular expression: {error}") from None
    return patterns


def excluded_keys(pretrained: LazyStateDict, patterns: Sequence[str]) -> set[str]:
    """Keys any of whose names a pattern matches (re.match, as FusionBench); each pattern must match one."""
    excluded = set()
    for pattern in patterns:
        matched = {key for key in pretrained for alias in pretrained.aliases(key) if re.match(pattern, alias)}
        if not matched:
            raise InputError(f"exclude_param_names_regex has {pattern!r}, which matches no parameter of {PRETRAINED!r} (re.match: from the name's start)")
        excluded |= matched
    return excluded


def device_batches(data: TaskData, settings: DataloaderSettings, device: torch.device) -> Iterator[Batch]:
    """The task's batches in order, built in `settings.num_workers` workers, moved to `device`."""
    workers = min(settings.num_workers, len(data.batches))
    loader = DataLoader(data.batches, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")
    for batch in loader:
        yield Batch(*batch).to(device)
