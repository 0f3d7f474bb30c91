"""The sampled bracket holds each task's exact cut however the magnitudes are laid out, and
`locate` counts and finds exactly what boolean masks would."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusion_bench.merging.cut_bracket as cut_bracket
from fusion_bench.merging.cut_bracket import CutBracket, sample_bracket
from fusion_bench.merging.trim import keep_count

SIZES = {"embedding": 768 * 400, "bias": 100, "odd": 1000 + 7}  # "odd": a partial last stretch


def task_vector(kind: str, numel: int, generator: torch.Generator) -> torch.Tensor:
    """Magnitudes laid out to mislead a sample of evenly spaced entries or of whole blocks."""
    if kind == "normal":
        return torch.randn(numel, generator=generator)
    if kind == "periodic":  # every SAMPLE_EVERY-th entry large: a fixed stride sees all of them or none
        values = torch.randn(numel, generator=generator) * 1e-3
        values[:: cut_bracket.SAMPLE_EVERY] *= 1e3
        return values
    if kind == "rows":  # rows of 768 changed or not at all, as embeddings fine-tuned on few tokens
        rows = -(-numel // 768)
        changed = torch.rand(rows, 1, generator=generator) < 0.3
        return (torch.randn(rows, 768, generator=generator) * changed).flatten()[:numel]
    return torch.randint(-3, 4, (numel,), generator=generator).float() / 8  # many exact ties


def make_models(kind: str, tasks: int, seed: int) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    pretrained = {key: torch.randn(size, generator=generator) for key, size in SIZES.items()}
    models = {"_pretrained_": pretrained}
    for task in range(tasks):
        models[f"task{task}"] = {key: value + task_vector(kind, value.numel(), generator) for key, value in pretrained.items()}
    return models


def exact_cuts(models, weights, zero_entries: int, k: int) -> torch.Tensor:
    """Each task's k-th largest |τ| over the flat vector, each key repeated `weights` times."""
    pretrained = models["_pretrained_"]
    cuts = []
    for name, model in models.items():
        if name == "_pretrained_":
            continue
        flat = torch.cat([(model[key] - pretrained[key]).repeat(weights[key]) for key in SIZES] + [torch.zeros(zero_entries)])
        cuts.append(flat.abs().sort(descending=True).values[k - 1])
    return torch.stack(cuts)


@pytest.mark.parametrize("kind", ["normal", "periodic", "rows", "integers"])
@pytest.mark.parametrize("threshold", [0.5, 20, 50, 90])
@pytest.mark.parametrize("seed", [0, 1])
def test_bracket_holds_the_exact_cut(kind, threshold, seed):
    models = make_models(kind, tasks=3, seed=seed)
    weights, zero_entries = {"embedding": 1, "bias": 3, "odd": 2}, 5000
    numel = sum(size * weights[key] for key, size in SIZES.items()) + zero_entries
    k = keep_count(numel, threshold)
    bracket = sample_bracket(models, SIZES, weights, zero_entries, k, seed=seed)
    cuts = exact_cuts(models, weights, zero_entries, k)
    assert ((bracket.low <= cuts) & (cuts < bracket.high)).all()


def test_sampling_every_entry_brackets_the_cut_in_one_bucket(monkeypatch):
    """With the whole task vector as the sample, the estimate is exact: no margin, and the bracket
    is the one histogram bucket that holds the cut."""
    monkeypatch.setattr(cut_bracket, "SAMPLE_EVERY", 1)
    models = make_models("normal", tasks=2, seed=0)
    weights = {key: 1 for key in SIZES}
    k = keep_count(sum(SIZES.values()), 20)
    bracket = sample_bracket(models, SIZES, weights, 0, k)
    cuts = exact_cuts(models, weights, 0, k)
    assert cut_bracket.expected_inside(SIZES, weights) == 0
    assert ((bracket.low <= cuts) & (cuts < bracket.high)).all()
    assert (bracket.high.view(torch.int32) - bracket.low.view(torch.int32)).eq(1 << 12).all()


