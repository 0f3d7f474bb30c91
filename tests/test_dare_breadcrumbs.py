"""DARE (three variants) and Model Breadcrumbs: the reference's recorded merges where it is
deterministic, reproducible masks, the drop's statistics, and dense oracles of the equations."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import fusion_bench.merging.streaming as streaming
from fusion_bench.merging.breadcrumbs import breadcrumbs_sparsify
from fusion_bench.merging.dare import dare_transform, mask_seed, random_drop
from fusion_bench.method import DareSimpleAverage, DareTaskArithmetic, DareTiesMerging, ModelBreadcrumbs
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import instantiate_checked
from tests import oracles
from tests.recorded_merges import RecordedMerges, as_modules, data_free_fixture_module

ROOT = Path(__file__).resolve().parents[1]
DARE_METHODS = {"DareSimpleAverage": DareSimpleAverage, "DareTaskArithmetic": DareTaskArithmetic, "DareTiesMerging": DareTiesMerging}


RECORDED = RecordedMerges("reference_data_free_merges.safetensors", data_free_fixture_module, DARE_METHODS)
CASES = RECORDED.cases


def merged_state(method, pool) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in method.run(pool).state_dict().items()}


def assert_close(actual, expected, tolerance=1e-6):
    for key in expected:
        assert (actual[key] - expected[key]).abs().max().item() <= tolerance, key


# --- the reference's recorded merges (sparsity 0, where its random draws drop nothing) ---------------


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_matches_reference_without_dropping(case):
    merged = merged_state(DARE_METHODS[case["method"]](**case["params"]), RECORDED.pool(case["pool"]))
    expected = RECORDED.output(case)
    assert set(merged) == set(expected)
    for key, value in merged.items():
        assert (value - expected[key]).abs().max().item() <= 1e-5, key


def test_fixtures_hold_every_dare_variant():
    assert sorted({c["method"] for c in CASES}) == sorted(DARE_METHODS) and len(CASES) == 6


# --- the drop: its statistics ---------------------------------------------------------------------


def test_kept_fraction_is_one_minus_p_and_kept_entries_are_rescaled_exactly():
    task_vector = torch.randn(400_000, generator=torch.Generator().manual_seed(0))
    for p in (0.1, 0.5, 0.9):
        dropped = random_drop(task_vector, p, torch.Generator().manual_seed(1), rescale=True)
        kept = dropped != 0
        assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / task_vector.numel())
        assert torch.equal(dropped[kept], task_vector[kept] / (1 - p))
        unscaled = random_drop(task_vector, p, torch.Generator().manual_seed(1), rescale=False)
        assert torch.equal(unscaled != 0, kept) and torch.equal(unscaled[kept], task_vector[kept])


def test_rescaled_drop_is_unbiased():
    task_vector = torch.linspace(-1, 1, 9)
    p, draws = 0.5, 4000
    mean = sum(random_drop(task_vector, p, torch.Generator().manual_seed(seed), rescale=True) for seed in range(draws)) / draws
    # each entry's std is |τ|·sqrt(p / (1 − p)); five of its standard errors
    assert ((mean - task_vector).abs() <= 5 * task_vector.abs() * math.sqrt(p / (1 - p) / draws) + 1e-7).all()


def test_no_drop_at_p_zero():
    task_vector = torch.randn(1000)
    assert random_drop(task_vector, 0.0, torch.Generator().manual_seed(0), rescale=True) is task_vector


def test_mask_seed_is_a_stable_hash():
    # a fixed number, the same in every process and on every machine (Python's hash() is salted)
    assert len({mask_seed(0, "task0", "0.weight"), mask_seed(1, "task0", "0.weight"), mask_seed(0, "task1", "0.weight"), mask_seed(0, "task0", "0.bias")}) == 4
    assert mask_seed(0, "task0", "0.weight") == 18028934797481331997


# --- reproducible masks ---------------------------------------------------------------------------


def test_same_seed_same_merge_other_seed_another():
    pool = RECORDED.pool("normal")
    for method in (DareTaskArithmetic, DareTiesMerging):
        first = merged_state(method(sparsity_ratio=0.5, seed=3), pool)
        assert all(torch.equal(first[key], value) for key, value in merged_state(method(sparsity_ratio=0.5, seed=3), pool).items())
        other = merged_state(method(sparsity_ratio=0.5, seed=4), pool)
        assert not torch.equal(first["0.weight"], other["0.weight"])


def test_seed_null_takes_torch_initial_seed():
    pool = RECORDED.pool("normal")
    with torch.random.fork_rng():
        torch.manual_seed(11)
        from_torch = merged_state(DareTaskArithmetic(sparsity_ratio=0.5), pool)
    assert all(torch.equal(from_torch[key], value) for key, value in merged_state(DareTaskArithmetic(sparsity_ratio=0.5, seed=11), pool).items())


class TwoLayers(nn.Module):
    """Two linear layers, "first" and "second", registered (so listed in the state dict) in `order`."""

    def __init__(self, order=("first", "second")):
        super().__init__()
        for name in order:
            setattr(self, name, nn.Linear(12, 10) if name == "first" else nn.Linear(10, 6))


def kept_masks(make, state_dicts, **params) -> dict[str, torch.Tensor]:
    """With one task model, each key's kept entries: those where θ ≠ θ₀ (a dropped entry adds 0)."""
    merged = merged_state(DareTaskArithmetic(**params), as_modules(state_dicts, make))
    return {key: merged[key] != state_dicts["_pretrained_"][key] for key in merged}


