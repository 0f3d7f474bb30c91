"""Task pools: data and evaluation, one metric table per task."""

from fusion_bench.taskpool.base import BaseTaskPool
from fusion_bench.taskpool.clip_vision import CLIPVisionModelTaskPool
from fusion_bench.taskpool.dummy import DummyTaskPool
from fusion_bench.taskpool.flan_t5_glue import FlanT5GLUETextGenerationTaskPool
from fusion_bench.taskpool.text_classification import TextClassificationTaskPool

__all__ = [
    "BaseTaskPool",
    "CLIPVisionModelTaskPool",
    "DummyTaskPool",
    "FlanT5GLUETextGenerationTaskPool",
    "TextClassificationTaskPool",
]
