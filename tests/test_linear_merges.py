"""Task arithmetic and simple averaging, streamed, against their dense equations."""

import pytest
import torch

import fusion_bench.merging.streaming as streaming
from fusion_bench.merging.simple_average import simple_average_merge
from fusion_bench.merging.task_arithmetic import task_arithmetic_merge
from fusion_bench.utils.errors import InputError
from tests import oracles
from tests.test_ties_merge import SHAPES, assert_close, make_pool


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 19])
def test_task_arithmetic(monkeypatch, chunk_elements):
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", chunk_elements)
    pretrained, finetuned = make_pool(1)
    out = {key: torch.empty_like(value) for key, value in pretrained.items()}
    task_arithmetic_merge(pretrained, {f"t{i}": m for i, m in enumerate(finetuned)}, out, list(SHAPES), scaling_factor=0.3)
    assert_close(out, oracles.task_arithmetic(pretrained, finetuned, list(SHAPES), scaling_factor=0.3))


@pytest.mark.parametrize("chunk_elements", [1, 7, 1 << 19])
def test_simple_average(monkeypatch, chunk_elements):
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", chunk_elements)
    _, finetuned = make_pool(2)
    out = {key: torch.empty_like(value) for key, value in finetuned[0].items()}
    simple_average_merge({f"t{i}": m for i, m in enumerate(finetuned)}, out, list(SHAPES))
    assert_close(out, oracles.simple_average(finetuned, list(SHAPES)))


def test_inf_is_named():
    pretrained, finetuned = make_pool(0)
    pretrained["b"][3] = float("inf")
    out = {key: torch.empty_like(value) for key, value in pretrained.items()}
    with pytest.raises(InputError, match="model '_pretrained_' has NaN or Inf values in 'b'"):
        task_arithmetic_merge(pretrained, {"t": finetuned[0]}, out, list(SHAPES), scaling_factor=0.3)


def test_lower_precision_models_are_merged_in_float32():
    pretrained, finetuned = make_pool(4)
    half = lambda sd: {k: v.bfloat16() for k, v in sd.items()}  # noqa: E731
    out = {key: torch.empty_like(value).bfloat16() for key, value in pretrained.items()}
    task_arithmetic_merge(half(pretrained), {f"t{i}": half(m) for i, m in enumerate(finetuned)}, out, list(SHAPES), scaling_factor=0.3)
    expected = oracles.task_arithmetic(half(pretrained), [half(m) for m in finetuned], list(SHAPES), scaling_factor=0.3)
    assert_close(out, {k: v.bfloat16() for k, v in expected.items()}, tolerance=0)
