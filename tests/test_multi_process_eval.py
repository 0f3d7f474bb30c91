"""Evaluation on several processes (fabric.devices=2 fabric.strategy=ddp, gloo on the CPU): the
merge runs once, each process scores a share of every task's batches, and the report is exactly
the one a single process writes, written once, by rank 0."""

import json
from pathlib import Path

import pytest

from fusion_bench.modelpool.offline_text import packaged_minilm
from fusion_bench.taskpool.base import BaseTaskPool
from fusion_bench.taskpool.sharding import batch_share
from tests.clip_fixtures import CLIP_TASKS, write_clip_configs
from tests.conftest import assert_one_line_error, run_cli
from tests.flan_t5_fixtures import LORA_TASKS, glue_dir, t5_pool_dir

ROOT = Path(__file__).resolve().parents[1]

TWO_PROCESSES = ("fabric.accelerator=cpu", "fabric.devices=2", "fabric.strategy=ddp")


class FakeFabric:
    def __init__(self, rank, world):
        self.global_rank, self.world_size = rank, world


@pytest.mark.parametrize("batches, world", [(7, 2), (2, 3), (9, 3), (1, 1)])
def test_the_processes_share_every_batch_once(batches, world):
    shares = [list(batch_share(batches, FakeFabric(rank, world))) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(batches))
    assert list(batch_share(batches, None)) == list(range(batches))


def run_dir_files(run):
    return sorted(path.relative_to(run).as_posix() for path in run.rglob("*") if path.is_file() and ".hydra" not in path.parts)


def test_two_processes_score_the_clip_pool_as_one_does(tmp_path, clip_world):
    write_clip_configs(tmp_path / "config", clip_world)
    common = ["--config-dir", str(tmp_path / "config"), "modelpool=tiny_clip", "taskpool=tiny_clip", "method=ties_merging", "taskpool.dataloader_kwargs.batch_size=3"]
    runs = {}
    for name, extra in (("one", ("fabric.accelerator=cpu",)), ("two", TWO_PROCESSES)):
        run = tmp_path / name
        run_cli(*common, *extra, f"hydra.run.dir={run}", f"merged_model_save_path={run / 'merged'}", cwd=tmp_path)
        runs[name] = json.loads((run / "report.json").read_text())
    for task in CLIP_TASKS:  # 20 images in 7 batches: 4 on rank 0, 3 on rank 1
        assert runs["two"][task]["accuracy"] == runs["one"][task]["accuracy"]
        assert runs["two"][task]["loss"] == pytest.approx(runs["one"][task]["loss"], abs=1e-6)
    two = tmp_path / "two"
    assert (two / "merged" / "model.safetensors").read_bytes() == (tmp_path / "one" / "merged" / "model.safetensors").read_bytes()
    # one report, one merged model, one merge: rank 1 leaves only its log
    assert [f for f in run_dir_files(two) if not f.startswith("merged/")] == ["cli.log", "report.json", "train_ddp_process_1.log"]
    assert "merged with TiesMergingAlgorithm" in (two / "cli.log").read_text()
    worker_log = (two / "train_ddp_process_1.log").read_text()
    assert "GLOBAL_RANK: 1" in worker_log and "merged with" not in worker_log and "mnist: accuracy" in worker_log


def one_and_two_process_reports(tmp_path, common):
    """The reports of the same command run on one process and on two."""
    reports = []
    for extra in (("fabric.accelerator=cpu",), TWO_PROCESSES):
        run = tmp_path / f"run{len(reports)}"
        run_cli(*common, *extra, f"hydra.run.dir={run}", cwd=tmp_path)
        reports.append(json.loads((run / "report.json").read_text()))
    return reports


def test_two_processes_score_the_offline_text_pool_as_one_does(tmp_path):
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    (tmp_path / "config" / "modelpool" / "minilm.yaml").write_text(f"_target_: fusion_bench.modelpool.AutoModelPool\nmodels:\n  _pretrained_: {packaged_minilm()}\n")
    common = [
        "--config-dir", str(tmp_path / "config"), "modelpool=minilm", "method=dummy", "taskpool=TextClassificationTaskPool/minilm_text8",
        "taskpool.tasks=[newsgroups,reuters8]", "taskpool.max_samples=45", "taskpool.batch_size=8", "taskpool.seed=0",
    ]  # fmt: skip
    reports = one_and_two_process_reports(tmp_path, common)
    for task in ("newsgroups", "reuters8"):
        assert reports[1][task]["accuracy"] == reports[0][task]["accuracy"]
        assert reports[1][task]["loss"] == pytest.approx(reports[0][task]["loss"], abs=1e-6)


def test_two_processes_answer_glue_as_one_does(tmp_path):
    root = t5_pool_dir()
    models = "".join(f"  glue-{task}: {root / f'glue-{task}'}\n" for task in LORA_TASKS)
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    (tmp_path / "config" / "modelpool" / "t5.yaml").write_text(f"_target_: fusion_bench.modelpool.Seq2SeqLMPool\nmodels:\n  _pretrained_: {root / 'pretrained'}\n{models}")
    common = [
        "--config-dir", str(tmp_path / "config"), "modelpool=t5", "method=task_arithmetic", "taskpool=flan-t5_glue_text_generation",
        "taskpool.tasks=[cola,rte,stsb]", f"taskpool.tokenizer={root / 'pretrained'}", f"taskpool.dataset_path={glue_dir()}", "taskpool.batch_size=3",
    ]  # fmt: skip
    reports = one_and_two_process_reports(tmp_path, common)
    for task in ("cola", "rte", "stsb"):  # every answer gathered: exact match and Spearman's ρ as one process
        assert json.dumps(reports[1][task]) == json.dumps(reports[0][task])


class OneProcessTaskPool(BaseTaskPool):
    """A task pool that places models with Fabric but cannot share its evaluation."""

    uses_fabric = True

    def task_names(self):
        return ["only"]


def test_several_processes_are_refused_where_they_cannot_help(tmp_path, clip_world):
    write_clip_configs(tmp_path / "config", clip_world)
    common = ["--config-dir", str(tmp_path / "config"), "modelpool=tiny_clip", *TWO_PROCESSES]
    result = run_cli(*common, "taskpool=dummy", "taskpool._target_=tests.test_multi_process_eval.OneProcessTaskPool", "method=simple_average", f"hydra.run.dir={tmp_path / 'a'}", cwd=ROOT, check=False)
    assert_one_line_error(result, "fabric.devices gives 2 processes, but OneProcessTaskPool scores on one; use fabric.devices=1")
    result = run_cli(
        "--multirun", *common, "taskpool=tiny_clip", "method=task_arithmetic", "method.scaling_factor=0.3,0.5", f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "a --multirun cannot start several processes per job here" in result.stderr
    reports = [json.loads(path.read_text())["_fusion_bench_"] for path in (tmp_path / "sweep").rglob("report.json")]
    assert len(reports) == 2 and all(report["status"] == "failed" and "several processes" in report["error"]["message"] for report in reports)
