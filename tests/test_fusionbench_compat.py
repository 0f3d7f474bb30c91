"""FusionBench drop-in: its YAML files, the JSON reports its scripts read, and its Python API work
here unchanged. The formats are those FusionBench 0.2.33 documents (its root config
fabric_model_fusion.yaml, its CLIP task pool's _template.yaml, its README's derived algorithm); the
files below are written out in our own words, and FusionBench itself is never imported.

CLI runs are the expensive part (a few seconds each): those that several tests read run once per
module, in the fixtures below.
"""

import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import AutoModel, AutoTokenizer, BertTokenizerFast, CLIPVisionModel

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm
from fusion_bench.modelpool import AutoModelPool
from fusion_bench.reporting.report import SCHEMA
from fusion_bench.taskpool import CLIPVisionModelTaskPool, DummyTaskPool
from fusion_bench.utils.errors import InputError
from tests.clip_fixtures import CLIP_TASKS, IMAGES_PER_TASK, write_clip_configs
from tests.conftest import TASKS, assert_one_line_error, run_cli, write_pool_config

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "merge"]
BATCH_SIZE = 8  # write_clip_configs' and fusion_bench_clip_taskpool's dataloader batch size


def assert_same_weights(expected: nn.Module, actual: nn.Module, atol: float = 0.0) -> None:
    expected_state, actual_state = expected.state_dict(), actual.state_dict()
    assert set(expected_state) == set(actual_state)
    for key, value in expected_state.items():
        torch.testing.assert_close(actual_state[key], value, atol=atol, rtol=0 if atol == 0 else 1e-6, msg=key)


# --- the tiny BERT pool, with a tokenizer saved beside its pretrained model ------------------------


