"""The program's phases: checks, then preparing the pools, then merging, each timed apart."""

import pytest
from omegaconf import OmegaConf

from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import AutoModelPool
from fusion_bench.programs import FusionProgram
from fusion_bench.reporting.report import meta
from fusion_bench.utils.errors import InputError
from tests.conftest import TASKS

EVENTS: list[str] = []


class RecordingPool(AutoModelPool):
    def prepare(self) -> None:
        EVENTS.append("prepare")
        super().prepare()


class RecordingMethod(TaskArithmeticAlgorithm):
    def on_run_start(self) -> None:
        EVENTS.append("on_run_start")

    def run(self, modelpool):
        EVENTS.append("run")
        return super().run(modelpool)

    def on_run_end(self) -> None:
        EVENTS.append("on_run_end")


def program(bert_pool_dir, **settings) -> FusionProgram:
    models = {"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}}
    return FusionProgram(
        method=OmegaConf.create({"_target_": f"{__name__}.RecordingMethod"}),
        modelpool=OmegaConf.create({"_target_": f"{__name__}.RecordingPool", "models": models}),
        taskpool=OmegaConf.create({"_target_": "fusion_bench.taskpool.DummyTaskPool"}),
        **settings,
    )


def test_preparing_the_pools_is_timed_apart_from_merging(bert_pool_dir, tmp_path):
    EVENTS.clear()
    report = program(bert_pool_dir, report_save_path=str(tmp_path / "report.json")).run()
    assert EVENTS == ["prepare", "on_run_start", "run", "on_run_end"]
    assert list(meta(report)["timing"]) == ["prepare_seconds", "merge_seconds", "eval_seconds"]
    assert (tmp_path / "report.json").exists()


def test_a_dry_run_builds_and_checks_but_prepares_merges_and_writes_nothing(bert_pool_dir, tmp_path, capsys):
    EVENTS.clear()
    assert program(bert_pool_dir, dry_run=True, report_save_path=str(tmp_path / "report.json"), merged_model_save_path=str(tmp_path / "merged")).run() is None
    assert EVENTS == [] and list(tmp_path.iterdir()) == []
    assert "dry run: the configs build and every check passed" in capsys.readouterr().out


def test_a_method_s_check_of_the_pool_runs_before_preparing_it_and_in_a_dry_run(bert_pool_dir, tmp_path):
    models = {"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}}
    for dry_run in (True, False):
        EVENTS.clear()
        run = FusionProgram(
            method=OmegaConf.create({"_target_": "fusion_bench.method.WeightedAverageAlgorithm", "normalize": True, "weights": [1.0] * (len(TASKS) + 1)}),
            modelpool=OmegaConf.create({"_target_": f"{__name__}.RecordingPool", "models": models}),
            taskpool=OmegaConf.create({"_target_": "fusion_bench.taskpool.DummyTaskPool"}),
            dry_run=dry_run,
        )
        with pytest.raises(InputError, match=f"weights lists {len(TASKS) + 1} numbers but the pool has {len(TASKS)} task models"):
            run.run()
        assert EVENTS == []  # never prepared