def test_mask_depends_on_seed_model_and_key_alone(monkeypatch):
    generator = torch.Generator().manual_seed(5)
    pretrained = TwoLayers().state_dict()
    pretrained = {key: torch.randn(value.shape, generator=generator) for key, value in pretrained.items()}
    tuned = {key: value + 0.1 + torch.rand(value.shape, generator=generator) for key, value in pretrained.items()}  # no τ is 0
    state_dicts = {"_pretrained_": pretrained, "alpha": tuned}
    params = {"sparsity_ratio": 0.5, "seed": 7}
    masks = kept_masks(TwoLayers, state_dicts, **params)
    assert 0.3 < masks["first.weight"].float().mean() < 0.7
    reordered = kept_masks(lambda: TwoLayers(("second", "first")), state_dicts, **params)
    assert list(reordered) != list(masks)
    second_only = {name: {key: value for key, value in state.items() if key.startswith("second.")} for name, state in state_dicts.items()}
    without_first = kept_masks(lambda: TwoLayers(("second",)), second_only, **params)
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 16)
    small_chunks = kept_masks(TwoLayers, state_dicts, **params)
    for key, mask in masks.items():
        assert torch.equal(reordered[key], mask) and torch.equal(small_chunks[key], mask), key
        assert key not in without_first or torch.equal(without_first[key], mask), key
    renamed = kept_masks(TwoLayers, {"_pretrained_": pretrained, "beta": tuned}, **params)
    assert not torch.equal(renamed["first.weight"], masks["first.weight"])  # the model's name counts


# --- against dense oracles of the equations ---------------------------------------------------------


def dropped(state_dicts, *, seed, sparsity_ratio, rescale=True, dropped_keys=None):
    """({key: 0}, [d(τ_t) per task]), the masks as the spec draws them: from (seed, model, key)."""
    pretrained = state_dicts["_pretrained_"]
    task_vectors = []
    for name, state_dict in state_dicts.items():
        if name != "_pretrained_":
            drop = dare_transform(seed, name, sparsity_ratio, rescale=rescale, dropped_keys=dropped_keys)
            task_vectors.append({key: drop(key, state_dict[key] - pretrained[key]) for key in pretrained})
    return {key: torch.zeros_like(value) for key, value in pretrained.items()}, task_vectors


def plus_pretrained(merged_task_vector, pretrained):
    return {key: value + pretrained[key] for key, value in merged_task_vector.items()}


