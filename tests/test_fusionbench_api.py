"""FusionBench drop-in, its Python API: base classes from the top, the README's derived algorithm
(in Python and from the CLI), plain dict pools, utils, and every method under FusionBench's names
and module paths.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModel

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm
from fusion_bench.modelpool import AutoModelPool
from fusion_bench.taskpool import CLIPVisionModelTaskPool, DummyTaskPool
from fusion_bench.utils.errors import InputError
from tests.conftest import run_cli
from tests.fusionbench_worlds import assert_same_weights, bert_pool, write_bert_world


@pytest.fixture(scope="module")
def bert_world(tmp_path_factory, bert_pool_dir) -> Path:
    return write_bert_world(tmp_path_factory.mktemp("fusionbench_bert"), bert_pool_dir)


DERIVED_ALGORITHM = '''\
"""FusionBench's README example of a derived algorithm, filled in: task arithmetic."""
import torch

from fusion_bench import BaseAlgorithm, BaseModelPool

CALLS = []


class DerivedModelFusionAlgorithm(BaseAlgorithm):
    _config_mapping = BaseAlgorithm._config_mapping | {
        "hyperparam_attr_1": "hyperparam_1",
        "hyperparam_attr_2": "hyperparam_2",
    }

    def __init__(self, hyperparam_1, hyperparam_2, **kwargs):
        self.hyperparam_attr_1 = hyperparam_1
        self.hyperparam_attr_2 = hyperparam_2
        super().__init__(**kwargs)

    def on_run_start(self):
        CALLS.append("on_run_start")
        print("derived: on_run_start", flush=True)

    def on_run_end(self):
        CALLS.append("on_run_end")
        print("derived: on_run_end", flush=True)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool):
        CALLS.append("run")
        print("derived: run", flush=True)
        merged = modelpool.load_pretrained_model()
        base = {key: value.clone() for key, value in merged.state_dict().items() if value.is_floating_point()}
        total = {key: torch.zeros_like(value) for key, value in base.items()}
        for name in modelpool.model_names:
            state = modelpool.load_model(name).state_dict()
            for key in total:
                total[key] += state[key] - base[key]
        if self.hyperparam_attr_2 == "mean":
            total = {key: value / len(modelpool.model_names) for key, value in total.items()}
        merged.load_state_dict({key: base[key] + self.hyperparam_attr_1 * total[key] for key in base}, strict=False)
        return merged
