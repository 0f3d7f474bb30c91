"""Models from Hugging Face folders, hub ids or .safetensors files, read lazily where possible."""

import json
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class
from torch import nn

from fusion_bench.errors import InputError
from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool
from fusion_bench.modelpool.checkpoint_keys import checkpoint_key_map, tied_names, unique_state_dict_keys
from fusion_bench.modelpool.lazy_state_dict import LazyStateDict, SafetensorsStateDict
from fusion_bench.modelpool.safetensors_file import SafetensorsFile

_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


class AutoModelPool(BaseModelPool):
    """`models` maps names to local Hugging Face folders, hub ids, or `.safetensors` state dicts
    (which take the architecture of `_pretrained_`); they load with `model_class`.from_pretrained.

    Methods read their safetensors tensor by tensor instead of loading whole models.
    """

    def __init__(self, models: Mapping[str, Any], *, model_class: str = "transformers.AutoModel", **datasets):
        super().__init__(models, **datasets)
        self.model_class_name = model_class
        self._architectures: dict[str, nn.Module] = {}  # by config.json text: task models share one

    @cached_property
    def model_class(self) -> type:
        try:
            return get_class(self.model_class_name)
        except Exception as error:
            raise InputError(f"model_class={self.model_class_name!r} cannot be imported: {error}") from error

    def load_model_from_spec(self, name: str, spec: Any) -> nn.Module:
        path = self.model_path(name)
        if path.is_file():  # a bare state dict: the architecture is the pretrained model's
            model = self.load_model_copy(PRETRAINED)
            state_dict = self.state_dict(name)
            missing = [key for key in unique_state_dict_keys(model) if key not in state_dict]
            if missing:
                raise InputError(f"{path} lacks {missing[0]!r} of the pretrained model; is it a checkpoint of that model?")
            model.load_state_dict(dict(state_dict), strict=False)  # tied names follow their first name
            return model
        return self.model_class.from_pretrained(path)

    def model_path(self, name: str) -> Path:
        """The local folder or .safetensors file of model `name`, fetched from the hub if need be."""
        spec = self.model_spec(name)
        if not isinstance(spec, str):
            raise InputError(f"model {name!r} must be a path or a hub id, got {spec!r}")
        path = Path(spec).expanduser()
        if path.exists():
            return path
        if path.suffix == ".safetensors" or spec.startswith((".", "/", "~")):
            raise InputError(f"model {name!r}: {spec} does not exist; check the path")
        return _hub_snapshot(name, spec)

    def state_dict(self, name: str) -> LazyStateDict:
        spec = self.model_spec(name)
        if not isinstance(spec, str):
            return super().state_dict(name)
        path = self.model_path(name)
        files = _safetensors_files(path)
        if not files:
            return super().state_dict(name)
        architecture = self._meta_model(self.model_path(PRETRAINED) if path.is_file() else path)
        file_keys = [key for file in files for key in file.keys()]
        key_map = checkpoint_key_map(architecture, file_keys)
        if key_map is None:  # loading transforms tensors: only from_pretrained knows how
            return super().state_dict(name)
        loaded = _loaded_ties(tied_names(architecture), key_map, SafetensorsStateDict(files, key_map))
        return SafetensorsStateDict(
            files, {key: key_map[source] for key, (source, _) in loaded.items()}, {key: names for key, (_, names) in loaded.items()}
        )

    def _meta_model(self, folder: Path) -> nn.Module:
        """The architecture of the model in `folder`, without weights (meta device)."""
        if not (folder / "config.json").is_file():
            raise InputError(f"{folder} has no config.json; is it a Hugging Face model folder?")
        config_text = (folder / "config.json").read_text()
        if config_text not in self._architectures:
            cls = self.model_class
            with torch.device("meta"):
                if hasattr(cls, "from_config"):  # the Auto* classes
                    from transformers import AutoConfig

                    self._architectures[config_text] = cls.from_config(AutoConfig.from_pretrained(folder))
                else:
                    self._architectures[config_text] = cls(cls.config_class.from_pretrained(folder))
        return self._architectures[config_text]


def _loaded_ties(groups: dict[str, list[str]], key_map: Mapping[str, str], tensors: LazyStateDict) -> dict[str, tuple[str, list[str]]]:
    """{key: (the name its tensor is read under, all its state-dict names)} for the tensors the
    checkpoint provides, tied as from_pretrained ties them.

    Each group of names the architecture ties is read from its first name in the checkpoint; a
    tied name that the checkpoint stores with other values stays untied, as from_pretrained leaves
    it (transformers 5 ties every T5's lm_head to its embeddings in the architecture, while
    Flan-T5 checkpoints hold an lm_head of their own).
    """
    loaded = {}
    for key, names in groups.items():
        present = [name for name in names if name in key_map]
        if not present:
            continue
        source = present[0]
        untied = [name for name in present[1:] if not _same_tensor(tensors, name, source)]
        loaded[key] = (source, [name for name in names if name not in untied])
        loaded.update({name: (name, [name]) for name in untied})
    return loaded


def _same_tensor(tensors: LazyStateDict, a: str, b: str) -> bool:
    return tensors.shape(a) == tensors.shape(b) and torch.equal(tensors[a], tensors[b])


def _safetensors_files(path: Path) -> list[SafetensorsFile]:
    if path.is_file():
        return [SafetensorsFile(path)] if path.suffix == ".safetensors" else []
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [SafetensorsFile(path / shard) for shard in shards]
    single = path / "model.safetensors"
    return [SafetensorsFile(single)] if single.is_file() else []


def _hub_snapshot(name: str, repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_FILES))
    except Exception as error:
        raise InputError(
            f"model {name!r}: {repo_id!r} is not a local path, and the Hugging Face hub cannot provide it "
            f"({type(error).__name__}); check the id, your network, or the cache (HF_HUB_OFFLINE=1)"
        ) from error