@settings(max_examples=150, deadline=None)
@given(
    columns=st.integers(1, 60),
    low_step=st.integers(0, 4),
    width_step=st.integers(0, 3),
    high_is_inf=st.booleans(),
    scale=st.sampled_from([1.0, 1e-42, 1e30]),  # subnormal and huge magnitudes
    seed=st.integers(0, 2**16),
)
def test_locate_equals_boolean_masks(columns, low_step, width_step, high_is_inf, scale, seed):
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-4, 5, (3, columns), generator=generator).float() / 4 * scale  # zeros, -0.0, ties
    values[:, ::3] = -values[:, ::3]
    low = torch.full((3,), low_step / 4 * scale)
    high = torch.full((3,), float("inf")) if high_is_inf else low + width_step / 4 * scale
    above, at_pivot, columns_inside = CutBracket(low, high).locate(values)
    magnitudes = values.abs()
    assert torch.equal(above.long(), (magnitudes >= high[:, None]).sum(dim=1))
    inside = (magnitudes >= low[:, None]) & (magnitudes < high[:, None]) & (magnitudes > 0)
    assert torch.equal(columns_inside, inside.any(dim=0).nonzero().squeeze(1))
    assert not at_pivot.any()


def majority(values: torch.Tensor) -> torch.Tensor | None:
    """The value more than half of `values` equal, if there are PIVOT_EVIDENCE of them."""
    if values.numel() < cut_bracket.PIVOT_EVIDENCE:
        return None
    distinct, counts = values.unique(return_counts=True)
    return distinct[counts.argmax()] if 2 * counts.max() > values.numel() else None


@given(
    columns=st.integers(1, 60),
    low_step=st.integers(1, 4),
    width_step=st.integers(1, 3),
    allowed=st.lists(st.booleans(), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_locate_with_pivots_equals_boolean_masks(columns, low_step, width_step, allowed, seed):
    """A row's pivot is the value most of its in-bracket entries equal, given enough of them;
    entries equal to it are counted, not set aside, unless another entry of their column is;
    trim_cuts is the pivot where there is one."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-8, 9, (3, columns), generator=generator).float() / 8
    values[:, : columns // 2] = low_step / 8  # a tie at the bracket's bottom, in most rows most of it
    low, high = torch.full((3,), low_step / 8), torch.full((3,), (low_step + width_step) / 8)
    bracket = CutBracket(low, high, pivots=torch.tensor(allowed))
    above, at_pivot, columns_inside = bracket.locate(values)
    magnitudes = values.abs()
    inside = (magnitudes >= low[:, None]) & (magnitudes < high[:, None])
    pivots = [majority(magnitudes[row][inside[row]]) if allowed[row] else None for row in range(3)]
    equal = torch.stack([magnitudes[row] == pivot if pivot is not None else torch.zeros(columns, dtype=torch.bool) for row, pivot in enumerate(pivots)])
    set_aside = (inside & ~equal).any(dim=0)
    assert torch.equal(above.long(), (magnitudes >= high[:, None]).sum(dim=1))
    assert torch.equal(columns_inside, set_aside.nonzero().squeeze(1))
    assert torch.equal(at_pivot.long(), (equal & ~set_aside).sum(dim=1))
    assert [bracket.pivot(row) for row in range(3)] == pivots
    assert torch.equal(bracket.trim_cuts(), torch.stack([pivot if pivot is not None else high[row] for row, pivot in enumerate(pivots)]))


@pytest.mark.parametrize("threshold", [5, 20, 50])
def test_expected_inside_is_the_share_in_the_bracket(threshold):
    """The merge decides before sampling whether the columns it would set aside fit its budget;
    the share it expects is what the bracket then holds, give or take the estimate's error."""
    models = make_models("normal", tasks=3, seed=2)
    weights = {key: 1 for key in SIZES}
    k = keep_count(sum(SIZES.values()), threshold)
    bracket = sample_bracket(models, SIZES, weights, 0, k)
    pretrained = models["_pretrained_"]
    for row, name in enumerate(["task0", "task1", "task2"]):
        magnitudes = torch.cat([(models[name][key] - pretrained[key]).abs() for key in SIZES])
        share = ((magnitudes >= bracket.low[row]) & (magnitudes < bracket.high[row])).float().mean().item()
        assert 0.8 < share / cut_bracket.expected_inside(SIZES, weights) < 1.2
