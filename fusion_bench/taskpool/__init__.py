"""Task pools: data and evaluation, one metric table per task."""

from fusion_bench.taskpool.base import BaseTaskPool
from fusion_bench.taskpool.clip_vision import CLIPVisionModelTaskPool
from fusion_bench.taskpool.dummy import DummyTaskPool

__all__ = ["BaseTaskPool", "CLIPVisionModelTaskPool", "DummyTaskPool"]
