"""Streaming TIES against the dense oracle of the paper's equations, and its properties."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusion_bench.merging.cut_bracket as cut_bracket
import fusion_bench.merging.streaming as streaming
import fusion_bench.merging.ties as ties_module
from fusion_bench.merging.cut_bracket import CutBracket
from fusion_bench.merging.task_arithmetic import task_arithmetic_merge
from fusion_bench.merging.ties import ties_merge
from fusion_bench.utils.errors import InputError
from tests import oracles

SHAPES = {"w": (13, 7), "b": (13,), "conv": (3, 4, 2), "untouched": (5,)}


def make_pool(seed: int, n_tasks: int = 4, kind: str = "normal"):
    """normal: Gaussian task vectors; ties: weights and task vectors are small multiples of 1/8,
    exact in float32, so many |τ| tie at the cut and many columns sum to exactly zero.
    "untouched" is the same in every model."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "normal":
        pretrained = {key: torch.randn(shape, generator=generator) for key, shape in SHAPES.items()}
    else:
        pretrained = {key: torch.randint(-8, 9, shape, generator=generator).float() / 8 for key, shape in SHAPES.items()}
    finetuned = []
    for _ in range(n_tasks):
        model = {}
        for key, value in pretrained.items():
            if key == "untouched":
                model[key] = value.clone()
            elif kind == "normal":
                model[key] = value + 0.1 * torch.randn(value.shape, generator=generator)
            else:
                model[key] = value + torch.randint(-2, 3, value.shape, generator=generator).float() / 8
        finetuned.append(model)
    return pretrained, finetuned


def run_ties(pretrained, finetuned, keys=tuple(SHAPES), **params):
    out = {key: torch.empty_like(value) for key, value in pretrained.items()}
    ties_merge(pretrained, {f"task{i}": m for i, m in enumerate(finetuned)}, out, list(keys), **params)
    return out


def assert_close(actual, expected, tolerance=1e-6):
    for key in expected:
        assert (actual[key] - expected[key]).abs().max().item() <= tolerance, key


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("trim_scope", ["global", "tensor"])
@pytest.mark.parametrize("threshold", [0.001, 0.3, 1, 5, 20, 64.5, 99.9, 100])
def test_equals_dense_oracle(kind, merge_func, trim_scope, threshold):
    pretrained, finetuned = make_pool(seed=hash((kind, threshold)) % 1000, kind=kind)
    params = dict(scaling_factor=0.7, threshold=threshold, merge_func=merge_func, trim_scope=trim_scope)
    assert_close(run_ties(pretrained, finetuned, **params), oracles.ties(pretrained, finetuned, list(SHAPES), **params))


@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("threshold", [5, 20, 100])
def test_without_election_equals_the_oracle(merge_func, threshold):
    pretrained, finetuned = make_pool(seed=7)
    params = dict(scaling_factor=0.5, threshold=threshold, merge_func=merge_func, elect=False)
    assert_close(run_ties(pretrained, finetuned, **params), oracles.ties(pretrained, finetuned, list(SHAPES), **params))


@pytest.mark.parametrize("chunk_elements", [1, 10, 64])
@pytest.mark.parametrize("sample_every", [1, 16])  # 1: an exact bracket, so the merge takes one pass
@pytest.mark.parametrize("deferred_fraction", [0.5, 0.0])  # 0.0: the columns set aside exceed it
def test_chunking_and_fallbacks_change_nothing(monkeypatch, chunk_elements, sample_every, deferred_fraction):
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", chunk_elements)
    monkeypatch.setattr(cut_bracket, "SAMPLE_EVERY", sample_every)
    monkeypatch.setattr(ties_module, "DEFERRED_FRACTION", deferred_fraction)
    for kind, merge_func in itertools.product(["normal", "ties"], ["sum", "mean", "max"]):
        pretrained, finetuned = make_pool(seed=3, kind=kind)
        params = dict(scaling_factor=0.5, threshold=20, merge_func=merge_func)
        assert_close(run_ties(pretrained, finetuned, **params), oracles.ties(pretrained, finetuned, list(SHAPES), **params))


