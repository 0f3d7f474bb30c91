"""The reference's recorded merges, read back: tests/data/reference_merges.safetensors
(scripts/make_reference_fixtures.py) and reference_data_free_merges.safetensors
(scripts/make_reference_data_free_fixtures.py), each with its cases in the metadata, the input
pools under "input/<pool>/<model>/<key>" and the reference's outputs under "output/<case>/...".
"""

import json
from collections.abc import Callable, Container
from pathlib import Path

from safetensors import safe_open
from torch import Tensor, nn

DATA = Path(__file__).parent / "data"


def ties_fixture_module() -> nn.Module:  # the architecture in scripts/make_reference_fixtures.py
    return nn.Sequential(nn.Linear(16, 12), nn.LayerNorm(12), nn.Linear(12, 8), nn.Linear(8, 4, bias=False))


def data_free_fixture_module() -> nn.Module:  # the architecture in scripts/make_reference_data_free_fixtures.py
    return nn.Sequential(nn.Linear(24, 16), nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 8, bias=False))


def as_modules(state_dicts: dict[str, dict[str, Tensor]], make_module: Callable[[], nn.Module]) -> dict[str, nn.Module]:
    modules = {}
    for name, state_dict in state_dicts.items():
        modules[name] = make_module()
        modules[name].load_state_dict(state_dict)
    return modules


class RecordedMerges:
    """One fixture file: `cases` (those of `methods`, or all), every tensor, and the pools."""

    def __init__(self, file_name: str, make_module: Callable[[], nn.Module], methods: Container[str] | None = None):
        with safe_open(DATA / file_name, "pt") as file:
            self.cases = [case for case in json.loads(file.metadata()["cases"]) if methods is None or case["method"] in methods]
            self.tensors = {key: file.get_tensor(key) for key in file.keys()}
        self.make_module = make_module

    def state_dicts(self, pool: str) -> dict[str, dict[str, Tensor]]:
        """The input pool's state dicts, by model name."""
        state_dicts: dict[str, dict[str, Tensor]] = {}
        for key, value in self.tensors.items():
            if key.startswith(f"input/{pool}/"):
                _, _, name, parameter = key.split("/", 3)
                state_dicts.setdefault(name, {})[parameter] = value
        return state_dicts

    def pool(self, pool: str) -> dict[str, nn.Module]:
        """The input pool as modules (fresh ones on every call)."""
        return as_modules(self.state_dicts(pool), self.make_module)

    def output(self, case: dict, model: str | None = None) -> dict[str, Tensor]:
        """The reference's merged state dict of `case` (of per-task `model`, where it made several)."""
        prefix = f"output/{case['case']}/" + ("" if model is None else f"{model}/")
        return {key[len(prefix) :]: value for key, value in self.tensors.items() if key.startswith(prefix) and "/" not in key[len(prefix) :]}
