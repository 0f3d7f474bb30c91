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

    def check_modelpool(self, modelpool: Any) -> None:
        """Raise InputError if the pool's models cannot be scored here. The program calls this
        before merging, so a mismatch costs no merge; the default accepts any pool."""

    def evaluate(self, model: nn.Module, fabric: Any = None) -> TaskMetrics:
        raise NotImplementedError
