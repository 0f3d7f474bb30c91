"""What the fixture scripts share: small pools of one nn.Module architecture, as state dicts, turned
into modules for the reference and recorded under "input/<pool>/<model>/<key>" (the layout that
tests/recorded_merges.py reads back)."""

from collections.abc import Callable

import torch
from torch import nn

StateDicts = dict[str, dict[str, torch.Tensor]]


def as_modules(pool: StateDicts, make_module: Callable[[], nn.Module]) -> dict[str, nn.Module]:
    modules = {}
    for name, state_dict in pool.items():
        modules[name] = make_module()
        modules[name].load_state_dict(state_dict)
    return modules


def record_pool(tensors: dict[str, torch.Tensor], kind: str, pool: StateDicts) -> None:
    for name, state_dict in pool.items():
        for key, value in state_dict.items():
            tensors[f"input/{kind}/{name}/{key}"] = value.clone()