class CountingStateDict(dict):
    """A state dict that counts how many times each tensor is read."""

    reads = 0

    def __getitem__(self, key):
        CountingStateDict.reads += 1
        return super().__getitem__(key)


def reads_per_tensor(monkeypatch, pretrained, finetuned, keys=tuple(SHAPES), expected=None, **params) -> float:
    """How many times the merge reads each tensor, after checking its result against `expected`
    (default: the oracle's)."""
    monkeypatch.setattr(CountingStateDict, "reads", 0)
    counted = [CountingStateDict(model) for model in [pretrained, *finetuned]]
    out = run_ties(counted[0], counted[1:], keys=keys, **params)
    expected = oracles.ties(pretrained, finetuned, list(keys), **params) if expected is None else expected
    assert_close({key: out[key].float() for key in keys}, {key: expected[key].to(out[key].dtype).float() for key in keys})
    return CountingStateDict.reads / (len(counted) * len(keys))


@pytest.mark.parametrize("threshold", [0.001, 20, 90])
def test_a_bracket_that_holds_merges_in_one_pass(monkeypatch, threshold):
    """Each tensor is read twice, once for the sample and once by the merge pass, and the result is
    the oracle's; where a sample would be too small to be sharp, none is drawn, and the cut takes
    two exact passes before the merge pass.
    (With many ties at the cut, as in the "ties" pools, the columns set aside may outgrow their
    budget: test_chunking_and_fallbacks_change_nothing.)"""
    pretrained, finetuned = make_pool(seed=5)
    params = dict(scaling_factor=0.5, threshold=threshold, merge_func="sum", multiplicity={"b": 2}, zero_entries=40)
    monkeypatch.setattr(cut_bracket, "SAMPLE_EVERY", 1)
    assert reads_per_tensor(monkeypatch, pretrained, finetuned, **params) == 2
    monkeypatch.setattr(cut_bracket, "SAMPLE_EVERY", 16)
    assert reads_per_tensor(monkeypatch, pretrained, finetuned, **params) == 3


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_a_wide_sampled_bracket_gives_the_exact_cut(monkeypatch, kind, merge_func):
    """A real random sample, its bracket holding many entries, and a budget that lets them all be
    set aside: the cuts found among them are exact."""
    monkeypatch.setattr(ties_module, "DEFERRED_FRACTION", 100.0)
    pretrained, finetuned = make_pool(seed=8, kind=kind)
    params = dict(scaling_factor=0.5, threshold=30, merge_func=merge_func)
    assert reads_per_tensor(monkeypatch, pretrained, finetuned, **params) == 2


@pytest.mark.parametrize("miss", ["above", "below"])
def test_a_bracket_that_misses_falls_back_to_exact_passes(monkeypatch, miss):
    """Should the sample mislead, the merge notices and ends with the oracle's result anyway."""
    sampled = cut_bracket.sample_bracket

    def misleading_bracket(*args, **kwargs):
        bracket = sampled(*args, **kwargs)
        # one float wide, so that few entries fall inside and the budget holds them
        low = bracket.high * 1.37 if miss == "above" else bracket.low / 1.37
        return CutBracket(low, torch.nextafter(low, torch.tensor(float("inf"))))

    monkeypatch.setattr(cut_bracket, "SAMPLE_EVERY", 1)
    monkeypatch.setattr(ties_module, "sample_bracket", misleading_bracket)
    for kind in ["normal", "ties"]:
        pretrained, finetuned = make_pool(seed=4, kind=kind)
        params = dict(scaling_factor=0.5, threshold=20, merge_func="mean")
        # the sample, the merge pass that finds the miss, two exact passes and the merge pass again
        assert reads_per_tensor(monkeypatch, pretrained, finetuned, **params) == 5


