"""Task pools: data and evaluation, one metric table per task."""

from fusion_bench.taskpool.base import BaseTaskPool
from fusion_bench.taskpool.dummy import DummyTaskPool

__all__ = ["BaseTaskPool", "DummyTaskPool"]
