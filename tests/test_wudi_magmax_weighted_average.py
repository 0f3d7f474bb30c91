"""WUDI, MagMax and weighted average: the reference's recorded merges, dense oracles written from
the equations, and every bad input."""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import fusion_bench.merging.streaming as streaming
from fusion_bench.merging.magmax import largest_magnitude
from fusion_bench.merging.wudi import InterferenceLoss, wudi_task_vector
from fusion_bench.method import MagMaxAlgorithm, WeightedAverageAlgorithm, WUDIMerging
from fusion_bench.modelpool.base import BaseModelPool
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import instantiate_checked
from tests.conftest import assert_one_line_error, run_cli, write_pool_config
from tests.recorded_merges import RecordedMerges, as_modules, data_free_fixture_module

REPO = Path(__file__).resolve().parents[1]
METHODS = {"WUDIMerging": WUDIMerging, "MagMaxAlgorithm": MagMaxAlgorithm, "WeightedAverageAlgorithm": WeightedAverageAlgorithm}


RECORDED = RecordedMerges("reference_data_free_merges.safetensors", data_free_fixture_module, METHODS)
CASES = RECORDED.cases


def state_dicts_of(pool: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {key: value.detach().clone() for key, value in module.state_dict().items()} for name, module in pool.items()}


def max_difference(merged: nn.Module, expected: dict[str, torch.Tensor]) -> float:
    state = merged.state_dict()
    assert set(state) == set(expected)
    return max((state[key].double() - expected[key].double()).abs().max().item() for key in state)


# The reference's recorded merges


@pytest.mark.parametrize("case", CASES, ids=[case["case"] for case in CASES])
def test_matches_reference(case):
    merged = METHODS[case["method"]](**case["params"]).run(RECORDED.pool(case["pool"]))
    assert max_difference(merged, RECORDED.output(case)) <= 1e-5


def test_fixtures_cover_both_pools_and_every_setting():
    assert len(CASES) == 12 and {case["pool"] for case in CASES} == {"normal", "lowrank"}
    assert {json.dumps(case["params"]) for case in CASES if case["method"] == "WUDIMerging"} == {
        '{"iter_num": 400}',
        '{"iter_num": 50, "exclude_keys": ["2.weight"]}',
    }


# WUDI against the loss as the paper writes it, differentiated by autograd


def interference_loss(merged: torch.Tensor, task_vectors: torch.Tensor) -> torch.Tensor:
    """Σ_t ‖(τ − τ_t)τ_tᵀ‖²_F / ‖τ_t‖²_F over the tasks with τ_t ≠ 0."""
    return sum(((merged - tv) @ tv.T).square().sum() / tv.square().sum() for tv in task_vectors if tv.any())


def wudi_oracle(task_vectors: torch.Tensor, steps: int) -> torch.Tensor:
    merged = nn.Parameter(task_vectors.sum(dim=0))
    optimizer = torch.optim.Adam([merged], lr=1e-5)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            interference_loss(merged, task_vectors).backward()
            optimizer.step()
    return merged.detach()


def random_task_vectors(tasks: int, rows: int, columns: int, seed: int) -> torch.Tensor:
    return 0.02 * torch.randn(tasks, rows, columns, generator=torch.Generator().manual_seed(seed))