@pytest.mark.parametrize("kind", ["normal", "lowrank"])
@pytest.mark.parametrize("rescale", [True, False])
def test_dare_task_arithmetic_and_simple_average_equal_the_oracle(kind, rescale):
    state_dicts = RECORDED.state_dicts(kind)
    zeros, task_vectors = dropped(state_dicts, seed=2, sparsity_ratio=0.3, rescale=rescale)
    keys = list(zeros)
    for method, scaling in ((DareTaskArithmetic(scaling_factor=0.7, sparsity_ratio=0.3, rescale=rescale, seed=2), 0.7), (DareSimpleAverage(sparsity_ratio=0.3, rescale=rescale, seed=2), 1 / 4)):
        expected = plus_pretrained(oracles.task_arithmetic(zeros, task_vectors, keys, scaling_factor=scaling), state_dicts["_pretrained_"])
        assert_close(merged_state(method, as_modules(state_dicts, data_free_fixture_module)), expected)


def test_drops_inside_the_stream_equal_whole_tensor_drops_bit_for_bit(monkeypatch):
    """DARE task arithmetic drops each chunk in the stream; the same merge over whole-tensor drops
    (TaskVectorViews over a zero θ₀, as DARE-TIES runs) gives the same float32 weights exactly."""
    from fusion_bench.merging.task_arithmetic import task_arithmetic_merge
    from fusion_bench.merging.task_vector_views import TaskVectorView, ZerosView, add_pretrained

    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 40)  # many chunks per tensor
    state_dicts = RECORDED.state_dicts("normal")
    pretrained = state_dicts.pop("_pretrained_")
    merged = merged_state(DareTaskArithmetic(scaling_factor=0.4, sparsity_ratio=0.6, seed=5), as_modules({"_pretrained_": pretrained, **state_dicts}, data_free_fixture_module))
    views = {name: TaskVectorView(pretrained, state_dict, dare_transform(5, name, 0.6, rescale=True)) for name, state_dict in state_dicts.items()}
    expected = {key: torch.empty_like(value) for key, value in pretrained.items()}
    task_arithmetic_merge(ZerosView(pretrained), views, expected, list(pretrained), scaling_factor=0.4)
    add_pretrained(pretrained, expected, list(pretrained))
    assert all(torch.equal(merged[key], expected[key]) for key in pretrained)


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize(("threshold", "trim_scope"), [(20, "global"), (60, "global"), (5, "global"), (20, "tensor")])
def test_dare_ties_equals_the_oracle_on_the_dropped_task_vectors(merge_func, threshold, trim_scope):
    state_dicts = RECORDED.state_dicts("normal")
    zeros, task_vectors = dropped(state_dicts, seed=9, sparsity_ratio=0.5)
    params = {"scaling_factor": 0.5, "threshold": threshold, "merge_func": merge_func, "trim_scope": trim_scope}
    expected = plus_pretrained(oracles.ties(zeros, task_vectors, list(zeros), **params), state_dicts["_pretrained_"])
    assert_close(merged_state(DareTiesMerging(sparsity_ratio=0.5, seed=9, **params), as_modules(state_dicts, data_free_fixture_module)), expected)


def test_dare_ties_remove_keys_stay_pretrained():
    state_dicts = RECORDED.state_dicts("normal")
    merged = merged_state(DareTiesMerging(sparsity_ratio=0.5, seed=1, remove_keys=["2.weight"]), as_modules(state_dicts, data_free_fixture_module))
    assert torch.equal(merged["2.weight"], state_dicts["_pretrained_"]["2.weight"])
    zeros, task_vectors = dropped(state_dicts, seed=1, sparsity_ratio=0.5)
    keys = [key for key in zeros if key != "2.weight"]
    expected = plus_pretrained(oracles.ties(zeros, task_vectors, keys, scaling_factor=0.5, threshold=20, merge_func="sum"), state_dicts["_pretrained_"])
    assert_close(merged, expected)


