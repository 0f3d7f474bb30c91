"""A model's tensors by name, with shapes and dtypes known up front and each tensor read on demand.

Methods stream over these: they ask for one key of every model at a time, so a pool of checkpoints
on disk is never held in memory at once.
"""

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from fusion_bench.modelpool.safetensors_file import SafetensorsFile


class LazyStateDict(Mapping[str, Tensor]):
    """The Mapping interface plus shape(), dtype() and aliases(), which never read a tensor.

    Tied weights appear once, under their first state-dict name; aliases() lists all their names.
    """

    def shape(self, key: str) -> torch.Size:
        raise NotImplementedError

    def dtype(self, key: str) -> torch.dtype:
        raise NotImplementedError

    def aliases(self, key: str) -> tuple[str, ...]:
        """Every state-dict name of the tensor `key` (itself first): more than one if tied."""
        return (key,)


class ModuleStateDict(LazyStateDict):
    """The tensors of a module already in memory; each storage once (tied weights keep one name)."""

    def __init__(self, module: nn.Module):
        self._tensors: dict[str, Tensor] = {}
        self._aliases: dict[str, list[str]] = {}
        first_name = {}
        for key, tensor in module.state_dict().items():
            identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape)
            if tensor.numel() and identity in first_name:
                self._aliases[first_name[identity]].append(key)
                continue
            first_name[identity] = key
            self._tensors[key] = tensor
            self._aliases[key] = [key]

    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key]

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def aliases(self, key: str) -> tuple[str, ...]:
        return tuple(self._aliases[key])


class SafetensorsStateDict(LazyStateDict):
    """Tensors read from one or more .safetensors files (shards), one per request.

    `key_map` maps the names the model uses to the names in the files, where they differ (a
    checkpoint saved by an older transformers); without it the files' own names are used.
    `aliases` gives the state-dict names of tied tensors, where the model ties some.
    """

    def __init__(
        self,
        files: Sequence[SafetensorsFile],
        key_map: Mapping[str, str] | None = None,
        aliases: Mapping[str, Sequence[str]] | None = None,
    ):
        file_of = {key: file for file in files for key in file.keys()}
        names = key_map if key_map is not None else {key: key for key in file_of}
        self._entries = {key: (file_of[name], name) for key, name in names.items()}
        self._aliases = {key: tuple(names) for key, names in (aliases or {}).items() if key in self._entries}

    def __getitem__(self, key: str) -> Tensor:
        file, name = self._entries[key]
        return file.read(name)

    def __contains__(self, key: object) -> bool:  # Mapping's would read the tensor
        return key in self._entries

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

    def aliases(self, key: str) -> tuple[str, ...]:
        return self._aliases.get(key, (key,))
