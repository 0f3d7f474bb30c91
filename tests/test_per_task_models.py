"""Per-task models: built on demand one at a time, task t scored with model t, saved per task,
and refused before merging where a task has no model or the task pool cannot score them."""

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from fusion_bench.method import BaseAlgorithm
from fusion_bench.modelpool import AutoModelPool
from fusion_bench.models.per_task_models import PerTaskModels
from fusion_bench.programs import FusionProgram
from fusion_bench.reporting.report import meta
from fusion_bench.taskpool.base import BaseTaskPool
from fusion_bench.utils.errors import InputError
from tests.conftest import TASKS

BUILT: list[str] = []


class OwnModels(BaseAlgorithm):
    """Model t is task t's own fine-tuned model, built when asked."""

    makes_per_task_models = True

    def run(self, modelpool):
        def build(name):
            BUILT.append(name)
            return modelpool.load_model(name)

        return PerTaskModels(modelpool.model_names, build)


class WhichModel(BaseTaskPool):
    """Scores a model on a task with the sum of its weights, so each model is recognisable."""

    def __init__(self, tasks):
        self.tasks = list(tasks)

    def task_names(self):
        return self.tasks

    def evaluate_tasks(self, model, fabric=None, tasks=None):
        return {task: {"weight_sum": weight_sum(model)} for task in tasks or self.tasks}


class FusionBenchStylePool:
    """A task pool as FusionBench writes them: evaluate(model) only, no per-task scoring."""

    def evaluate(self, model):
        return {}


def program(bert_pool_dir, taskpool, **settings) -> FusionProgram:
    models = {"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}}
    return FusionProgram(
        method=OmegaConf.create({"_target_": f"{__name__}.OwnModels"}),
        modelpool=OmegaConf.create({"_target_": "fusion_bench.modelpool.AutoModelPool", "models": models}),
        taskpool=OmegaConf.create(taskpool),
        **settings,
    )


def weight_sum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


def test_models_are_built_on_demand_and_one_at_a_time():
    built = []
    models = PerTaskModels(["a", "b"], lambda name: built.append(name) or nn.Linear(2, 2))
    assert "a" in models and list(models) == ["a", "b"] and built == []
    first = models["a"]
    assert models["a"] is first and built == ["a"]  # the last model built is kept
    models["b"]
    assert built == ["a", "b"] and models.any_model() is models["b"]
    with pytest.raises(KeyError):
        models["c"]


def test_each_task_is_scored_with_its_own_model_and_saved_in_its_own_folder(bert_pool_dir, tmp_path):
    BUILT.clear()
    report = program(
        bert_pool_dir, {"_target_": f"{__name__}.WhichModel", "tasks": list(TASKS)}, merged_model_save_path=str(tmp_path / "merged")
    ).run()
    pool = AutoModelPool(models={task: str(bert_pool_dir / task) for task in TASKS})
    for task in TASKS:
        assert report[task]["weight_sum"] == pytest.approx(weight_sum(pool.load_model(task)), rel=1e-12)
        saved = AutoModelPool(models={task: str(tmp_path / "merged" / task)}).load_model(task)
        assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), pool.load_model(task).state_dict().values()))
    assert meta(report)["per_task_models"] == list(TASKS)
    assert sorted(path.name for path in (tmp_path / "merged").iterdir()) == sorted([*TASKS, "fusion_bench_merged_model.json"])
    assert BUILT == list(TASKS) * 2  # once to save, once to score: one model in memory at a time


def test_a_task_without_its_model_is_refused_before_merging(bert_pool_dir):
    BUILT.clear()
    with pytest.raises(InputError, match="has none for task 'other'"):
        program(bert_pool_dir, {"_target_": f"{__name__}.WhichModel", "tasks": [TASKS[0], "other"]}).run()
    assert BUILT == []


def test_a_task_pool_that_cannot_score_per_task_models_is_refused_before_merging(bert_pool_dir):
    with pytest.raises(InputError, match="FusionBenchStylePool cannot score"):
        program(bert_pool_dir, {"_target_": f"{__name__}.FusionBenchStylePool"}).run()


class FusionBenchStyleScorer:
    """FusionBench's task-pool interface is evaluate(model) alone."""

    def evaluate(self, model):
        return {"only": {"weight_sum": weight_sum(model)}}


def test_a_task_pool_with_fusion_bench_s_interface_alone_scores_a_merged_model(bert_pool_dir):
    models = {"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}}
    report = FusionProgram(
        method=OmegaConf.create({"_target_": "fusion_bench.method.SimpleAverageAlgorithm"}),
        modelpool=OmegaConf.create({"_target_": "fusion_bench.modelpool.AutoModelPool", "models": models}),
        taskpool=OmegaConf.create({"_target_": f"{__name__}.FusionBenchStyleScorer"}),
    ).run()
    assert set(report["only"]) == {"weight_sum"} and meta(report)["per_task_models"] is None
