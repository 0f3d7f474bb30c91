"""Sweeps through Hydra's launchers (docs/sweeps.md): joblib and submitit run a multirun's jobs in
processes of their own, and the sweep keeps its promises there: one report per job with the
numbers of the serial sweep, a failed job's report beside the others, and exit status 2 listing
the failures."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf
from transformers import AutoModel

from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import AutoModelPool
from fusion_bench.reporting.report import meta
from tests.clip_fixtures import CLIP_TASKS, write_clip_configs
from tests.conftest import TASKS, assert_one_line_error, run_cli, write_pool_config

joblib_config = pytest.importorskip("hydra_plugins.hydra_joblib_launcher.config", reason="pip install fusion_bench[cluster]")
submitit_config = pytest.importorskip("hydra_plugins.hydra_submitit_launcher.config", reason="pip install fusion_bench[cluster]")

SUMMARY = "fusion_bench: error: {} run(s) of the sweep failed; each left a report.json saying why, the others ran"


def bert_sweep(tmp_path, bert_pool_dir, *overrides, modelpool="tiny_bert"):
    write_pool_config(tmp_path / "config", bert_pool_dir)
    return ["--multirun", "--config-dir", str(tmp_path / "config"), f"modelpool={modelpool}", "taskpool=dummy", "method=task_arithmetic", *overrides]


def report(folder):
    return json.loads((folder / "report.json").read_text())


def test_a_joblib_sweep_scores_and_merges_as_the_serial_sweep(tmp_path, clip_world):
    write_clip_configs(tmp_path / "config", clip_world)
    sweep = ["--multirun", "--config-dir", str(tmp_path / "config"), "modelpool=tiny_clip", "taskpool=tiny_clip", "method=task_arithmetic",
             "method.scaling_factor=0.3,0.8", "fabric.accelerator=cpu", "merged_model_save_path='{log_dir}/merged'"]  # fmt: skip
    run_cli(*sweep, f"hydra.sweep.dir={tmp_path / 'serial'}", cwd=tmp_path)
    result = run_cli(*sweep, "hydra/launcher=joblib", f"hydra.sweep.dir={tmp_path / 'joblib'}", cwd=tmp_path)
    assert "Joblib.Parallel(n_jobs=2,backend=loky" in result.stdout  # our default, in joblib's processes
    for job, scaling_factor in (("0", 0.3), ("1", 0.8)):
        serial, parallel = report(tmp_path / "serial" / job), report(tmp_path / "joblib" / job)
        assert meta(parallel)["status"] == "completed" and meta(parallel)["config"]["method"]["scaling_factor"] == scaling_factor
        for task in CLIP_TASKS:
            assert parallel[task]["accuracy"] == serial[task]["accuracy"]
            assert parallel[task]["loss"] == pytest.approx(serial[task]["loss"], abs=1e-6)
        merged = (tmp_path / "joblib" / job / "merged" / "model.safetensors").read_bytes()
        assert merged == (tmp_path / "serial" / job / "merged" / "model.safetensors").read_bytes()
    assert report(tmp_path / "joblib" / "0")["average"] != report(tmp_path / "joblib" / "1")["average"]  # two λ, two models


def test_a_submitit_local_sweep_runs_each_job_in_a_process_of_its_own(tmp_path, bert_pool_dir):
    sweep = tmp_path / "sweep"
    args = bert_sweep(tmp_path, bert_pool_dir, "method.scaling_factor=0.3,0.8", "merged_model_save_path='{log_dir}/merged'")
    run_cli(*args, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    job_logs = sorted(sweep.glob(".submitit/*/*_0_log.out"))
    assert len(job_logs) == 2 and all("merged model:" in log.read_text() for log in job_logs)  # each job's output, in its submitit folder
    pool = AutoModelPool({"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}})
    for job, scaling_factor in (("0", 0.3), ("1", 0.8)):
        assert meta(report(sweep / job))["status"] == "completed"
        expected = TaskArithmeticAlgorithm(scaling_factor=scaling_factor).run(pool).state_dict()
        merged = AutoModel.from_pretrained(sweep / job / "merged").state_dict()
        assert all(merged[key].equal(value) for key, value in expected.items())


LAUNCHERS = {
    "joblib": (joblib_config.JobLibLauncherConf, {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": 2}),
    "submitit_local": (
        submitit_config.LocalQueueConf,
        {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "submitit_folder": "${hydra.sweep.dir}/.submitit/%j",
         "timeout_min": 120, "gpus_per_node": 0},
    ),  # fmt: skip
    "submitit_slurm": (
        submitit_config.SlurmQueueConf,
        {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "submitit_folder": "${hydra.sweep.dir}/.submitit/%j",
         "name": "fusion_bench", "partition": None, "account": None, "timeout_min": 180, "nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1,
         "cpus_per_task": 8, "mem_gb": 64, "array_parallelism": 256, "max_num_timeout": 0, "setup": None},
    ),  # fmt: skip
}


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_our_launcher_configs_extend_the_plugins_with_our_defaults(tmp_path, launcher):
    schema, ours = LAUNCHERS[launcher]
    result = run_cli(f"hydra/launcher={launcher}", "--cfg", "hydra", cwd=tmp_path)
    composed = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert {key: composed[key] for key in ours} == ours
    assert set(composed) == set(OmegaConf.structured(schema)), "every key of the plugin's own config, and no other"
    assert not result.stderr  # Hydra's warning about a config named as a plugin's schema is silenced
    typed = "hydra.launcher.n_jobs=many" if launcher == "joblib" else "hydra.launcher.timeout_min=soon"  # ints in the plugin's schema
    refused = run_cli(f"hydra/launcher={launcher}", typed, "--cfg", "hydra", cwd=tmp_path, check=False)
    assert refused.returncode == 2 and refused.stderr == f"fusion_bench: error: Error merging override {typed}\n"


def test_a_slurm_sweep_submits_one_job_array_with_our_keys(tmp_path, bert_pool_dir):
    """No cluster here: a stand-in `sbatch` keeps the script submitit wrote, and refuses it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path / "submitted.sh"}\necho "sbatch: error: no cluster here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit checks that srun exists
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    sweep = tmp_path / "sweep"
    args = bert_sweep(tmp_path, bert_pool_dir, "method.scaling_factor=0.3,0.8", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                      "hydra.launcher.mem_gb=32", f"hydra.sweep.dir={sweep}")  # fmt: skip
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([sys.executable, "-m", "fusion_bench", *args], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "no cluster here" in result.stderr
    script = (tmp_path / "submitted.sh").read_text().splitlines()
    for flag in ("--array=0-1%2", "--partition=gpu", "--job-name=fusion_bench", "--time=180", "--gpus-per-node=1", "--cpus-per-task=8",
                 "--mem=32GB", "--nodes=1", "--ntasks-per-node=1", f"--output={sweep}/.submitit/%A_%a/%A_%a_0_log.out"):  # fmt: skip
        assert f"#SBATCH {flag}" in script, flag


def test_a_failing_job_under_joblib_leaves_its_report_and_the_sweep_exits_2(tmp_path, bert_pool_dir):
    sweep = tmp_path / "sweep"
    args = bert_sweep(tmp_path, bert_pool_dir, "hydra/launcher=joblib", f"hydra.sweep.dir={sweep}")
    result = run_cli(*args, "method.scaling_factor=0.1,abc,0.5", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert [meta(report(sweep / job))["status"] for job in ("0", "1", "2")] == ["completed", "failed", "completed"]
    assert meta(report(sweep / "1"))["error"]["message"] == "scaling_factor='abc' must be a finite number, e.g. scaling_factor=0.3"
    assert result.stderr.splitlines()[-2:] == [
        "fusion_bench: failed run (modelpool=tiny_bert taskpool=dummy method=task_arithmetic method.scaling_factor=abc): "
        "scaling_factor='abc' must be a finite number, e.g. scaling_factor=0.3",
        SUMMARY.format(1),
    ]
    # a second sweep into the same folder (retried runs in sub-folders) lists its own failures only
    again = run_cli(*args, "method.scaling_factor=0.2,xyz", "hydra.sweep.subdir=retry/${hydra.job.num}", cwd=tmp_path, check=False)
    assert again.returncode == 2 and meta(report(sweep / "retry" / "1"))["status"] == "failed"
    listed = [line for line in again.stderr.splitlines() if line.startswith("fusion_bench: failed run")]
    assert len(listed) == 1 and "method.scaling_factor=xyz" in listed[0] and again.stderr.splitlines()[-1] == SUMMARY.format(1)


def test_skip_completed_reruns_only_the_failed_runs_of_a_sweep(tmp_path, bert_pool_dir):
    """A pool whose models are not there yet fails its run; once they are, the same command with
    skip_completed=true reruns that run alone, in its folder, and leaves the completed one as it was."""
    late = tmp_path / "late"
    write_pool_config(tmp_path / "config", late, name="late_bert")
    sweep = tmp_path / "sweep"
    args = bert_sweep(tmp_path, bert_pool_dir, "method.scaling_factor=0.3", "hydra/launcher=joblib", f"hydra.sweep.dir={sweep}", modelpool="tiny_bert,late_bert")
    assert run_cli(*args, cwd=tmp_path, check=False).returncode == 2
    assert [meta(report(sweep / job))["status"] for job in ("0", "1")] == ["completed", "failed"]
    completed, failed = (sweep / "0" / "report.json").read_bytes(), report(sweep / "1")
    still_missing = run_cli(*args, "skip_completed=true", cwd=tmp_path, check=False)  # the models are not there yet: it fails again
    assert still_missing.returncode == 2 and meta(report(sweep / "1"))["status"] == "failed"
    assert (sweep / "0" / "report.json").read_bytes() == completed
    shutil.copytree(bert_pool_dir, late)
    resumed = run_cli(*args, "skip_completed=true", cwd=tmp_path)
    assert "skipped: this run completed before" in resumed.stdout
    rerun = report(sweep / "1")
    assert meta(rerun)["status"] == "completed" and meta(rerun)["overrides"][:-1] == meta(failed)["overrides"]
    assert meta(rerun)["overrides"][-1].lower() == "skip_completed=true"
    assert meta(rerun)["models"]["alpha"] == str(late / "alpha")
    assert (sweep / "0" / "report.json").read_bytes() == completed  # the completed run was left alone
    # another sweep into the same folder is not a resume: one line, nothing replaced
    other = bert_sweep(tmp_path, bert_pool_dir, "method.scaling_factor=0.9", f"hydra.sweep.dir={sweep}", "skip_completed=true", modelpool="late_bert")
    result = run_cli(*other, cwd=tmp_path, check=False)
    assert result.returncode == 2 and "is the report of another run" in result.stderr
    assert (sweep / "0" / "report.json").read_bytes() == completed


def test_launcher_mistakes_are_one_line_errors(tmp_path, bert_pool_dir, monkeypatch):
    result = run_cli("--multirun", "--cfg", "hydra", "hydra/launcher=submitit_slurm", cwd=tmp_path, check=False)
    assert_one_line_error(result, "print a config without --multirun, e.g. fusion_bench hydra/launcher=submitit_slurm --cfg hydra")
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no srun, whatever this machine has
    args = bert_sweep(tmp_path, bert_pool_dir, "hydra/launcher=submitit_slurm", "method.scaling_factor=0.1,0.2", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    result = run_cli(*args, cwd=tmp_path, check=False)
    assert_one_line_error(result, "this machine has no srun; run the sweep where SLURM is, or use hydra/launcher=submitit_local or joblib here")
    assert not list(tmp_path.rglob("report.json"))
