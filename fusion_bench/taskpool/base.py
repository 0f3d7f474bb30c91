"""The task pool: how a merged model is scored, task by task."""

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from fusion_bench.models.per_task_models import PerTaskModels
from fusion_bench.reporting.report import average_metrics
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import refuse_unknown_keys
from fusion_bench.utils.parameters import model_summary

TaskMetrics = dict[str, dict[str, float]]  # {task: {metric: value}}


class BaseTaskPool:
    """Scores a model on each of its tasks.

    Subclasses implement `task_names` and `evaluate_tasks`; `evaluate` returns FusionBench's
    report layout: {task: metrics, ..., "average": {...}, "model_info": {...}}. Given per-task
    models (one model per task, as TALL masks make), each task is scored with its own model.
    uses_fabric: whether evaluation needs a Lightning Fabric (device placement); the program only
    creates (and imports) one for pools that do.
    shards_across_processes: whether evaluation on several processes (fabric.devices=N) gives each
        process a share of the batches and adds up the results (fusion_bench.taskpool.sharding).
    runs_models: false for a pool that never runs the model (it only counts parameters): the
        merge then need not build the model's class.
    """

    uses_fabric = False
    shards_across_processes = False
    runs_models = True

    def __init__(self, **kwargs: Any):
        refuse_unknown_keys(self, kwargs, "taskpool")

    def check_modelpool(self, modelpool: Any) -> None:
        """Raise InputError if the pool's models cannot be scored here. The program calls this
        before merging, so a mismatch costs no merge; the default accepts any pool."""

    def prepare(self) -> None:
        """Load and check what does not depend on the merged model (datasets, configs), before the
        merge, so bad input fails before any merging and before anything is saved."""

    def local_paths(self) -> dict[str, Path]:
        """{what it is: path} of the local files and folders the pool reads; a merged model is
        never saved over them."""
        return {}

    def task_names(self) -> list[str]:
        """The tasks scored, in order."""
        raise NotImplementedError

    def check_per_task_models(self, names: Sequence[str]) -> None:
        """Raise InputError unless every task has a model among `names` (checked before merging)."""
        missing = [task for task in self.task_names() if task not in names]
        if missing:
            raise InputError(
                f"the method makes one model per task, but the model pool has none for task {missing[0]!r} "
                f"(it has {', '.join(names)}); score only those tasks or add that task's model"
            )

    def evaluate(self, model: nn.Module | PerTaskModels, fabric: Any = None) -> dict[str, Any]:
        """FusionBench's report: each task's metrics, their average, and the model's size."""
        if isinstance(model, PerTaskModels):
            self.check_per_task_models(list(model))
            tasks = {}
            for task in self.task_names():
                tasks.update(self.evaluate_tasks(model[task], fabric, tasks=[task]))
            model = model.any_model()
        else:
            tasks = self.evaluate_tasks(model, fabric)
        report: dict[str, Any] = dict(tasks)
        if tasks:
            report["average"] = average_metrics(tasks)
        report["model_info"] = model_summary(model)
        return report

    def evaluate_tasks(self, model: nn.Module, fabric: Any = None, tasks: Sequence[str] | None = None) -> TaskMetrics:
        """{task: metrics} for `tasks` (default: all of them)."""
        raise NotImplementedError

