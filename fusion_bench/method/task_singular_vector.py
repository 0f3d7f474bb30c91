"""Task Singular Vectors merging, TSV-M (Gargiulo et al., CVPR 2025); the math is
fusion_bench.merging.task_singular_vectors. Also the key handling the SVD merges share."""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.merging.per_tensor import TensorMerge, check_exclude_keys, is_merged_as_matrix, merge_per_tensor, task_vectors_of
from fusion_bench.merging.streaming import progress
from fusion_bench.merging.task_singular_vectors import TaskSingularVectors, task_singular_vectors, tsv_merge
from fusion_bench.method.base import BaseAlgorithm, MergeInputs, merge_inputs, output_model
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool, as_modelpool
from fusion_bench.models.per_task_models import PerTaskModels
from fusion_bench.utils.errors import InputError


def matrix_keys(inputs: MergeInputs, exclude_keys: Sequence[str], method: str) -> set[str]:
    """The keys an SVD merge treats as matrices: 2-D and not excluded (exclude_keys may name any
    state-dict name of a tied tensor). InputError where exclude_keys names no key of the model, or
    where nothing is left to decompose (the merge would be a plain average)."""
    canonical = {alias: key for key in inputs.pretrained for alias in inputs.pretrained.aliases(key)}
    for name in exclude_keys:
        if name not in canonical:
            raise InputError(f"exclude_keys names {name!r}, which is not a key of model {PRETRAINED!r}")
    excluded = [canonical[name] for name in exclude_keys]
    matrices = {key for key in inputs.keys if is_merged_as_matrix(key, inputs.pretrained.shape(key), excluded)}
    if not matrices:
        where = "outside exclude_keys" if exclude_keys else "in the models"
        raise InputError(f"{method} found no 2-D weight to decompose {where}: it would only average the task vectors; use method=simple_average instead")
    return matrices


def mean_outside(matrices: set[str], merge_matrix: Callable[[Tensor], Tensor]) -> TensorMerge:
    """merge_matrix(τ stack) for the matrix keys, the mean of the τ_t for every other key."""

    def merge(key: str, theta0: Tensor, task_vectors: Tensor) -> Tensor:
        return merge_matrix(task_vectors) if key in matrices else task_vectors.mean(dim=0)

    return merge


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def check_alpha(alpha) -> float | list[float]:
    """A finite number, or a list of finite numbers (one per task); None, FusionBench's Python default, is 1."""
    if alpha is None:
        return 1.0
    if _is_number(alpha):
        return float(alpha)
    if isinstance(alpha, Iterable) and not isinstance(alpha, (str, bytes, Mapping)):
        values = list(alpha)
        if values and all(_is_number(value) for value in values):
            return [float(value) for value in values]
    raise InputError(f"alpha={alpha!r} must be a finite number (alpha=1) or a list of finite numbers, one per task model (alpha=[1.0, 0.5, ...])")


class TaskSingularVectorMerging(BaseAlgorithm):
    """Per 2-D weight, each task's top ⌊k/T⌋ singular directions side by side, orthogonalised:
    Δ = U⊥ diag(S) V⊥ᵀ; every other tensor (and exclude_keys) is the mean of the task vectors.

    alpha: a number scales Δ (θ = θ₀ + α·Δ); a list scales each τ_t before the SVDs (θ = θ₀ + Δ).
    return_single_task_models: return PerTaskModels, task t's model θ₀ + α·U⊥_t diag(S_t) V⊥_tᵀ
    (the mean elsewhere), built on demand from the factors kept after one pass over the pool.
    """

    def __init__(self, alpha: float | Sequence[float] | None = 1, exclude_keys: Sequence[str] | None = None, return_single_task_models: bool = False):
        self.alpha = check_alpha(alpha)
        self.exclude_keys = check_exclude_keys(exclude_keys)
        if not isinstance(return_single_task_models, bool):
            raise InputError(f"return_single_task_models={return_single_task_models!r} must be true or false")
        self.return_single_task_models = return_single_task_models

    @property
    def makes_per_task_models(self) -> bool:
        return self.return_single_task_models

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        """A list of alphas has one per task model."""
        self._task_weights(modelpool.model_names)

    @torch.no_grad()
    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module | PerTaskModels:
        pool = as_modelpool(modelpool)
        inputs = merge_inputs(pool, method="TaskSingularVectorMerging", need_pretrained=True)
        task_weights = self._task_weights(list(inputs.finetuned))
        matrices = matrix_keys(inputs, self.exclude_keys, "TaskSingularVectorMerging")
        scale = 1.0 if task_weights is not None else self.alpha
        if self.return_single_task_models:
            return self._per_task_models(pool, inputs, matrices, task_weights, scale)
        merge = mean_outside(matrices, tsv_merge)
        if task_weights is not None:
            merge = _weighted(merge, task_weights)
        merged = output_model(pool, PRETRAINED, inputs.keys)
        merge_per_tensor(inputs.pretrained, inputs.finetuned, merged.state_dict(), inputs.keys, merge, scaling_factor=scale, desc="TSV-M")
        return merged

    def _task_weights(self, names: list[str]) -> Tensor | None:
        if not isinstance(self.alpha, list):
            return None
        if len(self.alpha) != len(names):
            raise InputError(f"alpha has {len(self.alpha)} values but the pool has {len(names)} task models ({', '.join(names)}); give one alpha per task model")
        return torch.tensor(self.alpha)

    def _per_task_models(self, pool: BaseModelPool, inputs: MergeInputs, matrices: set[str], task_weights: Tensor | None, scale: float) -> PerTaskModels:
        """One pass keeps each matrix's factors (U⊥, S, V⊥ᵀ: (m + n)·T·⌊k/T⌋ floats, about 1–2× the
        matrix) and each other tensor's mean; model t is then built from them when asked."""
        names = list(inputs.finetuned)
        factors: dict[str, TaskSingularVectors | Tensor] = {}
        for key in progress(inputs.keys, "TSV-M"):
            _, task_vectors = task_vectors_of(inputs.pretrained, inputs.finetuned, key)
            if task_weights is not None:
                task_vectors = _scale_rows(task_vectors, task_weights)
            factors[key] = task_singular_vectors(task_vectors) if key in matrices else task_vectors.mean(dim=0)

        def build(name: str) -> nn.Module:
            task = names.index(name)
            model = output_model(pool, PRETRAINED, inputs.keys)
            state_dict = model.state_dict()
            for key in inputs.keys:
                piece = factors[key].of_task(task) if key in matrices else factors[key]
                state_dict[key].copy_(inputs.pretrained[key].float() + scale * piece)
            return model

        return PerTaskModels(names, build)


def _scale_rows(task_vectors: Tensor, weights: Tensor) -> Tensor:
    """α_t·τ_t for each task t (row t of the stack)."""
    return task_vectors * weights.view(-1, *[1] * (task_vectors.dim() - 1))


def _weighted(merge: TensorMerge, task_weights: Tensor) -> TensorMerge:
    """merge over α_t·τ_t instead of τ_t."""
    return lambda key, theta0, task_vectors: merge(key, theta0, _scale_rows(task_vectors, task_weights))