# tall (B through τ_tᵀτ_t), square, wide (B through τ_tτ_tᵀ), and wide enough for A = SᵀS
SHAPES = {"tall": (3, 12, 5), "square": (4, 8, 8), "wide": (3, 4, 10), "factored": (2, 3, 40)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_gradient_is_autograds(shape):
    task_vectors = random_task_vectors(*shape, seed=1)
    merged = random_task_vectors(1, *shape[1:], seed=2)[0].requires_grad_()
    with torch.enable_grad():
        interference_loss(merged, task_vectors).backward()
    loss = InterferenceLoss(task_vectors)
    assert (loss.gram is None) == (shape == SHAPES["factored"])  # A = SᵀS is used as (τSᵀ)S
    ours = loss.gradient(merged.detach(), out=torch.empty(shape[1:]))
    assert (ours - merged.grad).abs().max() <= 1e-5 * merged.grad.abs().max()


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_wudi_steps_are_adams_on_the_loss(shape):
    task_vectors = random_task_vectors(*shape, seed=3)
    ours = wudi_task_vector(task_vectors, iter_num=30)
    assert (ours - wudi_oracle(task_vectors, 30)).abs().max() <= 1e-6
    start = task_vectors.sum(dim=0)
    assert (ours - start).abs().max() > 1e-4  # it moved, and downhill
    assert interference_loss(ours, task_vectors) < interference_loss(start, task_vectors)


def test_a_task_that_left_a_matrix_unchanged_is_left_out_of_its_loss():
    task_vectors = random_task_vectors(3, 6, 5, seed=4)
    task_vectors[1] = 0  # the reference divides 0 by ‖τ_1‖² = 0 here, and returns NaN
    ours = wudi_task_vector(task_vectors, iter_num=20)
    assert (ours - wudi_oracle(task_vectors[[0, 2]], 20)).abs().max() <= 1e-6
    assert torch.equal(wudi_task_vector(torch.zeros(3, 6, 5), iter_num=20), torch.zeros(6, 5))


def test_wudi_pool_iter_num_0_excluded_and_vectors():
    """θ₀ + Σ_t τ_t on the matrices at iter_num 0, θ₀ + mean τ_t on the rest and on exclude_keys."""
    pool = RECORDED.pool("normal")
    state = state_dicts_of(pool)
    theta0 = state.pop("_pretrained_")
    tau = {key: torch.stack([model[key] - theta0[key] for model in state.values()]) for key in theta0}
    merged = WUDIMerging(iter_num=0, exclude_keys=["2.weight"]).run(pool).state_dict()
    for key, value in merged.items():
        summed = key.endswith("weight") and theta0[key].dim() == 2 and key != "2.weight"
        expected = theta0[key] + (tau[key].sum(dim=0) if summed else tau[key].mean(dim=0))
        assert (value - expected).abs().max() <= 1e-6, key
    merged = WUDIMerging(iter_num=5).run(pool).state_dict()
    assert (merged["3.weight"] - (theta0["3.weight"] + wudi_oracle(tau["3.weight"], 5))).abs().max() <= 1e-6


def test_wudi_excludes_a_tied_tensor_under_either_name():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(6, 4, bias=False)
            self.body = nn.Linear(4, 4)
            self.head = nn.Linear(6, 4, bias=False)
            self.head.weight = self.embed.weight

    torch.manual_seed(0)
    pool = {name: Tied() for name in ("_pretrained_", "a", "b")}
    by_head = WUDIMerging(iter_num=5, exclude_keys=["head.weight"]).run(pool).state_dict()
    mean = sum(m.embed.weight for m in (pool["a"], pool["b"])) / 2
    assert (by_head["embed.weight"] - mean).abs().max() <= 1e-6
    with pytest.raises(InputError, match="exclude_keys names all its 2-D weights"):
        WUDIMerging(exclude_keys=["embed.weight", "body.weight"]).run(pool)


# MagMax


def exact_pool(seed: int, tasks: int = 4) -> dict[str, dict[str, torch.Tensor]]:
    """Values on a grid of 2⁻⁸, so that θ_t − θ₀ is exact and magnitudes tie often."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {key: value.shape for key, value in data_free_fixture_module().state_dict().items()}
    grid = lambda shape, size: torch.randint(-size, size + 1, shape, generator=generator).float() / 256  # noqa: E731
    theta0 = {key: grid(shape, 256) for key, shape in shapes.items()}
    pool = {"_pretrained_": theta0}
    for t in range(tasks):
        pool[f"task{t}"] = {key: value + grid(value.shape, 3) for key, value in theta0.items()}
    return pool


def magmax_oracle(state_dicts, scaling_factor):
    """The authors' fold: a later task vector replaces the running one where |τ_t| ≥ |running|."""
    theta0, *finetuned = state_dicts.values()
    out = {}
    for key in theta0:
        running = finetuned[0][key] - theta0[key]
        for model in finetuned[1:]:
            tau = model[key] - theta0[key]
            running = torch.where(tau.abs() >= running.abs(), tau, running)
        out[key] = theta0[key] + scaling_factor * running
    return out


def test_largest_magnitude_ties_go_to_the_later_task():
    task_vectors = torch.tensor([[1.0, -2.0, 3.0, 0.0], [-1.0, 2.0, -3.0, -0.0], [0.5, -2.0, 1.0, 0.0]])
    assert largest_magnitude(task_vectors).tolist() == [-1.0, -2.0, -3.0, 0.0]


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 19])
def test_magmax_is_the_fold_with_ties(monkeypatch, chunk_elements):
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", chunk_elements)
    state_dicts = exact_pool(5)
    tau = [model["2.weight"] - state_dicts["_pretrained_"]["2.weight"] for name, model in state_dicts.items() if name != "_pretrained_"]
    magnitudes = torch.stack(tau).abs()
    assert ((magnitudes == magnitudes.max(dim=0).values).sum(dim=0) > 1).float().mean() > 0.3  # ties are common
    pool = as_modules(state_dicts, data_free_fixture_module)
    merged = MagMaxAlgorithm(scaling_factor=0.6).run(pool)
    assert max_difference(merged, magmax_oracle(state_dicts, 0.6)) == 0
    assert all(torch.equal(value, pool[name].state_dict()[key]) for name, model in state_dicts.items() for key, value in model.items())


