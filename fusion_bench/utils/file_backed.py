"""Reading chunks of file-backed tensors from their files rather than through their mappings.

A checkpoint's tensor (fusion_bench.modelpool.safetensors_file) is a private memory mapping of its
bytes. Read through the mapping, every 4 KiB page costs a page fault and then stays resident until
the tensor is dropped, so a merge walking n models' largest tensors chunk by chunk would hold n of
them whole, and giving the pages back as it goes (madvise) costs as much again. The streaming loop
(fusion_bench.merging.streaming) reads each chunk with `read_chunk` instead: a tensor whose file
reader registered itself is read with one pread into the chunk's buffer, a copy out of the page
cache that leaves nothing mapped; any other tensor is copied. The readers are kept beside the
tensors, not on them, so that a tensor saved or copied carries nothing of ours
(torch.load(weights_only=True) would refuse it).
"""

import weakref
from collections.abc import Callable

import torch
from torch import Tensor

# id(tensor): read(first entry, out) fills the contiguous `out` (the tensor's dtype) from the file
_readers: dict[int, Callable[[int, Tensor], None]] = {}


def register(tensor: Tensor, read: Callable[[int, Tensor], None]) -> None:
    """`read(start, out)` fills `out` with the tensor's flat entries from `start` on, from its file."""
    _readers[id(tensor)] = read
    weakref.finalize(tensor, _readers.pop, id(tensor), None)


def read_chunk(tensor: Tensor, flat: Tensor, positions: slice, out: Tensor) -> None:
    """out ← flat[positions], converted to out's dtype; `flat` is tensor.reshape(-1) and `out` is
    contiguous. Registered tensors are read from their files, others copied."""
    read = _readers.get(id(tensor))
    if read is None:
        out.copy_(flat[positions])
    elif out.dtype == tensor.dtype:
        read(positions.start, out)
    else:  # a bf16 checkpoint merged in float32, say
        staging = torch.empty(positions.stop - positions.start, dtype=tensor.dtype)
        read(positions.start, staging)
        out.copy_(staging)
