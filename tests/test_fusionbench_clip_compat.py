"""FusionBench drop-in, the CLIP benchmark: its CLIP task pool's _template.yaml, its root config
fabric_model_fusion.yaml, fast_dev_run, and the JSON report layout its scripts read.
Formats are those FusionBench 0.2.33 documents; the files below are written out in our own words,
and FusionBench itself is never imported. CLI runs are the expensive part (a few seconds each):
those that several tests read run once per module, in fixtures.
"""

import json
import textwrap
from pathlib import Path

import pytest
from torch import nn
from transformers import CLIPVisionModel

from fusion_bench.reporting.report import SCHEMA
from fusion_bench.taskpool import CLIPVisionModelTaskPool, DummyTaskPool
from fusion_bench.utils.errors import InputError
from tests.clip_fixtures import CLIP_TASKS, IMAGES_PER_TASK, write_clip_configs
from tests.conftest import assert_one_line_error, run_cli

BATCH_SIZE = 8  # write_clip_configs' and fusion_bench_clip_taskpool's dataloader batch size


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

# --- --config-name fabric_model_fusion -----------------------------------------------------------


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

# --- the CLIP task pool in FusionBench's form -----------------------------------------------------


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

# --- the report layout FusionBench's scripts read --------------------------------------------------


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

