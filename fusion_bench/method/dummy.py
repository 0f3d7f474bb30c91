"""No merging: one model of the pool as it is, to score baselines (zero-shot, individual models)."""

from collections.abc import Mapping

from torch import nn

from fusion_bench.method.base import BaseAlgorithm
from fusion_bench.modelpool.base import BaseModelPool, as_modelpool


class DummyAlgorithm(BaseAlgorithm):
    """Returns `model_name` from the pool; by default the pretrained model, else the first one."""

    def __init__(self, model_name: str | None = None):
        self.model_name = model_name

    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        pool = as_modelpool(modelpool)
        return pool.load_model(self.model_name) if self.model_name else pool.load_pretrained_or_first_model()
