"""DARE, drop and rescale (Yu et al., ICML 2024, "Language Models are Super Mario").

d(τ) = m ⊙ τ / (1 − p), where each entry of the mask m is kept (1) with probability 1 − p,
independently: then E[d(τ)] = τ. The merges run on the d(τ_t) as they would on the τ_t.

A mask is reproducible from (seed, model name, key) alone: it is drawn by a generator seeded with a
stable hash of the three, entry by entry from the tensor's first to its last, so it does not depend
on the order the keys are read in, on how a tensor is chunked, or on how often a merge reads the
tensor (TIES reads each key more than once). Task arithmetic and averaging drop each chunk inside
their stream (`chunk_drops`): torch's CPU generator fills a tensor entry by entry, so drawing a
tensor's chunks in order gives the mask drawn whole, and the whole-tensor passes are saved. TIES,
which samples entries out of order, drops whole tensors (`dare_transform`).
"""

import hashlib
from collections.abc import Container, Sequence

import torch
from torch import Tensor

from fusion_bench.merging.streaming import RowTransform, RowTransformsPerKey
from fusion_bench.merging.task_vector_views import TaskVectorTransform
from fusion_bench.utils.errors import InputError


def check_sparsity_ratio(sparsity_ratio: float) -> float:
    """p must lie in [0, 1): p = 1 would drop everything (and divide by 0)."""
    if isinstance(sparsity_ratio, bool) or not isinstance(sparsity_ratio, (int, float)) or not 0 <= sparsity_ratio < 1:
        raise InputError(f"sparsity_ratio={sparsity_ratio!r} must be a number in [0, 1): the share of task-vector entries dropped, e.g. sparsity_ratio=0.5")
    return float(sparsity_ratio)


def mask_seed(seed: int, model: str, key: str) -> int:
    """A 64-bit generator seed for the mask of (model, key): BLAKE2b of the three, the same in every
    process and on every machine (Python's hash() of a string is salted per process)."""
    text = "\0".join((str(seed), model, key)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def keep_mask(shape: torch.Size, sparsity_ratio: float, generator: torch.Generator) -> Tensor:
    """m_i = [u_i ≥ p] as float32 0 or 1, u_i ~ U[0, 1) drawn by `generator`: each entry kept with
    probability 1 − p. Compared in place, as floats: a boolean tensor costs a pass more on CPU."""
    return torch.rand(shape, generator=generator).ge_(sparsity_ratio)


def random_drop(task_vector: Tensor, sparsity_ratio: float, generator: torch.Generator, *, rescale: bool) -> Tensor:
    """d(τ) = m ⊙ τ / (1 − p) (without the division if not `rescale`), m from keep_mask.

    p = 0 returns τ itself, nothing drawn. Multiplying by the mask, rather than selecting, keeps a
    NaN or Inf in τ visible to the merges' finiteness checks.
    """
    if sparsity_ratio == 0:
        return task_vector
    return _drop(task_vector, sparsity_ratio, generator, rescale=rescale)


def _drop(task_vector: Tensor, sparsity_ratio: float, generator: torch.Generator, *, rescale: bool, out: Tensor | None = None) -> Tensor:
    dropped = torch.mul(task_vector, keep_mask(task_vector.shape, sparsity_ratio, generator).to(task_vector.device), out=out)
    return dropped.div_(1 - sparsity_ratio) if rescale else dropped


def dare_transform(seed: int, model: str, sparsity_ratio: float, *, rescale: bool, dropped_keys: Container[str] | None = None) -> TaskVectorTransform:
    """The TaskVectorView transform that drops model `model`'s task vector key by key, each key's
    mask drawn from a generator seeded by mask_seed(seed, model, key). Keys not in `dropped_keys`
    (None: every key is dropped) keep τ whole."""

    def drop(key: str, task_vector: Tensor) -> Tensor:
        if dropped_keys is not None and key not in dropped_keys:
            return task_vector
        generator = torch.Generator().manual_seed(mask_seed(seed, model, key))
        return random_drop(task_vector, sparsity_ratio, generator, rescale=rescale)

    return drop


def chunk_drops(seed: int, models: Sequence[str], sparsity_ratio: float, *, rescale: bool, dropped_keys: Container[str] | None = None) -> RowTransformsPerKey:
    """dare_transform's drops, chunk by chunk (streaming.aligned_chunks' `row_transforms`): each
    (model, key)'s generator, seeded as there, goes on drawing from one chunk to the next, so
    the chunks' masks make up the whole tensor's."""

    def for_key(key: str) -> dict[str, RowTransform]:
        if sparsity_ratio == 0 or (dropped_keys is not None and key not in dropped_keys):
            return {}
        return {model: _continuing_drop(torch.Generator().manual_seed(mask_seed(seed, model, key)), sparsity_ratio, rescale) for model in models}

    return for_key


def _continuing_drop(generator: torch.Generator, sparsity_ratio: float, rescale: bool) -> RowTransform:
    return lambda chunk: _drop(chunk, sparsity_ratio, generator, rescale=rescale, out=chunk)
