"""fusion_bench reproduces the reference FusionBench 0.2.33 exactly where the algorithm is the same.

tests/data/reference_merges.safetensors holds small random pools and the reference's merges of
them (46 cases: every merge_func at thresholds from 0.001 to 99.99, task arithmetic, simple
average), recorded by scripts/make_reference_fixtures.py in the reference's own venv.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm

FIXTURES = Path(__file__).parent / "data" / "reference_merges.safetensors"
METHODS = {
    "ties_merging": TiesMergingAlgorithm,
    "task_arithmetic": TaskArithmeticAlgorithm,
    "simple_average": SimpleAverageAlgorithm,
}


def make_module() -> nn.Module:  # the architecture in scripts/make_reference_fixtures.py
    return nn.Sequential(nn.Linear(16, 12), nn.LayerNorm(12), nn.Linear(12, 8), nn.Linear(8, 4, bias=False))


def load_cases():
    with safe_open(FIXTURES, "pt") as f:
        cases = json.loads(f.metadata()["cases"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return cases, tensors


CASES, TENSORS = load_cases()


def pool_of(kind: str) -> dict[str, nn.Module]:
    state_dicts: dict[str, dict] = {}
    for key, value in TENSORS.items():
        if key.startswith(f"input/{kind}/"):
            _, _, name, parameter = key.split("/", 3)
            state_dicts.setdefault(name, {})[parameter] = value
    pool = {}
    for name, state_dict in state_dicts.items():
        pool[name] = make_module()
        pool[name].load_state_dict(state_dict)
    return pool


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_matches_reference(case):
    merged = METHODS[case["method"]](**case["params"]).run(pool_of(case["pool"]))
    for key, value in merged.state_dict().items():
        expected = TENSORS[f"output/{case['case']}/{key}"]
        assert (value - expected).abs().max().item() <= 1e-6, key


def test_fixtures_cover_the_edge_cases():
    thresholds = {c["params"].get("threshold") for c in CASES if c["method"] == "ties_merging"}
    assert {0.001, 99.99} <= thresholds and len(CASES) == 46
    ties_pool = pool_of("ties")
    tau = ties_pool["task0"].state_dict()["0.weight"] - ties_pool["_pretrained_"].state_dict()["0.weight"]
    assert (tau.abs() == tau.abs().max()).sum() > 1  # many magnitudes tie
    assert all(torch.equal(m.state_dict()["2.bias"], ties_pool["_pretrained_"].state_dict()["2.bias"]) for m in ties_pool.values())
