"""`fusion_bench --config-name finetune`: build the offline pool's fine-tuned models, once.

The main run builds whatever it is missing by itself; this program builds them ahead of time (for
example other seeds, `modelpool.seed=1`) and lists where each one lives.
"""

from omegaconf import DictConfig

from fusion_bench.modelpool.offline_text import OfflineTextPool
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import instantiate_checked


class FinetuneProgram:
    def __init__(self, modelpool: DictConfig):
        self.modelpool = modelpool

    def run(self) -> None:
        pool = instantiate_checked(self.modelpool, "modelpool")
        if not isinstance(pool, OfflineTextPool):
            raise InputError("the finetune program builds the offline text pool's models; use modelpool=OfflineTextPool/minilm_text8")
        pool.build()
        width = max(len(task) for task in pool.model_names)
        for task in pool.model_names:
            print(f"{task.ljust(width)}  {pool.checkpoint(task)}")
