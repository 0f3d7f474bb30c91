"""Which tensor of a Hugging Face checkpoint fills which entry of a model's state dict.

Checkpoints saved by transformers 4.x name some tensors differently from the 5.x modules (for
example `vision_model.embeddings.*` in a checkpoint for `embeddings.*` in CLIPVisionModel);
from_pretrained renames them on load. To read such a checkpoint tensor by tensor, this applies the
same renaming rules to the names alone.
"""

from collections.abc import Iterable

from torch import nn


def unique_state_dict_keys(module: nn.Module) -> list[str]:
    """State-dict keys, each tied parameter under its first name only (works on the meta device)."""
    return list(tied_names(module))


def tied_names(module: nn.Module) -> dict[str, list[str]]:
    """{first state-dict name: all names of that tensor} (works on the meta device)."""
    names: dict[int, list[str]] = {}
    for key, tensor in module.state_dict(keep_vars=True).items():
        names.setdefault(id(tensor), []).append(key)
    return {group[0]: group for group in names.values()}


def checkpoint_key_map(model: nn.Module, file_keys: Iterable[str]) -> dict[str, str] | None:
    """{state-dict key: checkpoint key} for the keys the checkpoint provides, as from_pretrained
    would match them; None when loading would transform tensors, not only rename them (e.g. fuse
    experts), so the checkpoint cannot be read key by key."""
    state_dict = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or None
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # transformers 4.x: names differ at most by the base model prefix
        return {_with_prefix(key, prefix, state_dict): key for key in file_keys if _with_prefix(key, prefix, state_dict)}
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    key_map = {}
    for file_key in file_keys:
        key, converter = rename_source_key(file_key, renamings, converters, prefix, state_dict)
        if key not in state_dict and file_key in state_dict:
            key, converter = rename_source_key(file_key, [], [], prefix, state_dict)
        if key in state_dict:
            if converter is not None:
                return None
            key_map[key] = file_key
    return key_map


def _with_prefix(key: str, prefix: str | None, state_dict) -> str | None:
    if key in state_dict:
        return key
    if prefix and key.startswith(prefix + ".") and key[len(prefix) + 1 :] in state_dict:
        return key[len(prefix) + 1 :]
    if prefix and f"{prefix}.{key}" in state_dict:
        return f"{prefix}.{key}"
    return None