'''


@pytest.fixture()
def derived_module(tmp_path, monkeypatch):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "my_fusion_methods.py").write_text(DERIVED_ALGORITHM)
    monkeypatch.syspath_prepend(str(plugins))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(plugins), os.environ.get("PYTHONPATH")])))  # for the CLI
    import my_fusion_methods

    yield my_fusion_methods
    sys.modules.pop("my_fusion_methods", None)  # the next test imports its own copy


def test_base_classes_import_from_the_top():
    from fusion_bench import BaseAlgorithm, BaseModelPool, BaseTaskPool
    from fusion_bench.method.base import BaseAlgorithm as method_base
    from fusion_bench.modelpool.base import BaseModelPool as pool_base
    from fusion_bench.taskpool.base import BaseTaskPool as taskpool_base

    assert (BaseAlgorithm, BaseModelPool, BaseTaskPool) == (method_base, pool_base, taskpool_base)
    assert issubclass(TaskArithmeticAlgorithm, BaseAlgorithm) and issubclass(AutoModelPool, BaseModelPool)
    assert issubclass(DummyTaskPool, BaseTaskPool) and issubclass(CLIPVisionModelTaskPool, BaseTaskPool)


def test_the_readme_derived_algorithm_runs_in_python(derived_module, bert_world):
    algorithm = derived_module.DerivedModelFusionAlgorithm(hyperparam_1=1.0, hyperparam_2="mean", _usage_="an example")
    assert algorithm.hyperparam_attr_1 == 1.0 and algorithm.hyperparam_attr_2 == "mean"
    assert algorithm._config_mapping == {"hyperparam_attr_1": "hyperparam_1", "hyperparam_attr_2": "hyperparam_2"}
    pool = bert_pool(bert_world)
    assert_same_weights(SimpleAverageAlgorithm().run(pool), algorithm.run(pool), atol=1e-6)  # θ₀ + mean(θᵢ − θ₀) = mean(θᵢ)
    with pytest.raises(InputError, match="unknown key 'hyperparam_3' for DerivedModelFusionAlgorithm; its keys are: hyperparam_1, hyperparam_2"):
        derived_module.DerivedModelFusionAlgorithm(1.0, "sum", hyperparam_3=2)


def test_the_readme_derived_algorithm_runs_from_the_cli(tmp_path, derived_module, bert_world):
    (tmp_path / "config" / "method").mkdir(parents=True)
    shutil.copytree(bert_world / "config" / "modelpool", tmp_path / "config" / "modelpool")
    (tmp_path / "config" / "method" / "derived.yaml").write_text(
        "_target_: my_fusion_methods.DerivedModelFusionAlgorithm\nhyperparam_1: 0.3\nhyperparam_2: mean\n"
    )
    saved = tmp_path / "merged"
    result = run_cli("--config-dir", str(tmp_path / "config"), "modelpool=tiny_bert", "taskpool=dummy", "method=derived",
                     "method.hyperparam_1=0.5", "method.hyperparam_2=sum", f"hydra.run.dir={tmp_path / 'run'}",
                     f"merged_model_save_path={saved}", cwd=tmp_path)  # fmt: skip
    output = result.stdout
    order = ["derived: on_run_start", "derived: run", "derived: on_run_end", "merged with DerivedModelFusionAlgorithm"]
    assert [output.index(marker) for marker in order] == sorted(output.index(marker) for marker in order)
    record = json.loads((tmp_path / "run" / "report.json").read_text())["_fusion_bench_"]["config"]["method"]
    assert record == {"_target_": "my_fusion_methods.DerivedModelFusionAlgorithm", "hyperparam_1": 0.5, "hyperparam_2": "sum"}
    # θ₀ + 0.5·Σ(θᵢ − θ₀): task arithmetic with λ = 0.5
    assert_same_weights(TaskArithmeticAlgorithm(scaling_factor=0.5).run(bert_pool(bert_world)), AutoModel.from_pretrained(saved), atol=1e-6)


def test_plain_dict_pool_gives_model_configs_and_models():
    from fusion_bench import BaseModelPool

    torch.manual_seed(0)
    pretrained = nn.Linear(3, 2)
    pool = BaseModelPool({"_pretrained_": pretrained, "task_a": {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2, "bias": False}})
    assert pool.model_names == ["task_a"] and pool.has_pretrained and len(pool) == 1
    config = pool.get_model_config("task_a")
    assert config == {"_target_": "torch.nn.Linear", "in_features": 3, "out_features": 2, "bias": False}
    config["out_features"] = 7  # a copy: the pool keeps its own
    assert pool.get_model_config("task_a")["out_features"] == 2
    model = pool.load_model("task_a")
    assert isinstance(model, nn.Linear) and model.weight.shape == (2, 3) and model.bias is None
    assert pool.load_model("_pretrained_") is pretrained and pool.load_pretrained_model() is pretrained
    assert pool.get_model_config("_pretrained_") is pretrained
    with pytest.raises(InputError, match="model 'task_b' is not in the pool; it has _pretrained_, task_a"):
        pool.load_model("task_b")


def test_utils_instantiate_builds_a_target_config():
    from fusion_bench.utils import instantiate

    layer = instantiate({"_target_": "torch.nn.Linear", "in_features": 4, "out_features": 2})
    assert isinstance(layer, nn.Linear) and layer.weight.shape == (2, 4)
    linear = {"_target_": "torch.nn.Linear", "in_features": 2, "out_features": 5}
    stack = instantiate(OmegaConf.create({"_target_": "torch.nn.Sequential", "_args_": [linear]}))
    assert isinstance(stack[0], nn.Linear) and stack[0].out_features == 5  # nested configs are built too
    assert instantiate({"_target_": "torch.nn.Linear", "in_features": 4}, out_features=3).out_features == 3  # kwargs fill in keys
    assert instantiate(None) is None


def test_count_parameters_counts_trainable_and_all():
    from fusion_bench.utils.parameters import count_parameters

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3), nn.LayerNorm(3))
    model[0].requires_grad_(False)  # 10·4 = 40 frozen; 4·3 + 3 + 3 + 3 = 21 trainable
    assert count_parameters(model) == (21, 61)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(1.0)
        model[1].weight.zero_()  # 12 trainable entries are 0
        model[0].weight[0].zero_()  # and 4 frozen ones
    assert count_parameters(model, non_zero_only=True) == (9, 45)


def test_state_dict_arithmetic_on_two_tiny_state_dicts():
    from fusion_bench.utils.state_dict_arithmetic import state_dict_add, state_dict_avg, state_dict_mul, state_dict_sub

    a = {"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([0.5, -1.0])}
    b = {"w": torch.tensor([[0.5, 0.0], [1.0, -2.0]]), "b": torch.tensor([1.5, 1.0])}
    difference = state_dict_sub(a, b)
    assert list(difference) == ["w", "b"]
    assert torch.equal(difference["w"], torch.tensor([[0.5, 2.0], [2.0, 6.0]])) and torch.equal(difference["b"], torch.tensor([-1.0, -2.0]))
    total = state_dict_add(a, b)
    assert torch.equal(total["w"], torch.tensor([[1.5, 2.0], [4.0, 2.0]])) and torch.equal(total["b"], torch.tensor([2.0, 0.0]))
    scaled = state_dict_mul(a, 0.5)
    assert torch.equal(scaled["w"], torch.tensor([[0.5, 1.0], [1.5, 2.0]])) and torch.equal(scaled["b"], torch.tensor([0.25, -0.5]))
    average = state_dict_avg([a, b])
    assert torch.equal(average["w"], torch.tensor([[0.75, 1.0], [2.0, 1.0]])) and torch.equal(average["b"], torch.tensor([1.0, 0.0]))
    assert torch.equal(a["w"], torch.tensor([[1.0, 2.0], [3.0, 4.0]])) and torch.equal(b["b"], torch.tensor([1.5, 1.0]))  # inputs untouched

def test_every_method_imports_under_fusion_bench_s_names_and_module_paths():
    import fusion_bench.method as methods
    from fusion_bench.method.dare import DareTiesMerging
    from fusion_bench.method.tall_mask import TallMaskTaskArithmeticAlgorithm

    classes = {name: getattr(methods, name) for name in methods.__all__}
    assert classes["DareTiesMerging"] is DareTiesMerging and classes["TallMaskTaskArithmeticAlgorithm"] is TallMaskTaskArithmeticAlgorithm
    assert classes["ISO_C_Merge"] is classes["IsotropicMergingInCommonSubspace"]
    assert classes["ISO_CTS_Merge"] is classes["IsotropicMergingInCommonAndTaskSubspace"]
    assert all(issubclass(cls, methods.BaseAlgorithm) for cls in classes.values())