@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
@pytest.mark.parametrize("trim_scope", ["global", "tensor"])
@pytest.mark.parametrize("threshold", [0.001, 20, 64.5])
def test_multiplicity_and_zero_entries_equal_the_oracle(kind, merge_func, trim_scope, threshold):
    """Tied names count a tensor several times, and parameters no task changed count as zeros,
    exactly as if the flat vector listed them."""
    pretrained, finetuned = make_pool(seed=hash((kind, threshold, 7)) % 1000, kind=kind)
    params = dict(scaling_factor=0.7, threshold=threshold, merge_func=merge_func, trim_scope=trim_scope)
    multiplicity, zero_entries = {"w": 3, "b": 2}, 150 if trim_scope == "global" else 0
    keys = ["w", "b", "conv"]  # "untouched" stands for the zero entries
    out = run_ties(pretrained, finetuned, keys, multiplicity=multiplicity, zero_entries=zero_entries, **params)
    assert_close({k: out[k] for k in keys}, oracles.ties(pretrained, finetuned, keys, multiplicity=multiplicity, zero_entries=zero_entries, **params))


@pytest.mark.parametrize("sample_every", [1, 16])
def test_untouched_keys_as_zero_entries_change_nothing(monkeypatch, sample_every):
    """Leaving out a tensor no task changed, and counting its entries as zeros, gives the merge
    over all tensors (the LoRA delta space relies on it)."""
    monkeypatch.setattr(cut_bracket, "SAMPLE_EVERY", sample_every)
    for kind, merge_func, threshold in itertools.product(["normal", "ties"], ["sum", "mean", "max"], [5, 90]):
        pretrained, finetuned = make_pool(seed=11, kind=kind)
        params = dict(scaling_factor=0.5, threshold=threshold, merge_func=merge_func, multiplicity={"w": 2, "untouched": 3})
        full = run_ties(pretrained, finetuned, **params)
        partial = run_ties(pretrained, finetuned, ["w", "b", "conv"], zero_entries=3 * 5, **params)
        assert_close(partial, {k: full[k] for k in ["w", "b", "conv"]}, tolerance=0)
        assert torch.equal(full["untouched"], pretrained["untouched"])


def test_zero_sum_column_takes_the_majority_sign():
    """A column whose trimmed values cancel exactly gets the sign of Σγ over all parameters."""
    pretrained = {"w": torch.zeros(4)}
    finetuned = [{"w": torch.tensor([1.0, 2.0, 3.0, 0.5])}, {"w": torch.tensor([-1.0, 1.0, 1.0, -0.5])}]
    out = {"w": torch.empty(4)}
    ties_merge(pretrained, {"a": finetuned[0], "b": finetuned[1]}, out, ["w"], scaling_factor=1.0, threshold=100, merge_func="sum")
    # γ = (0, +, +, 0); Σγ = 2 > 0, so columns 0 and 3 keep their positive entries
    assert out["w"].tolist() == [1.0, 3.0, 4.0, 0.5]


def test_multiplicity_weighs_the_majority_sign():
    """Σγ counts a tensor once per name: here a tied tensor's negative sign outweighs the rest."""
    pretrained = {"w": torch.zeros(3), "tied": torch.zeros(1)}
    finetuned = [{"w": torch.tensor([1.0, 2.0, 3.0]), "tied": torch.tensor([-1.0])}, {"w": torch.tensor([-1.0, 1.0, 1.0]), "tied": torch.tensor([0.0])}]
    for multiplicity, majority in [({"tied": 1}, 1.0), ({"tied": 3}, -1.0)]:
        out = {key: torch.empty_like(value) for key, value in pretrained.items()}
        ties_merge(pretrained, {"a": finetuned[0], "b": finetuned[1]}, out, ["w", "tied"], scaling_factor=1.0, threshold=100, multiplicity=multiplicity)
        # γ = (0, +, +) and (-) for the tied entry: Σγ = 2 − m, so column 0 takes the sign of 2 − m
        assert out["w"][0].item() == majority and out["tied"].item() == -1.0


def test_no_majority_sign_leaves_undecided_columns_at_pretrained():
    """If Σγ is exactly 0 no sign is elected there, so nothing agrees and θ stays θ₀ (the
    reference would then keep the negative entries; docs/methods/ties_merging.md)."""
    pretrained = {"w": torch.ones(3)}
    finetuned = [{"w": torch.tensor([2.0, 3.0, 0.0])}, {"w": torch.tensor([0.0, 1.0, 1.0])}]
    out = {"w": torch.empty(3)}
    ties_merge(pretrained, {"a": finetuned[0], "b": finetuned[1]}, out, ["w"], scaling_factor=1.0, threshold=100, merge_func="sum")
    # τ = (1, 2, -1) and (-1, 0, 0): γ = (0, +, -), Σγ = 0
    assert out["w"].tolist() == [1.0, 3.0, 0.0]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), scaling_factor=st.floats(-2, 2))
