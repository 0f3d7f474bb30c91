"""TALL masks and Consensus merging (Wang et al., ICML 2024, "Localizing Task Information for
Improved Model Merging and Compression"), streamed chunk by chunk.

τ_t = θ_t − θ₀, and τ_MTL is a merged multi-task vector (Σ_t τ_t for task arithmetic, the TIES
merge τ_m for TIES), unscaled. The TALL mask of task t marks the entries where task t's own
change is at least λ_t times what the merge adds on top of it:

    m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|]

- TALL masks (compression): model t = θ₀ + m_t ⊙ τ_MTL, one model per task from θ₀, τ_MTL and
  T boolean masks (T bits per parameter).
- Consensus merging: keep the entries that at least k tasks' masks mark, m = 1[Σ_t m_t ≥ k], and
  θ = θ₀ + λ·(m ⊙ τ_MTL). k = 0 keeps everything (plain TA / TIES); k > T keeps nothing (θ₀).
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fusion_bench.merging.streaming import FlatOutput, StateDict, aligned_chunks, merge_elementwise, progress
from fusion_bench.merging.task_vector_views import TaskVectorView, ZerosView
from fusion_bench.merging.ties import ties_merge
from fusion_bench.utils.errors import InputError


def tall_masks(task_vectors: Tensor, multi_task_vector: Tensor, lambdas: Tensor) -> Tensor:
    """m_t = 1[|τ_t| ≥ λ_t·|τ_MTL − τ_t|] for each row t of `task_vectors` ([T, ...] → bool [T, ...]).

    ≥ as in the paper's equation; the authors' code uses >, which differs only where both sides
    are exactly equal (an entry no task changed; with λ_t = 0, every entry where τ_t = 0).
    """
    lambdas = lambdas.view(-1, *([1] * (task_vectors.dim() - 1)))
    return task_vectors.abs() >= lambdas * (multi_task_vector - task_vectors).abs()


def consensus_mask(masks: Tensor, consensus_k: int) -> Tensor:
    """m = 1[Σ_t m_t ≥ k] over dim 0: the entries at least k tasks' masks mark."""
    return masks.sum(dim=0, dtype=torch.int32) >= consensus_k


def masked_add(theta0: Tensor, vector: Tensor, mask: Tensor, scaling_factor: float = 1.0) -> Tensor:
    """θ₀ + λ·(m ⊙ τ): θ₀ + λ·τ where the mask is set, θ₀ (exactly) elsewhere."""
    return torch.where(mask, theta0 + scaling_factor * vector, theta0)


