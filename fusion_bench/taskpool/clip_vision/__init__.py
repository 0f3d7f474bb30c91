"""CLIP vision towers scored by zero-shot image classification."""

from fusion_bench.taskpool.clip_vision.taskpool import CLIPVisionModelTaskPool

__all__ = ["CLIPVisionModelTaskPool"]