@pytest.fixture(scope="module")
def bert_world(tmp_path_factory, bert_pool_dir) -> Path:
    """root/pool (a copy of the session's BERT pool; `pretrained` also holds a BertTokenizerFast of
    VOCAB) and root/config/modelpool/tiny_bert.yaml pointing at it."""
    root = tmp_path_factory.mktemp("fusionbench_bert")
    pool = root / "pool"
    shutil.copytree(bert_pool_dir, pool)
    (root / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(vocab=str(root / "vocab.txt")).save_pretrained(pool / "pretrained")
    write_pool_config(root / "config", pool)
    return root


def bert_pool(world: Path) -> AutoModelPool:
    pool = world / "pool"
    return AutoModelPool({"_pretrained_": str(pool / "pretrained"), **{task: str(pool / task) for task in TASKS}})


def bert_args(world: Path, run_dir: Path, *overrides: str) -> list[str]:
    return ["--config-dir", str(world / "config"), "modelpool=tiny_bert", "taskpool=dummy", f"hydra.run.dir={run_dir}", *overrides]


@pytest.fixture(scope="module")
def printed_run(tmp_path_factory, bert_world):
    """One run with print_config, print_function_call and merged_model_save_kwargs={save_tokenizer: true}."""
    work = tmp_path_factory.mktemp("printed_run")
    result = run_cli(
        *bert_args(bert_world, work / "run", "method=ties_merging", "print_config=true", "print_function_call=true",
                   f"merged_model_save_path={work / 'merged'}", "merged_model_save_kwargs={save_tokenizer: true}"),
        cwd=work,
    )  # fmt: skip
    return result, work


# --- 1. root keys with FusionBench's meaning --------------------------------------------------------


def test_print_config_prints_the_composed_method_modelpool_and_taskpool(printed_run, bert_world):
    result, _ = printed_run
    printed = OmegaConf.to_container(OmegaConf.create(result.stdout.split("\n\n", 1)[0]))  # printed first, before any log line
    assert printed["method"]["_target_"] == "fusion_bench.method.TiesMergingAlgorithm" and printed["method"]["threshold"] == 20
    assert printed["modelpool"]["_target_"] == "fusion_bench.modelpool.AutoModelPool"
    assert printed["modelpool"]["models"] == {"_pretrained_": str(bert_world / "pool" / "pretrained"), **{t: str(bert_world / "pool" / t) for t in TASKS}}
    assert printed["taskpool"] == {"_target_": "fusion_bench.taskpool.DummyTaskPool"}


def test_print_function_call_logs_each_object_built(printed_run):
    result, _ = printed_run
    output = result.stdout + result.stderr
    for target in ("fusion_bench.method.TiesMergingAlgorithm(scaling_factor=0.3, threshold=20", "fusion_bench.modelpool.AutoModelPool(models=",
                   "fusion_bench.taskpool.DummyTaskPool()"):  # fmt: skip
        assert f"instantiating {target}" in output
    assert output.index("instantiating fusion_bench.method.") < output.index("merged with TiesMergingAlgorithm")


def test_save_tokenizer_saves_the_pools_tokenizer_beside_the_model(printed_run, bert_world):
    _, work = printed_run
    saved = work / "merged"
    tokenizer = AutoTokenizer.from_pretrained(saved)
    assert tokenizer.get_vocab() == {token: i for i, token in enumerate(VOCAB)}
    assert tokenizer("hello world merge")["input_ids"] == [2, 5, 6, 7, 3]  # [CLS] hello world merge [SEP]
    assert AutoModel.from_pretrained(saved).config.hidden_size == 16
    listed = json.loads((saved / "fusion_bench_merged_model.json").read_text())["files"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(listed)


def test_an_unknown_save_kwarg_is_refused_naming_save_tokenizer(tmp_path, bert_world):
    saved = tmp_path / "merged"
    result = run_cli(*bert_args(bert_world, tmp_path / "run", "merged_model_save_kwargs={save_tokenizr: true}", f"merged_model_save_path={saved}"),
                     cwd=tmp_path, check=False)  # fmt: skip
    line = assert_one_line_error(result, "merged_model_save_kwargs has an unknown key 'save_tokenizr'")
    assert line.endswith("save_model takes: save_tokenizer")
    assert not saved.exists() and not (tmp_path / "run" / "report.json").exists()


def test_dry_run_checks_everything_and_merges_and_writes_nothing(tmp_path, bert_world):
    saved = tmp_path / "merged"
    result = run_cli(*bert_args(bert_world, tmp_path / "run", "dry_run=true", f"merged_model_save_path={saved}"), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "dry run:" in result.stdout and "nothing was merged or written" in result.stdout
    assert "merged with" not in output and "report:" not in output
    assert not saved.exists() and not (tmp_path / "run" / "report.json").exists()


def test_dry_run_still_refuses_bad_input(tmp_path, bert_world):
    saved = tmp_path / "merged"
    result = run_cli(*bert_args(bert_world, tmp_path / "run", "dry_run=true", "method=ties_merging", "method.threshold=0", f"merged_model_save_path={saved}"),
                     cwd=tmp_path, check=False)  # fmt: skip
    assert_one_line_error(result, "threshold=0 is out of range")
    assert "dry run" not in result.stdout and not saved.exists()


# --- the tiny CLIP world, with a task pool written as FusionBench writes its _template.yaml ---------


def fusion_bench_clip_taskpool(world: Path) -> str:
    """The CLIP task pool with every key of FusionBench's CLIPVisionModelTaskPool/_template.yaml."""
    datasets = "".join(f"  {task}:\n    _target_: datasets.load_dataset\n    path: {world / 'data' / task}\n    split: test\n" for task in CLIP_TASKS)
    return (
        "_target_: fusion_bench.taskpool.CLIPVisionModelTaskPool\n"
        "_recursive_: false\n"
        f"test_datasets:\n{datasets}"
        f"base_model: {world / 'clip'}\n"
        + textwrap.dedent(f"""\
            clip_model:
              _target_: transformers.CLIPModel.from_pretrained
              pretrained_model_name_or_path: ${{..base_model}}
            processor:
              _target_: transformers.CLIPProcessor.from_pretrained
              pretrained_model_name_or_path: ${{..base_model}}
            data_processor: ${{.processor}}
            dataloader_kwargs:
              batch_size: {BATCH_SIZE}
              num_workers: 0
              pin_memory: True
              drop_last: False
              shuffle: False
            layer_wise_feature_save_path: null
            layer_wise_feature_first_token_only: true
            layer_wise_feature_max_num: 1000
            """)
    )


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory, clip_world) -> Path:
    """A --config-dir with modelpool/tiny_clip, taskpool/tiny_clip (ours) and taskpool/fusion_bench_clip."""
    config = tmp_path_factory.mktemp("fusionbench_clip") / "config"
    write_clip_configs(config, clip_world)
    (config / "taskpool" / "fusion_bench_clip.yaml").write_text(fusion_bench_clip_taskpool(clip_world))
    return config


def clip_args(config: Path, *overrides: str) -> list[str]:
    return ["--config-dir", str(config), "modelpool=tiny_clip", "method=task_arithmetic", *overrides]


@pytest.fixture(scope="module")
def fabric_clip_run(tmp_path_factory, clip_config):
    """FusionBench's root config, the user's three parts (its task pool in FusionBench's form), the
    merged model saved under {log_dir}."""
    work = tmp_path_factory.mktemp("fabric_clip_run")
    log_dir = work / "logs"
    result = run_cli(
        "--config-name", "fabric_model_fusion", *clip_args(clip_config, "taskpool=fusion_bench_clip", f"path.log_dir={log_dir}",
                                                           "merged_model_save_path='{log_dir}/merged'"),
        cwd=work,
    )  # fmt: skip
    return result, work, log_dir


@pytest.fixture(scope="module")
def own_clip_run(tmp_path_factory, clip_config):
    """The same merge scored with our own task pool config (taskpool/tiny_clip)."""
    work = tmp_path_factory.mktemp("own_clip_run")
    run_cli(*clip_args(clip_config, "taskpool=tiny_clip", f"hydra.run.dir={work / 'run'}"), cwd=work)
    return json.loads((work / "run" / "report.json").read_text())


FAST_ROOT_CONFIG = """\
defaults:
  - hydra: default
  - fabric: auto
  - path: default
  - modelpool: tiny_clip
  - method: task_arithmetic
  - taskpool: tiny_clip
  - _self_
_target_: fusion_bench.programs.FabricModelFusionProgram
_recursive_: false
fast_dev_run: true
print_config: false
report_save_path: "{log_dir}/program_report.json"
"""


@pytest.fixture(scope="module")
def fast_clip_run(tmp_path_factory, clip_config):
    """fast_dev_run: true in a user's root config, with our CLIP task pool (batches of 8)."""
    work = tmp_path_factory.mktemp("fast_clip_run")
    (clip_config / "fast_clip.yaml").write_text(FAST_ROOT_CONFIG)
    result = run_cli("--config-dir", str(clip_config), "--config-name", "fast_clip", f"path.log_dir={work / 'logs'}", cwd=work)
    return result, json.loads((work / "logs" / "program_report.json").read_text())


def test_fast_dev_run_scores_one_batch_per_task(fast_clip_run, own_clip_run):
    result, report = fast_clip_run
    output = result.stdout + result.stderr
    for task in CLIP_TASKS:  # off a terminal, one log line per task with the number of images scored
        line = output.split(f"{task}: accuracy ", 1)[1].splitlines()[0]
        assert line.startswith(f"{report[task]['accuracy']:.4f}, loss {report[task]['loss']:.4f} ({BATCH_SIZE} images,")
        assert report[task]["accuracy"] * BATCH_SIZE == pytest.approx(round(report[task]["accuracy"] * BATCH_SIZE))
        assert report[task]["loss"] != pytest.approx(own_clip_run[task]["loss"], rel=1e-6)  # not the 20 images of the full run
    assert f"({IMAGES_PER_TASK} images," not in output


def test_the_report_says_a_fast_dev_run_was_one(fast_clip_run):
    _, report = fast_clip_run
    record = report["_fusion_bench_"]["config"]
    assert record["fast_dev_run"] is True and record["taskpool"]["fast_dev_run"] is True


# --- 2. --config-name fabric_model_fusion -----------------------------------------------------------


def test_fabric_model_fusion_writes_program_report_under_log_dir(fabric_clip_run, clip_world):
    result, work, log_dir = fabric_clip_run
    report = json.loads((log_dir / "program_report.json").read_text())  # report_save_path "{log_dir}/program_report.json"
    record = report["_fusion_bench_"]["config"]
    assert record["method"]["_target_"] == "fusion_bench.method.TaskArithmeticAlgorithm"
    assert record["modelpool"]["models"]["_pretrained_"] == str(clip_world / "clip")
    assert record["taskpool"]["clip_model"]["_target_"] == "transformers.CLIPModel.from_pretrained"
    assert record["merged_model_save_path"] == str(log_dir / "merged")
    assert isinstance(CLIPVisionModel.from_pretrained(log_dir / "merged"), CLIPVisionModel)
    assert (log_dir / "cli.log").exists() and not (work / "outputs").exists()  # the run's folder is path.log_dir
    # FusionBench's defaults of this root config: the config printed, each object built logged
    assert result.stdout.startswith("method:\n  _target_: fusion_bench.method.TaskArithmeticAlgorithm")
    assert "instantiating fusion_bench.taskpool.CLIPVisionModelTaskPool(" in result.stdout + result.stderr


# --- 3. a user's FusionBench-style root config ------------------------------------------------------


def test_a_fusion_bench_style_root_config_composes_and_runs(tmp_path, bert_world):
    config = tmp_path / "config"
    shutil.copytree(bert_world / "config", config)
    (config / "my_fusion.yaml").write_text(textwrap.dedent("""\
        defaults:
          - hydra: default
          - fabric: auto
          - path: default
          - modelpool: tiny_bert
          - method: simple_average
          - taskpool: dummy
          - _self_
        _target_: fusion_bench.programs.FabricModelFusionProgram
        _recursive_: false
        seed: 0
        fast_dev_run: false
        dry_run: false
        print_config: false
        print_function_call: false
        merged_model_save_path: "{log_dir}/merged_model"
        merged_model_save_kwargs: null
        report_save_path: "{log_dir}/program_report.json"
        """))
    log_dir = tmp_path / "logs"
    run_cli("--config-dir", str(config), "--config-name", "my_fusion", f"path.log_dir={log_dir}", cwd=tmp_path)
    report = json.loads((log_dir / "program_report.json").read_text())
    assert report["_fusion_bench_"]["status"] == "completed" and report["_fusion_bench_"]["config"]["seed"] == 0
    assert report["_fusion_bench_"]["config"]["method"]["_target_"] == "fusion_bench.method.SimpleAverageAlgorithm"
    assert_same_weights(SimpleAverageAlgorithm().run(bert_pool(bert_world)), AutoModel.from_pretrained(log_dir / "merged_model"))


# --- 4. the CLIP task pool in FusionBench's form -----------------------------------------------------


def test_fusion_bench_taskpool_yaml_gives_the_numbers_of_ours(fabric_clip_run, own_clip_run):
    _, _, log_dir = fabric_clip_run
    theirs = json.loads((log_dir / "program_report.json").read_text())
    assert list(theirs["_fusion_bench_"]["tasks"]) == list(own_clip_run["_fusion_bench_"]["tasks"]) == list(CLIP_TASKS)
    for key in (*CLIP_TASKS, "average"):
        assert theirs[key]["accuracy"] == own_clip_run[key]["accuracy"]
        assert theirs[key]["loss"] == pytest.approx(own_clip_run[key]["loss"], rel=1e-6)
    assert len({own_clip_run[task]["loss"] for task in CLIP_TASKS}) == len(CLIP_TASKS)  # the tasks are told apart
    assert theirs["model_info"] == own_clip_run["model_info"]


def test_layer_wise_feature_dump_is_refused_in_one_line(tmp_path, clip_config, clip_world):
    features = tmp_path / "features"
    result = run_cli(*clip_args(clip_config, "taskpool=fusion_bench_clip", f"taskpool.layer_wise_feature_save_path={features}",
                                f"hydra.run.dir={tmp_path / 'run'}", f"merged_model_save_path={tmp_path / 'merged'}"),
                     cwd=tmp_path, check=False)  # fmt: skip
    assert_one_line_error(result, f"layer_wise_feature_save_path={features}", "set it to null")
    assert not features.exists() and not (tmp_path / "merged").exists() and not (tmp_path / "run" / "report.json").exists()
    with pytest.raises(InputError, match="layer_wise_feature_save_path=x asks for FusionBench's layer-wise feature dump"):
        CLIPVisionModelTaskPool({"mnist": str(clip_world / "data" / "mnist")}, layer_wise_feature_save_path="x")


def test_a_missing_clip_model_is_refused_before_merging(tmp_path, clip_config):
    nowhere = tmp_path / "no_clip_here"
    saved = tmp_path / "merged"
    result = run_cli(*clip_args(clip_config, "taskpool=fusion_bench_clip", f"taskpool.clip_model.pretrained_model_name_or_path={nowhere}",
                                f"hydra.run.dir={tmp_path / 'run'}", f"merged_model_save_path={saved}"),
                     cwd=tmp_path, check=False)  # fmt: skip
    assert_one_line_error(result, f"the task pool's clip_model '{nowhere}' has no readable config")
    assert "merged with" not in result.stdout + result.stderr
    assert not saved.exists() and not (tmp_path / "run" / "report.json").exists()


# --- 5. the report layout FusionBench's scripts read --------------------------------------------------


def test_report_layout_is_fusion_bench_s(fabric_clip_run):
    _, _, log_dir = fabric_clip_run
    report = json.loads((log_dir / "program_report.json").read_text())
    assert list(report) == [*CLIP_TASKS, "average", "model_info", "_fusion_bench_"]
    accuracies = {task: report[task]["accuracy"] for task in CLIP_TASKS}  # as FusionBench's scripts read them
    assert all(0 <= value <= 1 and value * IMAGES_PER_TASK == pytest.approx(round(value * IMAGES_PER_TASK)) for value in accuracies.values())
    assert report["average"]["accuracy"] == pytest.approx(sum(accuracies.values()) / len(CLIP_TASKS))
    assert report["average"]["loss"] == pytest.approx(sum(report[task]["loss"] for task in CLIP_TASKS) / len(CLIP_TASKS))
    parameters = sum(p.numel() for p in CLIPVisionModel.from_pretrained(log_dir / "merged").parameters())
    info = report["model_info"]
    assert info["trainable_params"] == info["all_params"] == parameters and info["trainable_percentage"] == 1.0
    ours = report["_fusion_bench_"]
    assert ours["schema"] == SCHEMA == "fusion_bench.report/2" and ours["status"] == "completed" and ours["error"] is None
    assert ours["config"]["method"] == {"_target_": "fusion_bench.method.TaskArithmeticAlgorithm", "scaling_factor": 0.3}
    assert {"prepare_seconds", "merge_seconds", "eval_seconds"} <= set(ours["timing"])
    assert all(seconds >= 0 for seconds in ours["timing"].values()) and ours["timing"]["eval_seconds"] > 0


def test_dummy_taskpool_evaluate_returns_model_info_only():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    model[0].requires_grad_(False)  # 4·3 + 3 = 15 frozen, 3·2 + 2 = 8 trainable
    assert DummyTaskPool().evaluate(model) == {"model_info": {"trainable_params": 8, "all_params": 23, "trainable_percentage": 8 / 23}}


# --- 6. the Python API -----------------------------------------------------------------------------------

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


# --- 7. --help ---------------------------------------------------------------------------------------------


def test_help_says_what_fusion_bench_is_and_lists_the_choices(tmp_path, bert_world):
    config_root = Path(__file__).resolve().parents[1] / "config"
    for args in ([], ["--config-name", "fabric_model_fusion"]):
        text = run_cli(*args, "--help", "--config-dir", str(bert_world / "config"), cwd=tmp_path).stdout
        assert text.splitlines()[0].startswith("fusion_bench: merge fine-tuned models into one multi-task model")
        assert "hydra" not in text.splitlines()[0].lower() and "powered by hydra" not in text.lower()
        assert "_template" not in text
        listed = {group: [line for line in text.splitlines() if line.lstrip().startswith(f"{group}:")] for group in ("method", "modelpool", "taskpool")}
        assert all(len(lines) == 1 for lines in listed.values()), listed
        choices = set(text.replace(",", " ").split())
        for group in ("method", "modelpool", "taskpool"):
            shipped = [path.relative_to(config_root / group).with_suffix("").as_posix() for path in (config_root / group).rglob("*.yaml")]
            expected = {name for name in shipped if not any(part.startswith("_") for part in name.split("/"))}
            assert expected and expected <= choices, (group, expected - choices)
        assert "tiny_bert" in choices  # the user's --config-dir too


def test_every_method_imports_under_fusion_bench_s_names_and_module_paths():
    import fusion_bench.method as methods
    from fusion_bench.method.dare import DareTiesMerging
    from fusion_bench.method.tall_mask import TallMaskTaskArithmeticAlgorithm

    classes = {name: getattr(methods, name) for name in methods.__all__}
    assert classes["DareTiesMerging"] is DareTiesMerging and classes["TallMaskTaskArithmeticAlgorithm"] is TallMaskTaskArithmeticAlgorithm
    assert classes["ISO_C_Merge"] is classes["IsotropicMergingInCommonSubspace"]
    assert classes["ISO_CTS_Merge"] is classes["IsotropicMergingInCommonAndTaskSubspace"]
    assert all(issubclass(cls, methods.BaseAlgorithm) for cls in classes.values())