def test_only_on_linear_weights_leaves_other_entries_undropped():
    state_dicts = RECORDED.state_dicts("normal")
    pool = as_modules(state_dicts, data_free_fixture_module)
    only_linear = merged_state(DareTaskArithmetic(sparsity_ratio=0.5, only_on_linear_weights=True, seed=4), pool)
    everywhere = merged_state(DareTaskArithmetic(sparsity_ratio=0.5, seed=4), pool)
    linear_weights = ["0.weight", "2.weight", "3.weight"]
    zeros, task_vectors = dropped(state_dicts, seed=4, sparsity_ratio=0.5, dropped_keys=linear_weights)
    expected = plus_pretrained(oracles.task_arithmetic(zeros, task_vectors, list(zeros), scaling_factor=0.3), state_dicts["_pretrained_"])
    assert_close(only_linear, expected)
    for key in ("1.weight", "1.bias", "0.bias", "2.bias"):  # LayerNorm and biases: the whole τ
        undropped = state_dicts["_pretrained_"][key] + 0.3 * sum(state_dicts[f"task{t}"][key] - state_dicts["_pretrained_"][key] for t in range(4))
        assert (only_linear[key] - undropped).abs().max() <= 1e-6, key
        assert key == "1.bias" or not torch.allclose(everywhere[key], undropped, atol=1e-4), key  # 1.bias: no task changes it
    for key in linear_weights:  # the same masks as when every entry is dropped
        assert torch.equal(only_linear[key], everywhere[key]), key


def breadcrumbs_oracle(state_dicts, *, density, gamma, scaling_factor):
    """θ₀ + λ·Σ_t m_t ⊙ τ_t; per tensor and task, m_t keeps the ranks [bottom, n − top) of |τ_t|
    sorted ascending: top = ⌊γ·n⌋ outliers dropped and ⌊density·n⌋ kept (mergekit's counts)."""
    pretrained = state_dicts["_pretrained_"]
    merged = {}
    for key, theta0 in pretrained.items():
        total = torch.zeros_like(theta0)
        for name, state_dict in state_dicts.items():
            if name == "_pretrained_":
                continue
            tau = state_dict[key] - theta0
            n = tau.numel()
            kept, top = int(density * n), int(gamma * n)
            top = min(top, n - kept)
            order = tau.abs().reshape(-1).argsort(stable=True)
            mask = torch.zeros(n)
            mask[order[n - kept - top : n - top]] = 1
            total += mask.view_as(tau) * tau
        merged[key] = theta0 + scaling_factor * total
    return merged


@pytest.mark.parametrize("kind", ["normal", "lowrank"])
@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.3, 0.7), (1.0, 0.0), (0.05, 0.0), (0.8, 0.05)])
def test_breadcrumbs_equals_the_oracle(kind, density, gamma):
    state_dicts = RECORDED.state_dicts(kind)
    merged = merged_state(ModelBreadcrumbs(density=density, gamma=gamma, scaling_factor=0.6), as_modules(state_dicts, data_free_fixture_module))
    assert_close(merged, breadcrumbs_oracle(state_dicts, density=density, gamma=gamma, scaling_factor=0.6))