# Weighted average


def weighted_oracle(state_dicts, weights):
    return {key: sum(w * model[key].double() for w, model in zip(weights, state_dicts.values())) for key in next(iter(state_dicts.values()))}


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 19])
@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_average(monkeypatch, chunk_elements, normalize):
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", chunk_elements)
    state_dicts = exact_pool(6, tasks=3)
    del state_dicts["_pretrained_"]  # not needed, and not averaged
    weights = [0.5, -1.0, 3.0]
    merged = WeightedAverageAlgorithm(normalize=normalize, weights=weights).run(as_modules(state_dicts, data_free_fixture_module))
    used = [w / sum(weights) for w in weights] if normalize else weights
    assert max_difference(merged, weighted_oracle(state_dicts, used)) <= 1e-6


class PoolWithUntouched(BaseModelPool):
    """As a pool of LoRA adapters in delta space tells: no task model changes "1.bias"."""

    def untouched_keys(self):
        return {"1.bias"}


@pytest.mark.parametrize("normalize", [True, False])
def test_untouched_tensors_merge_as_if_read(normalize):
    state_dicts = exact_pool(7, tasks=3)
    for name in ("task0", "task1", "task2"):
        state_dicts[name]["1.bias"] = state_dicts["_pretrained_"]["1.bias"].clone()
    weights = [1.0, 2.0, 4.0]
    merged = WeightedAverageAlgorithm(normalize=normalize, weights=weights).run(PoolWithUntouched(as_modules(state_dicts, data_free_fixture_module))).state_dict()
    read = WeightedAverageAlgorithm(normalize=normalize, weights=weights).run(as_modules(state_dicts, data_free_fixture_module)).state_dict()
    assert all(torch.allclose(merged[key], read[key], rtol=0, atol=1e-6) for key in merged)
    assert torch.equal(merged["1.bias"], state_dicts["_pretrained_"]["1.bias"] * (1 if normalize else 7))
    for method in (MagMaxAlgorithm(), WUDIMerging(iter_num=3)):
        merged = method.run(PoolWithUntouched(as_modules(state_dicts, data_free_fixture_module))).state_dict()
        read = method.run(as_modules(state_dicts, data_free_fixture_module)).state_dict()
        assert all(torch.equal(merged[key], read[key]) for key in merged)


def test_integer_buffers_keep_the_first_models_values():
    def with_buffer():
        module = nn.Linear(3, 2)
        module.register_buffer("position_ids", torch.arange(5))
        return module

    torch.manual_seed(0)
    pool = {name: with_buffer() for name in ("a", "b", "c")}
    merged = WeightedAverageAlgorithm(normalize=True, weights=[1, 1, 1]).run(pool)
    assert torch.equal(merged.position_ids, torch.arange(5))
    assert torch.allclose(merged.weight, sum(m.weight for m in pool.values()) / 3, atol=1e-7)


# Configs and bad input


def config(path: str):
    return instantiate_checked(OmegaConf.load(REPO / "config" / "method" / path), "method")


def test_configs_build_fusionbench_defaults():
    wudi, magmax, weighted = config("wudi/wudi.yaml"), config("magmax/magmax.yaml"), config("linear/weighted_average.yaml")
    assert (wudi.iter_num, wudi.exclude_keys) == (400, [])
    assert (magmax.scaling_factor, magmax.inplace) == (0.5, True)
    assert (weighted.normalize, weighted.weights, weighted.verbose) == (True, [0.5, 0.5], True)
    with pytest.raises(InputError) as error:
        weighted.run(RECORDED.pool("normal"))
    assert str(error.value) == (
        "weights lists 2 numbers but the pool has 4 task models (task0, task1, task2, task3); "
        "give one weight per model, in that order, e.g. method.weights=[1,1,1,1]"
    )


def test_default_weights_on_another_pool_size_are_one_line_at_the_cli(tmp_path, bert_pool_dir):
    write_pool_config(tmp_path / "config", bert_pool_dir)
    args = ["--config-dir", str(tmp_path / "config"), "modelpool=tiny_bert", "taskpool=dummy", "method=linear/weighted_average", f"hydra.run.dir={tmp_path / 'run'}"]
    result = run_cli(*args, cwd=tmp_path, check=False)
    assert_one_line_error(result, "weights lists 2 numbers but the pool has 3 task models (alpha, beta, gamma)", "method.weights=[1,1,1]")


