"""The streaming k-th largest magnitude equals a sort, bit for bit; its pass-1 buckets bracket
any rank."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_bench.merging.magnitude_select import MagnitudeSelector


def select(values: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    rows, numel = values.shape
    selector = MagnitudeSelector(rows, numel, k)
    while not selector.done:
        for start in range(0, numel, chunk):
            selector.update(values[:, start : start + chunk])
        selector.end_pass()
    return selector.values


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    numel = values.shape[1]
    return values.abs().kthvalue(numel - k + 1, dim=1).values if k < numel else torch.zeros(values.shape[0])


@settings(max_examples=150, deadline=None)
@given(
    rows=st.integers(1, 4),
    numel=st.integers(1, 2000),
    kind=st.sampled_from(["normal", "integers", "tiny", "huge", "sparse"]),
    k_fraction=st.floats(0, 1),
    chunk_fraction=st.floats(0.01, 1),
    seed=st.integers(0, 2**16),
)
def test_equals_sort(rows, numel, kind, k_fraction, chunk_fraction, seed):
    values = make_values(rows, numel, kind, seed)
    k = max(1, round(k_fraction * numel))
    chunk = max(1, round(chunk_fraction * numel))
    assert torch.equal(select(values, k, chunk), kth_largest(values, k))


def make_values(rows: int, numel: int, kind: str, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, numel, generator=generator)
    if kind == "integers":  # many ties
        values = torch.randint(-3, 4, (rows, numel), generator=generator).float()
    elif kind == "tiny":  # subnormals
        values = values * 1e-40
    elif kind == "huge":
        values = values * 1e37
    elif kind == "sparse":  # mostly exact zeros, so the cut can be 0
        values = values * (torch.rand(rows, numel, generator=generator) < 0.1)
    return values


def test_k_at_least_numel_needs_no_pass():
    selector = MagnitudeSelector(rows=2, numel=5, k=5)
    assert selector.done and torch.equal(selector.values, torch.zeros(2))


@settings(max_examples=60, deadline=None)
@given(
    numel=st.integers(1, 500),
    weights=st.lists(st.integers(1, 4), min_size=1, max_size=4),
    zeros=st.integers(0, 300),
    k_fraction=st.floats(0, 1),
    integers=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_weighted_chunks_and_added_zeros_equal_sort_of_the_repeated_stream(numel, weights, zeros, k_fraction, integers, seed):
    generator = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(2, numel, generator=generator) for _ in weights]
    if integers:
        chunks = [torch.randint(-2, 3, (2, numel), generator=generator).float() for _ in weights]
    repeated = torch.cat([c for c, w in zip(chunks, weights) for _ in range(w)] + [torch.zeros(2, zeros)], dim=1)
    k = max(1, round(k_fraction * repeated.shape[1]))
    selector = MagnitudeSelector(2, repeated.shape[1], k)
    while not selector.done:
        for chunk, weight in zip(chunks, weights):
            selector.update(chunk, weight)
        selector.add_zeros(zeros)
        selector.end_pass()
    assert torch.equal(selector.values, kth_largest(repeated, k))


@settings(max_examples=100, deadline=None)
@given(
    numel=st.integers(1, 1000),
    kind=st.sampled_from(["normal", "integers", "tiny", "huge", "sparse"]),
    weight=st.integers(1, 3),
    zeros=st.integers(0, 50),
    ranks=st.lists(st.integers(-2, 3200), min_size=2, max_size=2),
    seed=st.integers(0, 2**16),
)
def test_bin_bounds_bracket_the_ranked_value(numel, kind, weight, zeros, ranks, seed):
    """In pass 1, [start, end) of the bucket of the r-th largest holds it; below rank 1 both are
    inf, past the count both are 0."""
    values = make_values(2, numel, kind, seed)
    count = weight * numel + zeros
    selector = MagnitudeSelector(2, count, 1)
    selector.update(values, weight)
    selector.add_zeros(zeros)
    repeated = torch.cat([values.repeat(1, weight), torch.zeros(2, zeros)], dim=1).abs().sort(dim=1, descending=True).values
    start, end = selector.bin_bounds(torch.tensor(ranks))
    for row, rank in enumerate(ranks):
        if rank < 1:
            assert start[row] == end[row] == float("inf")
        elif rank > count:
            assert start[row] == end[row] == 0
        else:
            assert start[row] <= repeated[row, rank - 1] < end[row]
