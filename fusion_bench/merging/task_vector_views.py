"""State-dict views that let the streaming merges run on transformed task vectors.

The merges read θ₀ and θ_t and form τ_t = θ_t − θ₀ themselves. To merge transformed task vectors
(DARE's dropped ones, say) exactly, hand them `zeros_like(θ₀)` as θ₀ and the transformed τ_t as
θ_t: they then see τ_t unrounded, and θ₀ is added once at the end (add_pretrained), which rounds
exactly as θ₀ + λ·τ_m would have.
"""

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor

from fusion_bench.merging.streaming import StateDict

# (key, τ_t of that key as float32) → the transformed τ_t
TaskVectorTransform = Callable[[str, Tensor], Tensor]


class TaskVectorView(Mapping[str, Tensor]):
    """τ_t = θ_t − θ₀ per key, float32, computed when asked, optionally transformed."""

    def __init__(self, pretrained: StateDict, finetuned: StateDict, transform: TaskVectorTransform | None = None):
        self.pretrained, self.finetuned, self.transform = pretrained, finetuned, transform

    def __getitem__(self, key: str) -> Tensor:
        task_vector = self.finetuned[key].float() - self.pretrained[key].float()
        return self.transform(key, task_vector) if self.transform else task_vector

    def __iter__(self) -> Iterator[str]:
        return iter(self.pretrained)

    def __len__(self) -> int:
        return len(self.pretrained)

    def __contains__(self, key: object) -> bool:
        return key in self.pretrained


class ZerosView(Mapping[str, Tensor]):
    """Zeros shaped like `like`'s tensors, float32: the θ₀ of merges over TaskVectorViews."""

    def __init__(self, like: StateDict):
        self.like = like

    def __getitem__(self, key: str) -> Tensor:
        return torch.zeros(self.like[key].shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.like)

    def __len__(self) -> int:
        return len(self.like)

    def __contains__(self, key: object) -> bool:
        return key in self.like


def add_pretrained(pretrained: StateDict, out: StateDict, keys) -> None:
    """out[key] += θ₀[key]: turns a merged task vector written by a merge over views into a model."""
    for key in keys:
        out[key].add_(pretrained[key].to(out[key].dtype))