def layer_norms_only() -> nn.Module:
    return nn.Sequential(nn.LayerNorm(4), nn.LayerNorm(4))


CONSTRUCTOR_ERRORS = [
    (WUDIMerging, {"iter_num": -1}, "iter_num=-1 must be a whole number of Adam steps, 0 or more"),
    (WUDIMerging, {"iter_num": 2.5}, "iter_num=2.5 must be a whole number"),
    (WUDIMerging, {"iter_num": True}, "iter_num=True must be a whole number"),
    (WUDIMerging, {"iter_num": "400"}, "iter_num='400' must be a whole number"),
    (WUDIMerging, {"exclude_keys": "0.weight"}, "exclude_keys must be a list of keys, got the string '0.weight'; write ['0.weight']"),
    (MagMaxAlgorithm, {"scaling_factor": math.nan}, "scaling_factor=nan must be a finite number"),
    (MagMaxAlgorithm, {"scaling_factor": math.inf}, "scaling_factor=inf must be a finite number"),
    (MagMaxAlgorithm, {"scaling_factor": "0.5"}, "scaling_factor='0.5' must be a finite number"),
    (MagMaxAlgorithm, {"inplace": "yes"}, "inplace='yes' must be true or false"),
    (WeightedAverageAlgorithm, {"normalize": True, "weights": 0.5}, "weights=0.5 must be a list of finite numbers, one per task model"),
    (WeightedAverageAlgorithm, {"normalize": True, "weights": "0.5,0.5"}, "weights='0.5,0.5' must be a list of finite numbers"),
    (WeightedAverageAlgorithm, {"normalize": True, "weights": [1, "a"]}, "weights=[1, 'a'] must be a list of finite numbers"),
    (WeightedAverageAlgorithm, {"normalize": True, "weights": [1, math.nan]}, "weights=[1, nan] must be a list of finite numbers"),
    (WeightedAverageAlgorithm, {"normalize": True, "weights": [True, 1]}, "weights=[True, 1] must be a list of finite numbers"),
    (WeightedAverageAlgorithm, {"normalize": True, "weights": []}, "weights is empty; list one number per task model"),
    (WeightedAverageAlgorithm, {"normalize": True, "weights": [1, -1]}, "weights=[1, -1] sum to 0, so normalize cannot divide by their sum"),
    (WeightedAverageAlgorithm, {"normalize": "true", "weights": [1]}, "normalize='true' must be true or false"),
    (WeightedAverageAlgorithm, {"normalize": True, "weights": [1], "verbose": 1}, "verbose=1 must be true or false"),
]


@pytest.mark.parametrize("method, params, message", CONSTRUCTOR_ERRORS, ids=[f"{m.__name__}-{p}" for m, p, _ in CONSTRUCTOR_ERRORS])
def test_bad_hyper_parameters_are_refused_by_the_constructor(method, params, message):
    with pytest.raises(InputError) as error:
        method(**params)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_bad_pools_are_refused_before_merging():
    cases = [
        (WUDIMerging(exclude_keys=["0.wieght"]), RECORDED.pool("normal"), "exclude_keys names '0.wieght', which is not a key of model '_pretrained_'"),
        (
            WUDIMerging(),
            {name: layer_norms_only() for name in ("_pretrained_", "a", "b")},
            "WUDI optimises 2-D weights and the pool has none; on the other tensors it is the mean task vector, which is simple averaging: use method=simple_average",
        ),
        (WUDIMerging(exclude_keys=["0.weight", "2.weight", "3.weight"]), RECORDED.pool("normal"), "exclude_keys names all its 2-D weights"),
        (WeightedAverageAlgorithm(normalize=False, weights=[1, 2, 3]), RECORDED.pool("normal"), "weights lists 3 numbers but the pool has 4 task models"),
    ]
    for method, pool, message in cases:
        with pytest.raises(InputError) as error:
            method.run(pool)
        assert message in str(error.value) and "\n" not in str(error.value)


def test_weights_that_sum_to_zero_are_fine_without_normalize():
    state_dicts = exact_pool(8, tasks=2)
    del state_dicts["_pretrained_"]
    merged = WeightedAverageAlgorithm(normalize=False, weights=[1, -1]).run(as_modules(state_dicts, data_free_fixture_module))
    assert max_difference(merged, weighted_oracle(state_dicts, [1, -1])) == 0
