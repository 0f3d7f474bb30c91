"""Walk the aligned tensors of several models key by key, and each key in cache-sized chunks.

For each key, every model's tensor is fetched (lazy state dicts map it from disk, unread) and
dropped after the key. Within a key, the math runs on one [n_models, width] chunk at a time, read
from the checkpoint files into one buffer (fusion_bench.utils.file_backed): a chain of elementwise
ops over a chunk that fits in cache runs several times faster than the same chain over whole
tensors, which is bound by memory bandwidth.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from fusion_bench.utils.errors import InputError
from fusion_bench.utils.file_backed import read_chunk
from fusion_bench.utils.progress import progress_bar

CHUNK_ELEMENTS = 1 << 19  # elements per chunk over all models: about a core's L2 cache

StateDict = Mapping[str, Tensor]
RowTransform = Callable[[Tensor], None]  # changes one model's row of a chunk in place
RowTransformsPerKey = Callable[[str], Mapping[str, RowTransform]]  # key → {model name: its RowTransform}


def flat_numel(sizes: Mapping[str, int], weights: Mapping[str, int]) -> int:
    """The entries of the flat vector that lists each key's `sizes` entries `weights` times."""
    return sum(size * weights[key] for key, size in sizes.items())


def progress(keys: Sequence[str], desc: str) -> Iterator[str]:
    """A progress bar over keys, on terminals only."""
    return progress_bar(keys, desc=desc, unit="tensor")


def aligned_chunks(
    models: Mapping[str, StateDict],
    key: str,
    *,
    task_vectors: bool,
    check_finite: bool,
    row_transforms: Mapping[str, RowTransform] | None = None,
) -> Iterator[tuple[slice, Tensor]]:
    """Yield (positions, stack): stack[i] is model i's `key`, flattened, float32, at positions.

    task_vectors: rows after the first are θ_t − θ₀, the first model being θ₀.
    check_finite: raise InputError, naming the model, on NaN or Inf.
    row_transforms: {model name: f}, f changing that model's row of each chunk in place (after the
    subtraction and the check), the chunks in order from the first.
    The stack is a reused buffer: use it (it may be modified) before asking for the next chunk.
    """
    names = list(models)
    transforms = [(names.index(name), transform) for name, transform in (row_transforms or {}).items()]
    tensors = [models[name][key] for name in names]
    sources = [tensor.reshape(-1) for tensor in tensors]
    numel = sources[0].numel()
    width = max(1, min(numel, CHUNK_ELEMENTS // len(sources)))
    buffer = torch.empty(len(sources), width)
    for start in range(0, numel, width):
        positions = slice(start, min(start + width, numel))
        stack = buffer[:, : positions.stop - start]
        for row, (tensor, source) in enumerate(zip(tensors, sources)):
            read_chunk(tensor, source, positions, stack[row])
        if task_vectors:
            stack[1:].sub_(stack[0])
        # A float32 sum is NaN or inf whenever an element is, and costs little; only then look
        # closer at the sources (a sum, or a difference, of large finite values may overflow).
        if check_finite and not torch.isfinite(stack.sum()):
            _raise_if_not_finite(sources, names, positions, key)
        for row, transform in transforms:
            transform(stack[row])
        yield positions, stack


def merge_elementwise(
    models: Mapping[str, StateDict],
    out: StateDict,
    keys: Sequence[str],
    combine: Callable[[Tensor], Tensor],
    *,
    task_vectors: bool,
    desc: str,
    row_transforms: RowTransformsPerKey | None = None,
) -> None:
    """Write combine(stack) into out[key] for every key, chunk by chunk, for merges where each
    output entry depends only on the models' entries at the same place.

    stack is aligned_chunks' [n_models, width] float32 chunk (rows after the first are task
    vectors if `task_vectors`), checked for NaN and Inf; combine returns the [width] output.
    row_transforms(key), if given, is aligned_chunks' `row_transforms` for that key.
    """
    for key in progress(keys, desc):
        output = FlatOutput(out[key])
        transforms = row_transforms(key) if row_transforms else None
        for positions, stack in aligned_chunks(models, key, task_vectors=task_vectors, check_finite=True, row_transforms=transforms):
            output[positions] = combine(stack)
        output.finish()


def sampled_task_vectors(
    models: Mapping[str, StateDict], key: str, every: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, int]]:
    """Yield (task_vectors, weight): a random sample of `key`'s task-vector entries, θ₀ being the
    first model's. One entry is drawn from every `every` consecutive ones and stands for all of
    them (weight `every`); the entries past the last whole stretch stand for themselves (weight 1).
    """
    sources = [models[name][key].reshape(-1) for name in models]
    numel = sources[0].numel()
    stretches = numel // every
    width = max(1, min(stretches, CHUNK_ELEMENTS // len(sources)))
    for start in range(0, stretches, width):
        count = min(width, stretches - start)
        offsets = torch.randint(every, (count, 1), generator=generator)
        span = slice(start * every, (start + count) * every)
        stack = torch.stack([source[span].view(count, every).gather(1, offsets).squeeze(1) for source in sources]).float()
        yield stack[1:] - stack[0], every
    if stretches * every < numel:
        stack = torch.stack([source[stretches * every :] for source in sources]).float()
        yield stack[1:] - stack[0], 1


def _raise_if_not_finite(sources: Sequence[Tensor], names: Sequence[str], positions: slice, key: str) -> None:
    for source, name in zip(sources, names):
        if not torch.isfinite(source[positions]).all():
            raise InputError(f"model {name!r} has NaN or Inf values in {key!r}; fix or drop that checkpoint")


class FlatOutput:
    """The flat view of an output tensor that results are written into, in the tensor's dtype (a
    copy if not contiguous, written back by finish())."""

    def __init__(self, target: Tensor):
        self.target = target
        self.flat = target.view(-1) if target.is_contiguous() else target.flatten()

    def __setitem__(self, positions: slice | Tensor, values: Tensor) -> None:
        self.flat[positions] = values.to(self.flat.dtype)  # float32 math into a bf16 model, say

    def finish(self) -> None:
        if not self.target.is_contiguous():
            self.target.copy_(self.flat.view_as(self.target))
