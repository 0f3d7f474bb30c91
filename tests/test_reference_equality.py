"""fusion_bench reproduces the reference FusionBench 0.2.33 exactly where the algorithm is the same.

tests/data/reference_merges.safetensors holds small random pools and the reference's merges of
them (46 cases: every merge_func at thresholds from 0.001 to 99.99, task arithmetic, simple
average), recorded by scripts/make_reference_fixtures.py in the reference's own venv.
"""

import pytest
import torch

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
from tests.recorded_merges import RecordedMerges, ties_fixture_module

METHODS = {
    "ties_merging": TiesMergingAlgorithm,
    "task_arithmetic": TaskArithmeticAlgorithm,
    "simple_average": SimpleAverageAlgorithm,
}
RECORDED = RecordedMerges("reference_merges.safetensors", ties_fixture_module)
CASES = RECORDED.cases


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_matches_reference(case):
    merged = METHODS[case["method"]](**case["params"]).run(RECORDED.pool(case["pool"]))
    expected = RECORDED.output(case)
    assert set(merged.state_dict()) == set(expected)
    for key, value in merged.state_dict().items():
        assert (value - expected[key]).abs().max().item() <= 1e-6, key


def test_fixtures_cover_the_edge_cases():
    thresholds = {c["params"].get("threshold") for c in CASES if c["method"] == "ties_merging"}
    assert {0.001, 99.99} <= thresholds and len(CASES) == 46
    ties_pool = RECORDED.pool("ties")
    tau = ties_pool["task0"].state_dict()["0.weight"] - ties_pool["_pretrained_"].state_dict()["0.weight"]
    assert (tau.abs() == tau.abs().max()).sum() > 1  # many magnitudes tie
    assert all(torch.equal(m.state_dict()["2.bias"], ties_pool["_pretrained_"].state_dict()["2.bias"]) for m in ties_pool.values())