def test_one_task_keep_all_mean_is_task_arithmetic(seed, scaling_factor):
    pretrained, finetuned = make_pool(seed, n_tasks=1)
    out = run_ties(pretrained, finetuned, scaling_factor=scaling_factor, threshold=100, merge_func="mean")
    expected = {key: torch.empty_like(value) for key, value in pretrained.items()}
    task_arithmetic_merge(pretrained, {"task0": finetuned[0]}, expected, list(SHAPES), scaling_factor=scaling_factor)
    assert_close(out, expected)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    permutation=st.permutations(range(4)),
    threshold=st.sampled_from([1, 20, 50, 100]),
    merge_func=st.sampled_from(["sum", "mean", "max"]),
    trim_scope=st.sampled_from(["global", "tensor"]),
)
def test_task_order_does_not_matter(seed, permutation, threshold, merge_func, trim_scope):
    pretrained, finetuned = make_pool(seed)
    params = dict(scaling_factor=0.4, threshold=threshold, merge_func=merge_func, trim_scope=trim_scope)
    assert_close(run_ties(pretrained, [finetuned[i] for i in permutation], **params), run_ties(pretrained, finetuned, **params))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.floats(1.01, 50))
def test_higher_threshold_keeps_at_least_as_many_entries(seed, threshold):
    """With one task, the merged task vector is the trimmed one: its support grows with threshold
    (among percentages: 1 itself is the fraction 1, everything, as in FusionBench)."""
    pretrained, finetuned = make_pool(seed, n_tasks=1)
    low = run_ties(pretrained, finetuned, scaling_factor=1.0, threshold=threshold)
    high = run_ties(pretrained, finetuned, scaling_factor=1.0, threshold=min(100, threshold * 2))
    support = lambda out: sum(int((out[k] != pretrained[k]).sum()) for k in SHAPES)  # noqa: E731
    assert support(low) <= support(high)


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(threshold=0), "threshold=0 is out of range"),
        (dict(threshold=101), "threshold=101 is out of range"),
        (dict(threshold=20, merge_func="median"), "merge_func='median' is unknown"),
        (dict(threshold=20, trim_scope="layer"), "trim_scope='layer' is unknown"),
    ],
)
def test_bad_hyperparameters_are_named(params, message):
    pretrained, finetuned = make_pool(0)
    with pytest.raises(InputError, match=message):
        run_ties(pretrained, finetuned, scaling_factor=0.3, **params)


@pytest.mark.parametrize("sample_every", [1, 16])  # one pass, or exact passes first
def test_nan_names_the_model_and_key(monkeypatch, sample_every):
    monkeypatch.setattr(cut_bracket, "SAMPLE_EVERY", sample_every)
    pretrained, finetuned = make_pool(0)
    finetuned[2]["conv"][1, 2, 0] = float("nan")
    for threshold in (20, 100):
        with pytest.raises(InputError, match=r"model 'task2' has NaN or Inf values in 'conv'"):
            run_ties(pretrained, finetuned, scaling_factor=0.3, threshold=threshold)


def test_huge_finite_values_are_not_mistaken_for_inf():
    pretrained, finetuned = make_pool(0)
    for model in finetuned:
        model["w"] = model["w"] * 1e37  # float32 sums of these overflow, the values are finite
    out = run_ties(pretrained, finetuned, scaling_factor=0.3, threshold=20)
    assert all(torch.isfinite(value).all() for value in out.values())


def test_ties_pools_have_exact_ties_and_zero_sums():
    pretrained, finetuned = make_pool(0, kind="ties")
    tau = torch.stack([m["w"] - pretrained["w"] for m in finetuned])
    assert (tau.abs() == 0.25).sum() > 5  # one multiple of 1/8, many times over
    assert ((tau.sum(dim=0) == 0) & (tau != 0).any(dim=0)).any()  # columns that cancel exactly


