"""A model's tensors by name, with shapes and dtypes known up front and each tensor read on demand.

Methods stream over these: they ask for one key of every model at a time, so a pool of checkpoints
on disk is never held in memory at once.
"""

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.modelpool.safetensors_file import SafetensorsFile


class LazyStateDict(Mapping[str, Tensor]):
    """The Mapping interface plus shape() and dtype(), which never read a tensor."""

    def shape(self, key: str) -> torch.Size:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError


class ModuleStateDict(LazyStateDict):
    """The tensors of a module already in memory; each storage once (tied weights keep one name)."""

    def __init__(self, module: nn.Module):
        self._tensors: dict[str, Tensor] = {}
        seen = set()
        for key, tensor in module.state_dict().items():
            identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
            if tensor.numel() and identity in seen:
                continue
            seen.add(identity)
            self._tensors[key] = tensor

    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype


class SafetensorsStateDict(LazyStateDict):
    """Tensors read from one or more .safetensors files (shards), one per request.

    `key_map` maps the names the model uses to the names in the files, where they differ (a
    checkpoint saved by an older transformers); without it the files' own names are used.
    """

    def __init__(self, files: Sequence[SafetensorsFile], key_map: Mapping[str, str] | None = None):
        file_of = {key: file for file in files for key in file.keys()}
        names = key_map if key_map is not None else {key: key for key in file_of}
        self._entries = {key: (file_of[name], name) for key, name in names.items()}

    def __getitem__(self, key: str) -> Tensor:
        file, name = self._entries[key]
        return file.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def shape(self, key: str) -> torch.Size:
        file, name = self._entries[key]
        return file.shape(name)

    def dtype(self, key: str) -> torch.dtype:
        file, name = self._entries[key]
        return file.dtype(name)
