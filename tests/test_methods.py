"""The Python API, as FusionBench's: Algorithm(...).run(pool or dict of modules) -> nn.Module."""

import copy

import pytest
import torch
from torch import nn

from fusion_bench.method import ISO_C_Merge, SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TaskSingularVectorMerging, TiesMergingAlgorithm
from fusion_bench.modelpool import BaseModelPool
from fusion_bench.utils.errors import InputError


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.norm = nn.BatchNorm1d(3)  # a float buffer (running stats) and an int one (num_batches_tracked)


def pool(n_tasks=3, seed=0):
    torch.manual_seed(seed)
    pretrained = Tiny()
    models = {"_pretrained_": pretrained}
    for i in range(n_tasks):
        model = copy.deepcopy(pretrained)
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(0.1 * torch.randn(tensor.shape))
            model.norm.num_batches_tracked.fill_(i + 7)
        models[f"task{i}"] = model
    return models


@pytest.mark.parametrize(
    "method", [TiesMergingAlgorithm(), TaskArithmeticAlgorithm(scaling_factor=0.5), SimpleAverageAlgorithm()], ids=type
)
def test_returns_a_model_and_leaves_the_pool_alone(method):
    models = pool()
    before = {name: copy.deepcopy(model.state_dict()) for name, model in models.items()}
    merged = method.run(models)
    assert isinstance(merged, Tiny) and all(merged is not model for model in models.values())
    for name, model in models.items():
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[name][key])


def test_a_pool_object_works_like_a_dict():
    models = pool()
    from_dict = TiesMergingAlgorithm(threshold=30).run(models)
    from_pool = TiesMergingAlgorithm(threshold=30).run(BaseModelPool(models))
    for key, value in from_dict.state_dict().items():
        assert torch.equal(value, from_pool.state_dict()[key])


def test_integer_buffers_keep_the_base_models_values():
    models = pool()
    assert TaskArithmeticAlgorithm().run(models).norm.num_batches_tracked.item() == 0
    assert SimpleAverageAlgorithm().run(models).norm.num_batches_tracked.item() == 7  # the first task model's


def test_remove_keys_stay_pretrained_and_are_not_counted():
    models = pool()
    merged = TiesMergingAlgorithm(remove_keys=["fc.bias"], threshold=100).run(models)
    assert torch.equal(merged.fc.bias, models["_pretrained_"].fc.bias)
    assert not torch.equal(merged.fc.weight, models["_pretrained_"].fc.weight)


def test_simple_average_ignores_pretrained():
    models = pool()
    merged = SimpleAverageAlgorithm().run(models)
    expected = sum(models[f"task{i}"].fc.weight for i in range(3)) / 3
    assert torch.allclose(merged.fc.weight, expected, atol=1e-7)
    without = {k: v for k, v in models.items() if k != "_pretrained_"}
    assert torch.equal(SimpleAverageAlgorithm().run(without).fc.weight, merged.fc.weight)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TiesMergingAlgorithm(threshold=-5), "threshold=-5 is out of range"),
        (lambda: TiesMergingAlgorithm(threshold=150), "threshold=150 is out of range"),
        (lambda: TiesMergingAlgorithm(merge_func="avg"), "merge_func='avg' is unknown; use one of sum, mean, max"),
        (lambda: TiesMergingAlgorithm(trim_scope="layer"), "trim_scope='layer' is unknown"),
        (lambda: TiesMergingAlgorithm(remove_keys="fc.bias"), r"remove_keys must be a list"),
        (lambda: TaskArithmeticAlgorithm(scaling_factor=float("nan")), "scaling_factor=nan must be a finite number"),
        (lambda: TaskArithmeticAlgorithm(scaling_factor="0.3"), "scaling_factor='0.3' must be a finite number"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_pool_errors_name_the_problem():
    models = pool()
    no_base = {k: v for k, v in models.items() if k != "_pretrained_"}
    with pytest.raises(InputError, match="ties_merging needs the base model: add `_pretrained_: <model>`"):
        TiesMergingAlgorithm().run(no_base)
    with pytest.raises(InputError, match="needs at least one task model"):
        TaskArithmeticAlgorithm().run({"_pretrained_": models["_pretrained_"]})
    with pytest.raises(InputError, match="remove_keys names 'fc.bais', which is not a key of model '_pretrained_'"):
        TiesMergingAlgorithm(remove_keys=["fc.bais"]).run(models)


def test_mismatched_models_name_the_first_offending_key():
    models = pool()
    wider = copy.deepcopy(models["task1"])
    wider.fc = nn.Linear(5, 3)
    with pytest.raises(InputError, match=r"model 'task1' has 'fc.weight' of shape \(3, 5\), model '_pretrained_' of shape \(3, 4\)"):
        TiesMergingAlgorithm().run({**models, "task1": wider})
    extra = copy.deepcopy(models["task0"])
    extra.head = nn.Linear(3, 2)
    with pytest.raises(InputError, match="model 'task0' has 'head.weight', which model '_pretrained_' lacks"):
        TaskArithmeticAlgorithm().run({**models, "task0": extra})
    missing = copy.deepcopy(models["task2"])
    missing.norm = nn.Identity()
    with pytest.raises(InputError, match="model 'task2' lacks 'norm.weight', which model 'task0' has"):
        SimpleAverageAlgorithm().run({**models, "task2": missing})  # its reference is the first task model


@pytest.mark.parametrize("model", ["task1", "_pretrained_"])
def test_nan_weights_are_refused_with_names(model):
    models = pool()
    with torch.no_grad():
        models[model].fc.weight[0, 0] = float("nan")
    # the streaming methods and those that take each tensor whole (the SVD merges)
    for method in (TiesMergingAlgorithm(), TaskArithmeticAlgorithm(), TaskSingularVectorMerging(), ISO_C_Merge()):
        with pytest.raises(InputError, match=f"model '{model}' has NaN or Inf values in 'fc.weight'"):
            method.run(models)
    if model != "_pretrained_":  # simple averaging reads no pretrained model
        with pytest.raises(InputError, match=f"model '{model}' has NaN or Inf values in 'fc.weight'"):
            SimpleAverageAlgorithm().run(models)


def test_tied_weights_are_merged_once_and_stay_tied():
    class TiedModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    models = {}
    for i, name in enumerate(["_pretrained_", "a", "b"]):
        torch.manual_seed(i)
        models[name] = TiedModel()
    merged = TaskArithmeticAlgorithm(scaling_factor=1.0).run(models)
    assert merged.head.weight is merged.embed.weight
    expected = models["a"].embed.weight + models["b"].embed.weight - models["_pretrained_"].embed.weight
    assert torch.allclose(merged.embed.weight, expected, atol=1e-6)