BF16_SHAPES = {"w": (64, 48), "b": (64,), "emb": (40, 48)}


def bf16_pool(seed: int, n_tasks: int = 4):
    """LLM-like: bf16 weights and fine-tunes, so each |τ| is a difference of two bf16 numbers:
    few distinct values, many tied at the cut."""
    generator = torch.Generator().manual_seed(seed)
    pretrained = {key: (0.02 * torch.randn(shape, generator=generator)).bfloat16() for key, shape in BF16_SHAPES.items()}
    finetuned = [{key: (value.float() + 2e-3 * torch.randn(value.shape, generator=generator)).bfloat16() for key, value in pretrained.items()} for _ in range(n_tasks)]
    return pretrained, finetuned


@pytest.mark.parametrize("merge_func", ["sum", "mean"])
@pytest.mark.parametrize("threshold", [10, 20, 50])
def test_bf16_pools_merge_in_one_pass_setting_aside_few_columns(monkeypatch, merge_func, threshold):
    """A bracket one bucket wide holds one value, tied many times: its entries are kept on a pivot
    instead of set aside, and the merge is still the oracle's (of the same weights in float32)."""
    monkeypatch.setattr(cut_bracket, "SAMPLE_EVERY", 1)  # a sample this small must be exact to be one bucket wide
    set_aside = []
    deferred = ties_module._Merger.merge_deferred
    monkeypatch.setattr(ties_module._Merger, "merge_deferred", lambda self, cuts: set_aside.append(self.deferred.size) or deferred(self, cuts))
    pretrained, finetuned = bf16_pool(seed=threshold)
    keys = tuple(BF16_SHAPES)
    params = dict(scaling_factor=0.5, threshold=threshold, merge_func=merge_func)
    as_float = lambda model: {key: value.float() for key, value in model.items()}  # noqa: E731
    expected = oracles.ties(as_float(pretrained), [as_float(m) for m in finetuned], list(keys), **params)
    assert reads_per_tensor(monkeypatch, pretrained, finetuned, keys=keys, expected=expected, **params) == 2
    tau = torch.stack([torch.cat([(m[key].float() - pretrained[key].float()).flatten() for key in keys]) for m in finetuned])
    cut = tau.abs().sort(dim=1, descending=True).values[:, ties_module.keep_count(tau.shape[1], threshold) - 1]
    at_cut = (tau.abs() == cut[:, None]).any(dim=0).sum().item()
    assert at_cut > 50 and set_aside[0] < at_cut / 4  # without pivots, every column with a tie at a cut is set aside


@pytest.mark.parametrize("in_bracket, threshold, reads", [
    ([0.5, 0.25, 0.25, 0.25], 17, 1),  # k = 3: the cut is the pivot, 0.25
    ([0.5, 0.5, 0.5, 0.25], 26, 1),  # k = 4: the cut, 0.25, lies below the pivot 0.5, whose entries are rightly kept
    ([0.5, 0.25, 0.25, 0.25], 5, 4),  # k = 1: the cut, 0.5, lies above the pivot 0.25, whose entries were wrongly kept
])  # fmt: skip
def test_a_pivot_below_the_cut_falls_back_to_exact_passes(monkeypatch, in_bracket, threshold, reads):
    """Whatever the cut's place beside the pivot, the merge is exact; only a cut above it costs
    passes: after the merge pass (the bracket is given, not sampled), two exact ones and the merge
    pass again."""
    monkeypatch.setattr(cut_bracket, "PIVOT_EVIDENCE", 1)
    pretrained, finetuned = {"w": torch.zeros(12)}, [{"w": torch.tensor(in_bracket + [0.125] * 8)}]
    bracket = CutBracket(torch.tensor([0.25]), torch.tensor([0.75]), pivots=torch.tensor([True]))
    monkeypatch.setattr(ties_module, "sample_bracket", lambda *args, **kwargs: bracket)
    params = dict(scaling_factor=1.0, threshold=threshold, merge_func="sum")
    assert reads_per_tensor(monkeypatch, pretrained, finetuned, keys=("w",), **params) == reads
