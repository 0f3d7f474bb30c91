"""Tensors of a .safetensors file, each memory-mapped on its own.

A mapping of the whole file would count every page read towards the process's resident memory
until the file is closed: streaming nine checkpoints would show nine models' worth of RSS. Here
each tensor gets a mapping of its own byte range that lives exactly as long as the tensor, so
reading is zero-copy and memory holds only the tensors in use; a tensor walked in chunks is read
from the file instead, chunk by chunk (fusion_bench.utils.file_backed).
"""

import ctypes
import functools
import json
import mmap
import os
import struct
import weakref
from pathlib import Path

import torch
from torch import Tensor

from fusion_bench.utils import file_backed
from fusion_bench.utils.errors import InputError

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsFile:
    """The header of one .safetensors file, and its tensors one at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                if header_size > self._size - 8:
                    raise ValueError(f"its header claims {header_size} bytes, more than the file holds")
                header = json.loads(f.read(header_size))
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as error:
            raise InputError(f"cannot read safetensors file {self.path}: {error}") from error
        header.pop("__metadata__", None)
        self._data_start = 8 + header_size
        self._entries = header
        self._open = None

    def __getstate__(self) -> dict:  # a copy (pickled for another process, say) opens the file anew
        return {**self.__dict__, "_open": None}

    def _file(self):
        """The file, open for reading while this object lives: the tensors' mappings and chunk reads use it."""
        if self._open is None:
            self._open = open(self.path, "rb", buffering=0)
            weakref.finalize(self, self._open.close)
        return self._open

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self._entries[key]["dtype"]
        if name not in _DTYPES:
            raise InputError(f"{self.path}: tensor {key!r} has dtype {name}, which fusion_bench cannot read")
        return _DTYPES[name]

    def read(self, key: str) -> Tensor:
        """The tensor, backed by a private (copy-on-write) mapping of its bytes."""
        begin, end = (self._data_start + offset for offset in self._entries[key]["data_offsets"])
        if end > self._size:
            raise InputError(f"{self.path} is truncated: tensor {key!r} is incomplete")
        if begin == end:
            return torch.empty(self.shape(key), dtype=self.dtype(key))
        page_start = begin - begin % mmap.ALLOCATIONGRANULARITY
        mapped = mmap.mmap(self._file().fileno(), end - page_start, offset=page_start, access=mmap.ACCESS_COPY)
        data = torch.frombuffer(mapped, dtype=torch.uint8, count=end - begin, offset=begin - page_start)
        tensor = data.view(self.dtype(key)).reshape(self.shape(key))
        file_backed.register(tensor, functools.partial(self._read_entries, key, begin))
        return tensor

    def _read_entries(self, key: str, begin: int, start: int, out: Tensor) -> None:
        """Fill `out` (the tensor's dtype) with tensor `key`'s flat entries from `start` on, read
        from the file (`begin`: where the tensor's bytes start); fusion_bench.utils.file_backed."""
        size = out.numel() * out.element_size()
        buffer = memoryview((ctypes.c_char * size).from_address(out.data_ptr())).cast("B")
        offset, descriptor = begin + start * out.element_size(), self._file().fileno()
        while buffer:
            count = os.preadv(descriptor, [buffer], offset)
            if count == 0:
                raise InputError(f"{self.path} is truncated: tensor {key!r} is incomplete")
            buffer, offset = buffer[count:], offset + count
