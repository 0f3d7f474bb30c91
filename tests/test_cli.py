"""The `fusion_bench` command end to end, on a tiny BERT pool built on disk."""

import json

import pytest
import torch
from transformers import AutoModel

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.modelpool import AutoModelPool
from fusion_bench.reporting.report import SCHEMA, meta
from tests.conftest import TASKS, run_cli, write_pool_config

METHODS = {
    "ties_merging": TiesMergingAlgorithm(),
    "task_arithmetic": TaskArithmeticAlgorithm(),
    "simple_average": SimpleAverageAlgorithm(),
}


@pytest.fixture()
def workdir(tmp_path, bert_pool_dir):
    write_pool_config(tmp_path / "config", bert_pool_dir)
    return tmp_path


def base_args(workdir, *overrides):
    return ["--config-dir", str(workdir / "config"), "modelpool=tiny_bert", "taskpool=dummy", f"hydra.run.dir={workdir / 'run'}", *overrides]


@pytest.mark.parametrize("method", list(METHODS))
def test_merge_save_and_report(workdir, bert_pool_dir, method):
    saved = workdir / "merged"
    result = run_cli(*base_args(workdir, f"method={method}", f"merged_model_save_path={saved}"), cwd=workdir)
    report = json.loads((workdir / "run" / "report.json").read_text())
    assert meta(report)["schema"] == SCHEMA and meta(report)["status"] == "completed"
    assert meta(report)["config"]["method"]["_target_"].endswith(type(METHODS[method]).__name__)
    assert set(meta(report)["models"]) == {"_pretrained_", *TASKS}
    parameters = sum(p.numel() for p in AutoModel.from_pretrained(bert_pool_dir / "pretrained").parameters())
    assert report["model_info"]["all_params"] == report["model_info"]["trainable_params"] == parameters
    assert meta(report)["peak_memory"]["rss_bytes"] > 0 and meta(report)["timing"]["merge_seconds"] > 0
    assert "merged model:" in result.stdout
    # the saved model is the one the Python API merges, and a clean Hugging Face folder
    pool = AutoModelPool({"_pretrained_": str(bert_pool_dir / "pretrained"), **{t: str(bert_pool_dir / t) for t in TASKS}})
    expected = METHODS[method].run(pool).state_dict()
    loaded = AutoModel.from_pretrained(saved).state_dict()
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key
    assert not [p for p in workdir.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def test_method_parameters_from_the_command_line(workdir):
    run_cli(*base_args(workdir, "method=ties_merging", "method.threshold=50", "method.merge_func=mean"), cwd=workdir)
    report = json.loads((workdir / "run" / "report.json").read_text())
    assert meta(report)["config"]["method"]["threshold"] == 50 and meta(report)["config"]["method"]["merge_func"] == "mean"


def test_multirun_writes_one_report_per_run(workdir):
    sweep = workdir / "sweep"
    run_cli(
        "--multirun", *base_args(workdir, "method=ties_merging,task_arithmetic", "method.scaling_factor=0.1,0.5", f"hydra.sweep.dir={sweep}"),
        cwd=workdir,
    )
    reports = sorted(sweep.glob("*/report.json"))
    assert len(reports) == 4
    methods = [meta(json.loads(r.read_text()))["config"]["method"] for r in reports]
    seen = {(method["_target_"], method["scaling_factor"]) for method in methods}
    assert len(seen) == 4


def test_a_sweep_over_methods_says_how_to_set_a_key_of_theirs(workdir):
    """Hydra checks a multirun's plain overrides against the group's default config (ties_merging,
    which has no iter_num): the line says to write ++, which sets the key in every swept config."""
    sweep = workdir / "sweep"
    args = base_args(workdir, "method=wudi/wudi,dummy", f"hydra.sweep.dir={sweep}", "dry_run=true")
    result = run_cli("--multirun", *args, "method.iter_num=1", cwd=workdir, check=False)
    assert result.returncode == 2
    assert "method.iter_num: a --multirun over several method configs checks keys against the default one; write ++method.iter_num=..." in result.stderr
    swept = base_args(workdir, "method=dare/task_arithmetic,dare/ties_merging", f"hydra.sweep.dir={sweep}", "dry_run=true")
    assert run_cli("--multirun", *swept, "++method.sparsity_ratio=0.3", cwd=workdir).returncode == 0


def test_help_and_cfg(workdir):
    help_text = run_cli("--help", cwd=workdir).stdout
    for group in ("method", "modelpool", "taskpool", "fabric"):
        assert f"{group}:" in help_text
    assert "ties_merging" in help_text and "task_arithmetic" in help_text and "simple_average" in help_text
    composed = run_cli("--cfg", "job", *base_args(workdir, "method=task_arithmetic"), cwd=workdir).stdout
    assert "_target_: fusion_bench.method.TaskArithmeticAlgorithm" in composed and "scaling_factor: 0.3" in composed


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=ties_merging", "+method.treshold=20"], "the method config has an unknown key 'treshold' for fusion_bench.method.TiesMergingAlgorithm"),
        (["method=ties_merging", "method.threshold=0"], "threshold=0 is out of range"),
        (["method=ties_merging", "method.merge_func=median"], "merge_func='median' is unknown"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(workdir, overrides, message):
    saved = workdir / "merged"
    result = run_cli(*base_args(workdir, *overrides, f"merged_model_save_path={saved}"), cwd=workdir, check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"fusion_bench: error: {errors[0].split('error: ', 1)[1]}"] and message in errors[0]
    assert not saved.exists() and not (workdir / "run" / "report.json").exists()


def test_missing_model_path_is_named(workdir, tmp_path):
    (workdir / "config" / "modelpool" / "broken.yaml").write_text(
        f"_target_: fusion_bench.modelpool.AutoModelPool\nmodels:\n  _pretrained_: {tmp_path / 'nope'}\n  a: {tmp_path / 'nope'}\n"
    )
    result = run_cli("--config-dir", str(workdir / "config"), "modelpool=broken", "taskpool=dummy", f"hydra.run.dir={workdir / 'run'}", cwd=workdir, check=False)
    assert result.returncode == 2 and "does not exist; check the path" in result.stderr
