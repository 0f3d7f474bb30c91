"""Tensors of a PyTorch state-dict file (.bin, .pt, .pth), with SafetensorsFile's interface.

A pickle can name any function for unpickling to call, so these files are read only with
torch.load(weights_only=True), which accepts tensors and plain containers and refuses everything
else before calling it: reading a checkpoint never runs its code.

torch.save's zip format is memory-mapped (mmap=True): a tensor's bytes are read when it is used.
Unlike SafetensorsFile, the mapping covers the whole file and lives as long as this object, so the
pages read count towards resident memory until then. Legacy files (saved with
_use_new_zipfile_serialization=False) cannot be mapped and are read into memory.
"""

import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from fusion_bench.utils.errors import InputError, first_line

TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_WRAPPER_KEYS = ("state_dict", "model")  # training scripts save {"state_dict": {...}}
_ZIP_MAGIC = b"PK\x03\x04"
_READ_ERRORS = (OSError, RuntimeError, EOFError, LookupError, ValueError)  # what torch.load raises on a damaged file


class TorchStateDictFile:
    """One state dict saved with torch.save: {name: tensor}.

    A file holding nothing but such a dict under a single key "state_dict" or "model" (as training
    scripts save it) is unwrapped; anything else that is not a flat mapping of names to tensors
    (a pickled module, a nested dict, a checkpoint with an optimizer) is refused.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tensors = _flat_state_dict(self.path, _load(self.path))

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def read(self, key: str) -> Tensor:
        return self._tensors[key]


def weights_only_refusal(error: pickle.UnpicklingError) -> str:
    """What torch.load(weights_only=True) refused, without the advice around it (which is how
    to load the file unsafely)."""
    detail = str(error).split("WeightsUnpickler error:")[-1]
    lines = [line.strip() for line in detail.splitlines() if line.strip()]
    named = [line for line in lines if "GLOBAL" in line]  # "... GLOBAL posix.system ..."
    return (named or lines or [type(error).__name__])[0].split(" Please use")[0].rstrip(".")


def _load(path: Path) -> object:
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it may not read; it then refuses, or not, itself
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as error:
        raise InputError(
            f"{path} is not a plain state dict: torch.load(weights_only=True) refuses it ({weights_only_refusal(error)}); "
            "fusion_bench never runs a checkpoint's pickled code; save it as safetensors or a plain state dict"
        ) from error
    except _READ_ERRORS as error:
        raise InputError(
            f"cannot read PyTorch state dict {path} ({type(error).__name__}: {first_line(error)}); "
            "is it complete, and saved with torch.save?"
        ) from error


def _is_zip(path: Path) -> bool:
    """Whether torch.save wrote the file in its zip format, the only one torch.load can map."""
    with open(path, "rb") as f:
        return f.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC


def _flat_state_dict(path: Path, loaded: object) -> dict[str, Tensor]:
    if isinstance(loaded, Mapping) and len(loaded) == 1 and next(iter(loaded)) in _WRAPPER_KEYS:
        loaded = next(iter(loaded.values()))
    problem = _why_not_flat(loaded)
    if problem:
        raise InputError(f"{path} is not a flat state dict: {problem}; save model.state_dict() with torch.save, or save it as safetensors")
    return {key: tensor.detach() for key, tensor in loaded.items()}  # nn.Parameters would track gradients


def _why_not_flat(loaded: object) -> str | None:
    if not isinstance(loaded, Mapping):
        return f"it holds a {type(loaded).__name__}, not a dict of tensors"
    if not loaded:
        return "it holds no tensors"
    for key, value in loaded.items():
        if not isinstance(key, str):
            return f"its key {key!r} is not a name"
        if not isinstance(value, Tensor):
            return f"its {key!r} is a {'dict' if isinstance(value, Mapping) else type(value).__name__}, not a tensor"
    return None
