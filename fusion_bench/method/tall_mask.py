"""TALL masks (Wang et al., ICML 2024): one model per task from θ₀, τ_MTL and T boolean masks; the
math is fusion_bench.merging.tall_masks."""

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from fusion_bench.merging.tall_masks import check_tall_mask_lambda, lambdas_per_task, tall_mask_compress, write_tall_mask_model
from fusion_bench.method.base import BaseAlgorithm, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.models.per_task_models import PerTaskModels
from fusion_bench.utils.errors import InputError

log = logging.getLogger(__name__)


class TallMaskTaskArithmeticAlgorithm(BaseAlgorithm):
    """Compresses the task models into τ_MTL = Σ_t τ_t and one TALL mask per task,
    m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|], and returns one model per task, θ₀ + m_t ⊙ τ_MTL.

    tall_mask_lambda: λ, one number for every task or a list with one λ_t per task (in the pool's
    order). debug, verbose: FusionBench's keys, accepted and without effect here.

    `run` returns PerTaskModels ({task: model}), each built when asked for: memory holds θ₀ (as the
    pool serves it), τ_MTL (float32) and the masks (T bits per parameter), plus one built model.
    """

    makes_per_task_models = True

    def __init__(self, tall_mask_lambda: float | Sequence[float] = 0.6, debug: int = 0, verbose: int = 0):
        self.tall_mask_lambda = check_tall_mask_lambda(tall_mask_lambda)
        for key, value in (("debug", debug), ("verbose", verbose)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise InputError(f"{key}={value!r} must be an integer, e.g. {key}=0")
        self.debug, self.verbose = debug, verbose

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        """A list of λs has one per task model."""
        lambdas_per_task(self.tall_mask_lambda, modelpool.model_names)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> PerTaskModels:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="tall_mask", need_pretrained=True)
        tasks = list(inputs.finetuned)
        lambdas = lambdas_per_task(self.tall_mask_lambda, tasks)
        compression = tall_mask_compress(inputs.pretrained, inputs.finetuned, inputs.keys, lambdas)
        for index, task in enumerate(tasks):
            log.info("TALL mask of %s (λ=%g) keeps %.1f%% of the merged entries", task, float(lambdas[index]), 100 * compression.masks.density(index))

        @torch.no_grad()
        def build(task: str) -> nn.Module:
            model = output_model(pool, PRETRAINED, inputs.keys)
            write_tall_mask_model(inputs.pretrained, compression, tasks.index(task), model.state_dict(), inputs.keys)
            return model

        return PerTaskModels(tasks, build)