class PackedMasks:
    """T boolean masks over the same tensors, T bits per entry: task t's bit is bit t mod 8 of
    byte row ⌊t/8⌋ (so 8 tasks take one byte per parameter, a quarter of one float32 model)."""

    def __init__(self, tasks: int):
        self.tasks = tasks
        self.bits: dict[str, Tensor] = {}  # key → uint8 [⌈T/8⌉, numel]

    def store(self, key: str, numel: int, positions: slice, masks: Tensor) -> None:
        """Record masks ([T, width] bool) of `key` at flat `positions` (the key has `numel` entries)."""
        if key not in self.bits:
            self.bits[key] = torch.zeros(math.ceil(self.tasks / 8), numel, dtype=torch.uint8)
        bits = self.bits[key][:, positions]
        for task, mask in enumerate(masks):
            bits[task // 8] |= mask.to(torch.uint8) << (task % 8)

    def mask(self, key: str, task: int) -> Tensor:
        """Task `task`'s mask of `key`, flat, bool."""
        return ((self.bits[key][task // 8] >> (task % 8)) & 1).bool()

    def density(self, task: int) -> float:
        """The share of entries task `task`'s masks mark."""
        marked = sum(int(self.mask(key, task).sum()) for key in self.bits)
        total = sum(bits.shape[1] for bits in self.bits.values())
        return marked / max(total, 1)


@dataclass
class TallMaskCompression:
    """What the per-task models share besides θ₀: τ_MTL (float32) and the T packed masks."""

    multi_task_vector: dict[str, Tensor]
    masks: PackedMasks


def tall_mask_compress(pretrained: StateDict, finetuned: Mapping[str, StateDict], keys: Sequence[str], lambdas: Tensor) -> TallMaskCompression:
    """One pass over the models: τ_MTL = Σ_t τ_t and each task's TALL mask m_t, for every key.
    InputError, naming the model, on NaN or Inf."""
    models = {"_pretrained_": pretrained, **finetuned}
    compression = TallMaskCompression({}, PackedMasks(len(finetuned)))
    for key in progress(keys, "TALL masks"):
        multi_task_vector = torch.empty(pretrained[key].shape)
        flat = multi_task_vector.view(-1)
        for positions, stack in aligned_chunks(models, key, task_vectors=True, check_finite=True):
            task_vectors = stack[1:]
            summed = task_vectors.sum(dim=0)
            flat[positions] = summed
            compression.masks.store(key, flat.numel(), positions, tall_masks(task_vectors, summed, lambdas))
        compression.multi_task_vector[key] = multi_task_vector
    return compression


def write_tall_mask_model(pretrained: StateDict, compression: TallMaskCompression, task: int, out: StateDict, keys: Sequence[str]) -> None:
    """Write model `task` (its row among the masks), θ₀ + m_t ⊙ τ_MTL, into out[key] for every key."""
    for key in keys:
        multi_task_vector = compression.multi_task_vector[key]
        mask = compression.masks.mask(key, task).view(multi_task_vector.shape)
        out[key].copy_(masked_add(pretrained[key].float(), multi_task_vector, mask))


def consensus_task_arithmetic_merge(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    out: StateDict,
    keys: Sequence[str],
    *,
    lambdas: Tensor,
    consensus_k: int,
    scaling_factor: float,
) -> None:
    """Write θ₀ + λ·(m ⊙ τ_MTL), τ_MTL = Σ_t τ_t and m the consensus of the TALL masks built from
    it, into out[key] for every key: elementwise, so one pass computes it all chunk by chunk."""

    def merge_chunk(stack: Tensor) -> Tensor:
        multi_task_vector = stack[1:].sum(dim=0)
        keep = consensus_mask(tall_masks(stack[1:], multi_task_vector, lambdas), consensus_k)
        return masked_add(stack[0], multi_task_vector, keep, scaling_factor)

    models = {"_pretrained_": pretrained, **finetuned}
    merge_elementwise(models, out, keys, merge_chunk, task_vectors=True, desc="consensus task arithmetic")


def consensus_ties_merge(
    pretrained: StateDict,
    finetuned: Mapping[str, StateDict],
    out: StateDict,
    keys: Sequence[str],
    *,
    lambdas: Tensor,
    consensus_k: int,
    scaling_factor: float,
    threshold: float,
    merge_func: str,
    multiplicity: Mapping[str, int] | None = None,
    zero_entries: int = 0,
) -> None:
    """Write θ₀ + λ·(m ⊙ τ_m) into out[key] for every key: τ_m the TIES merge (unscaled; threshold,
    merge_func, multiplicity and zero_entries as in ties_merge), m the consensus of the TALL masks
    built from τ_m.

    The TIES trim is global, so τ_m comes first: ties_merge over the task vectors with zeros as θ₀
    and scaling 1 writes τ_m exactly (into `out` itself where it is float32, else into a float32
    buffer); a second pass then computes the masks from τ_t and τ_m and writes the result in place.
    """
    ties_vectors = {key: out[key] if out[key].dtype == torch.float32 else torch.empty(out[key].shape) for key in keys}
    task_vectors = {name: TaskVectorView(pretrained, model) for name, model in finetuned.items()}
    ties_merge(
        ZerosView(pretrained), task_vectors, ties_vectors, keys,
        scaling_factor=1.0, threshold=threshold, merge_func=merge_func, multiplicity=multiplicity, zero_entries=zero_entries,
    )  # fmt: skip
    models = {"_pretrained_": pretrained, **finetuned}
    for key in progress(keys, "consensus mask"):
        output = FlatOutput(out[key])
        ties_vector = output.flat if ties_vectors[key] is out[key] else ties_vectors[key].view(-1)
        # the TIES pass checked every model for NaN and Inf
        for positions, stack in aligned_chunks(models, key, task_vectors=True, check_finite=False):
            merged = ties_vector[positions]
            keep = consensus_mask(tall_masks(stack[1:], merged, lambdas), consensus_k)
            output[positions] = masked_add(stack[0], merged, keep, scaling_factor)
        output.finish()


def check_tall_mask_lambda(tall_mask_lambda: float | Sequence[float]) -> float | list[float]:
    """λ: a finite number ≥ 0, or a list of them, one per task (its length is checked against the
    pool by lambdas_per_task)."""
    if isinstance(tall_mask_lambda, Sequence) and not isinstance(tall_mask_lambda, str):
        for value in tall_mask_lambda:
            if not _is_finite_non_negative(value):
                raise InputError(f"tall_mask_lambda lists {value!r}, which is not a finite number ≥ 0; e.g. tall_mask_lambda=[0.4, 0.6]")
        return [float(value) for value in tall_mask_lambda]
    if not _is_finite_non_negative(tall_mask_lambda):
        raise InputError(f"tall_mask_lambda={tall_mask_lambda!r} must be a finite number ≥ 0, or a list of them (one per task); e.g. tall_mask_lambda=0.6")
    return float(tall_mask_lambda)


def lambdas_per_task(tall_mask_lambda: float | list[float], tasks: Sequence[str]) -> Tensor:
    """λ_t for each task, float32: one number for all, or a list in the pool's task order."""
    if isinstance(tall_mask_lambda, float):
        return torch.full((len(tasks),), tall_mask_lambda)
    if len(tall_mask_lambda) != len(tasks):
        raise InputError(
            f"tall_mask_lambda lists {len(tall_mask_lambda)} values, but the pool has {len(tasks)} task models "
            f"({', '.join(tasks)}); give one λ per task, in that order, or a single number"
        )
    return torch.tensor(tall_mask_lambda, dtype=torch.float32)


def check_consensus_k(consensus_k: int) -> int:
    if isinstance(consensus_k, bool) or not isinstance(consensus_k, int) or consensus_k < 0:
        raise InputError(
            f"consensus_k={consensus_k!r} must be an integer ≥ 0: the least number of tasks whose TALL masks "
            "must mark a parameter for it to be kept, e.g. consensus_k=2"
        )
    return consensus_k


def _is_finite_non_negative(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
