"""Parameter counts on a module with a frozen part and a tied weight; human_readable against
strings FusionBench 0.2.33 printed for the same numbers."""

import pytest
import torch
from torch import nn

from fusion_bench.utils.parameters import count_parameters, human_readable, model_summary


class Tied(nn.Module):
    """embed (5×3 = 15, trainable), frozen (3→2 linear, 8, frozen), head (its weight is embed's),
    and a buffer: 23 parameters, 15 trainable."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.frozen = nn.Linear(3, 2).requires_grad_(False)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("steps", torch.zeros(4))


def test_count_parameters_counts_a_tied_weight_once():
    assert count_parameters(Tied()) == (15, 23)


def test_count_parameters_non_zero_only():
    model = Tied()
    with torch.no_grad():
        model.embed.weight.fill_(1.0)
        model.embed.weight[0] = 0.0  # 3 of 15 zero
        model.frozen.weight.zero_()
        model.frozen.bias.fill_(-1.0)
    assert count_parameters(model, non_zero_only=True) == (12, 14)
    assert count_parameters(model) == (15, 23)


@pytest.mark.parametrize(
    ("num", "expected"),
    [
        (0, "0"),
        (999, "999"),
        (1000, "1.00K"),
        (1500, "1.50K"),
        (999999, "1000.00K"),
        (1234567, "1.23M"),
        (151277313, "151.28M"),
        (7e9, "7.00B"),
        (10**15, "1.00P"),
        (2.5, "2.50"),
        (-5000, "-5000"),
        (-1500.0, "-1.50K"),
    ],
)
def test_human_readable(num, expected):
    assert human_readable(num) == expected


def test_model_summary():
    assert model_summary(Tied()) == {"trainable_params": 15, "all_params": 23, "trainable_percentage": 15 / 23}
    assert model_summary(nn.ReLU()) == {"trainable_params": 0, "all_params": 0, "trainable_percentage": 0.0}