def test_breadcrumbs_cuts_one_tensor():
    tau = torch.tensor([0.1, -0.2, 0.2, 0.2, 0.5, 0.9, -1.0, 3.0, 0.3, -0.4])
    # density 0.5, gamma 0.1: the largest (3.0) and the 4 smallest go, 5 stay
    assert torch.equal(breadcrumbs_sparsify(tau, 0.5, 0.1), torch.tensor([0, 0, 0, 0, 0.5, 0.9, -1.0, 0, 0.3, -0.4]))
    # density 0.7: the lower bound falls on the three tied 0.2s, and all of them stay (8 of 10)
    assert torch.equal(breadcrumbs_sparsify(tau, 0.7, 0.1), torch.tensor([0, -0.2, 0.2, 0.2, 0.5, 0.9, -1.0, 0, 0.3, -0.4]))
    # gamma below one entry's share drops no outlier: the 5 largest stay (mergekit would keep none)
    assert torch.equal(breadcrumbs_sparsify(tau, 0.5, 0.01), torch.tensor([0, 0, 0, 0, 0.5, 0.9, -1.0, 3.0, 0, -0.4]))


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params", "fragment"),
    [
        (DareTaskArithmetic, {"sparsity_ratio": 1.0}, "sparsity_ratio=1.0"),
        (DareTaskArithmetic, {"sparsity_ratio": -0.1}, "sparsity_ratio=-0.1"),
        (DareTaskArithmetic, {"sparsity_ratio": "0.5"}, "sparsity_ratio='0.5'"),
        (DareSimpleAverage, {"sparsity_ratio": True}, "sparsity_ratio=True"),
        (DareTiesMerging, {"sparsity_ratio": 1.5}, "sparsity_ratio=1.5"),
        (DareTaskArithmetic, {"only_on_linear_weights": "yes"}, "only_on_linear_weights='yes'"),
        (DareSimpleAverage, {"rescale": 1}, "rescale=1"),
        (DareTaskArithmetic, {"seed": 1.5}, "seed=1.5"),
        (DareTiesMerging, {"seed": True}, "seed=True"),
        (DareSimpleAverage, {"seed": "1"}, "seed='1'"),
        (DareTaskArithmetic, {"scaling_factor": float("inf")}, "scaling_factor=inf"),
        (DareTiesMerging, {"scaling_factor": float("nan")}, "scaling_factor=nan"),
        (DareTiesMerging, {"threshold": 0}, "threshold=0"),
        (DareTiesMerging, {"threshold": 150}, "threshold=150"),
        (DareTiesMerging, {"merge_func": "avg"}, "merge_func='avg'"),
        (DareTiesMerging, {"trim_scope": "layer"}, "trim_scope='layer'"),
        (DareTiesMerging, {"remove_keys": "0.weight"}, "remove_keys"),
        (DareTiesMerging, {"elect": "no"}, "elect='no'"),
        (ModelBreadcrumbs, {"density": 0}, "density=0"),
        (ModelBreadcrumbs, {"density": 1.5}, "density=1.5"),
        (ModelBreadcrumbs, {"density": "0.9"}, "density='0.9'"),
        (ModelBreadcrumbs, {"gamma": -0.1}, "gamma=-0.1"),
        (ModelBreadcrumbs, {"gamma": 1.0, "density": 0.5}, "gamma=1.0"),
        (ModelBreadcrumbs, {"density": 0.95, "gamma": 0.1}, "exceeds 1"),
        (ModelBreadcrumbs, {"scaling_factor": float("nan")}, "scaling_factor=nan"),
    ],
)
def test_bad_hyper_parameters_fail_in_the_constructor(method, params, fragment):
    with pytest.raises(InputError) as error:
        method(**params)
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("method", [DareTaskArithmetic(sparsity_ratio=0.9, seed=0), DareTiesMerging(seed=0), ModelBreadcrumbs(density=0.5, gamma=0.1)])
def test_nan_in_a_task_model_is_named_even_where_it_would_be_dropped(method):
    state_dicts = RECORDED.state_dicts("normal")
    state_dicts["task2"]["0.weight"] = state_dicts["task2"]["0.weight"].clone()
    state_dicts["task2"]["0.weight"][0] = float("nan")  # a whole row: some entries of it are dropped, some kept
    with pytest.raises(InputError, match="'task2' has NaN or Inf"):
        method.run(as_modules(state_dicts, data_free_fixture_module))


def test_a_pool_without_pretrained_model_is_refused():
    pool = RECORDED.pool("normal")
    del pool["_pretrained_"]
    for method in (DareSimpleAverage(), DareTaskArithmetic(), DareTiesMerging(), ModelBreadcrumbs()):
        with pytest.raises(InputError, match="_pretrained_"):
            method.run(pool)


# --- configs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "cls"),
    [("dare/simple_average", DareSimpleAverage), ("dare/task_arithmetic", DareTaskArithmetic), ("dare/ties_merging", DareTiesMerging), ("breadcrumbs/task_arithmetic", ModelBreadcrumbs)],
)
def test_configs_build_the_class_with_its_defaults(path, cls):
    config = OmegaConf.load(ROOT / "config" / "method" / f"{path}.yaml")
    method = instantiate_checked(config, "method")
    assert type(method) is cls
    default = cls()
    assert {key: getattr(method, key) for key in config if key != "_target_"} == {key: getattr(default, key) for key in config if key != "_target_"}
