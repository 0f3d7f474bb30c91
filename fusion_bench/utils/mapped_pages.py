"""Giving back the memory of file-mapped tensors that a merge is done with.

A checkpoint's tensor mapped from its file (fusion_bench.modelpool.safetensors_file) keeps every
page read resident until the tensor is dropped: a merge walking n models' largest tensors chunk
by chunk would hold n of them whole. The file reader registers how to drop a tensor's leading
pages; the streaming loop (fusion_bench.merging.streaming) calls `release_before` after each
chunk. Kept beside the tensors, not on them, so that a tensor saved or copied carries nothing of
ours (torch.load(weights_only=True) would refuse it).
"""

import weakref
from collections.abc import Callable

from torch import Tensor

_releases: dict[int, Callable[[int], None]] = {}  # id(tensor): release(first n entries)


def register(tensor: Tensor, release: Callable[[int], None]) -> None:
    """`release(n)` drops the pages holding only the tensor's first n entries (flat)."""
    _releases[id(tensor)] = release
    weakref.finalize(tensor, _releases.pop, id(tensor), None)


def release_before(tensor: Tensor, entries: int) -> None:
    """The caller is done with the tensor's first `entries` entries; a no-op for tensors not mapped."""
    release = _releases.get(id(tensor))
    if release is not None:
        release(entries)
