"""The task pool: how a merged model is scored, task by task."""

from typing import Any

from torch import nn

TaskMetrics = dict[str, dict[str, float]]  # {task: {metric: value}}


class BaseTaskPool:
    """Scores a model on each of its tasks.

    uses_fabric: whether `evaluate` needs a Lightning Fabric (device placement); the program only
    creates (and imports) one for pools that do.
    """

    uses_fabric = False

    def evaluate(self, model: nn.Module, fabric: Any = None) -> TaskMetrics:
        raise NotImplementedError
