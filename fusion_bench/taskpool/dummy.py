"""A task pool with no tasks: the report then holds only the merged model's size."""

from collections.abc import Sequence
from typing import Any

from torch import nn

from fusion_bench.taskpool.base import BaseTaskPool, TaskMetrics
from fusion_bench.utils.errors import InputError


class DummyTaskPool(BaseTaskPool):
    """Scores nothing; for merging without evaluation (e.g. with merged_model_save_path).
    `evaluate` returns {"model_info": {trainable_params, all_params, trainable_percentage}}, as
    FusionBench's does.

    model_save_path: FusionBench's way to save the model from the task pool; only null is taken,
        since saving belongs to merged_model_save_path, which is checked before the merge and
        never replaces files it did not write.
    """

    runs_models = False

    def __init__(self, model_save_path: str | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if model_save_path is not None:
            raise InputError(f"taskpool.model_save_path={model_save_path} is not supported; save the merged model with merged_model_save_path={model_save_path}")

    def task_names(self) -> list[str]:
        return []

    def evaluate_tasks(self, model: nn.Module, fabric: Any = None, tasks: Sequence[str] | None = None) -> TaskMetrics:
        return {}
