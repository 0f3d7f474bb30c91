"""Tied weights: merged once, kept tied, and counted once per state-dict name as FusionBench counts."""

import pytest
import torch
from torch import nn

from fusion_bench.method import TiesMergingAlgorithm
from fusion_bench.modelpool.lazy_state_dict import ModuleStateDict
from fusion_bench.utils.errors import InputError
from tests import oracles


class TiedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


def pool(seed=0):
    models = {}
    for i, name in enumerate(["_pretrained_", "a", "b", "c"]):
        torch.manual_seed(seed + i)
        models[name] = TiedModel()
    return models


def test_module_state_dict_lists_each_tensor_once_with_its_names():
    state = ModuleStateDict(TiedModel())
    assert list(state) == ["embed.weight", "body.weight", "body.bias"]
    assert state.aliases("embed.weight") == ("embed.weight", "head.weight") and state.aliases("body.bias") == ("body.bias",)


@pytest.mark.parametrize("threshold", [10, 30, 70])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties_counts_a_tied_tensor_once_per_name(threshold, merge_func):
    models = pool()
    params = dict(scaling_factor=0.6, threshold=threshold, merge_func=merge_func)
    merged = TiesMergingAlgorithm(**params).run(models)
    assert merged.head.weight is merged.embed.weight
    states = [model.state_dict() for model in models.values()]
    keys = ["embed.weight", "body.weight", "body.bias"]
    expected = oracles.ties(states[0], states[1:], keys, multiplicity={"embed.weight": 2}, **params)
    for key in keys:
        assert (merged.state_dict()[key] - expected[key]).abs().max() <= 1e-6, key


def test_remove_keys_names_tied_aliases():
    models = pool()
    params = dict(scaling_factor=0.6, threshold=30)
    states = [model.state_dict() for model in models.values()]
    once = TiesMergingAlgorithm(remove_keys=["head.weight"], **params).run(models)
    expected = oracles.ties(states[0], states[1:], ["embed.weight", "body.weight", "body.bias"], merge_func="sum", **params)
    assert (once.embed.weight - expected["embed.weight"]).abs().max() <= 1e-6
    untouched = TiesMergingAlgorithm(remove_keys=["head.weight", "embed.weight"], **params).run(models)
    assert torch.equal(untouched.embed.weight, models["_pretrained_"].embed.weight) and untouched.head.weight is untouched.embed.weight
    with pytest.raises(InputError, match="remove_keys names 'head.bias', which is not a key of model '_pretrained_'"):
        TiesMergingAlgorithm(remove_keys=["head.bias"]).run(models)
