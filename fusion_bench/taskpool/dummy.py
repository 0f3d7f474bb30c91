"""A task pool with no tasks: the report then holds only the merged model's size."""

from typing import Any

from torch import nn

from fusion_bench.taskpool.base import BaseTaskPool, TaskMetrics


class DummyTaskPool(BaseTaskPool):
    """Scores nothing; for merging without evaluation (e.g. with merged_model_save_path)."""

    def evaluate(self, model: nn.Module, fabric: Any = None) -> TaskMetrics:
        return {}
