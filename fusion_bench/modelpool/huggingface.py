"""Models from Hugging Face folders, hub ids, or bare .safetensors / PyTorch state-dict files,
read lazily where possible."""

import json
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from safetensors import SafetensorError
from torch import nn

from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool
from fusion_bench.modelpool.checkpoint_keys import unique_state_dict_keys
from fusion_bench.modelpool.checkpoint_layout import CheckpointLayout, cached_layout
from fusion_bench.modelpool.lazy_state_dict import LazyStateDict, SafetensorsStateDict
from fusion_bench.modelpool.safetensors_file import SafetensorsFile
from fusion_bench.modelpool.torch_file import TORCH_SUFFIXES, TorchStateDictFile, weights_only_refusal
from fusion_bench.models.unbuilt_model import UnbuiltModel
from fusion_bench.utils.errors import InputError, first_line
from fusion_bench.utils.instantiation import plain

_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.*", "*.model", "merges.txt")
_CHECKPOINT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
_ACCEPTED = "a Hugging Face model folder or hub id, a .safetensors file, or a .bin/.pt/.pth state dict"
# What transformers raises for an unusable folder: unreadable or invalid config.json, missing or
# damaged weights. Anything else (a TypeError, say) is a bug and keeps its traceback.
_LOAD_ERRORS = (OSError, ValueError, EOFError, SafetensorError)


class AutoModelPool(BaseModelPool):
    """`models` maps names to local Hugging Face folders, hub ids, or bare state dicts
    (`.safetensors`, or `.bin`/`.pt`/`.pth` saved with torch.save), which take the architecture of
    `_pretrained_`; folders and hub ids load with `model_class`.from_pretrained.

    Methods read safetensors and bare state dicts tensor by tensor instead of loading whole models.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        model_class: str = "transformers.AutoModel",
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ):
        super().__init__(models, train_datasets=train_datasets, val_datasets=val_datasets, test_datasets=test_datasets)
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
            state_dict = self.state_dict(name)  # first: it checks that _pretrained_ is not bare too
            model = self.load_model_copy(PRETRAINED)
            missing = [key for key in unique_state_dict_keys(model) if key not in state_dict]
            if missing:
                raise InputError(f"{path} lacks {missing[0]!r} of the pretrained model; is it a checkpoint of that model?")
            model.load_state_dict(dict(state_dict), strict=False)  # tied names follow their first name
            return model
        _require_config(name, path)
        with _named_load_errors(name, path):
            return self.model_class.from_pretrained(path, **self.from_pretrained_kwargs())

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for model_class.from_pretrained (a dtype, say); none by default."""
        return {}

    def prepare(self) -> None:
        """Fetch (hub ids) or find (paths) every model before merging: a missing one fails here,
        and download time is not counted as merging."""
        for name in self.all_model_names:
            if isinstance(self.model_spec(name), str):
                self.model_path(name)

    def load_tokenizer(self) -> Any:
        """The tokenizer saved with `_pretrained_` (else the first model), for save_tokenizer."""
        from transformers import AutoTokenizer

        name = PRETRAINED if self.has_pretrained else self.model_names[0]
        path = self.model_path(name)
        if path.is_dir() and not any(next(path.glob(pattern), None) for pattern in _TOKENIZER_FILES):
            # transformers would make an empty tokenizer from config.json alone
            raise InputError(f"model {name!r} ({path}) has no tokenizer files to save; drop save_tokenizer from merged_model_save_kwargs")
        try:
            return AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as error:
            raise InputError(f"model {name!r} ({path}) has no tokenizer to save ({first_line(error)}); drop save_tokenizer from merged_model_save_kwargs") from None

    def model_path(self, name: str) -> Path:
        """The local folder or checkpoint file of model `name`, fetched from the hub if need be."""
        spec = self.model_spec(name)
        if not isinstance(spec, str):
            raise InputError(f"model {name!r} must be a path or a hub id, got {spec!r}")
        path = Path(spec).expanduser()
        if path.is_file() and path.suffix not in _CHECKPOINT_SUFFIXES:
            raise InputError(f"model {name!r}: {path} is not a model file fusion_bench reads; give {_ACCEPTED}")
        if path.exists():
            return path
        if path.suffix in _CHECKPOINT_SUFFIXES or spec.startswith((".", "/", "~")):
            raise InputError(f"model {name!r}: {spec} does not exist; check the path")
        return _hub_snapshot(name, spec)

    def state_dict(self, name: str) -> LazyStateDict:
        spec = self.model_spec(name)
        if not isinstance(spec, str):
            return super().state_dict(name)
        path = self.model_path(name)
        if path.is_file():
            return self._bare_state_dict(name, path)
        with _named_load_errors(name, path):
            files = _folder_safetensors(path)
        lazy = self._lazy_state_dict(files, self._layout(path, files, name)) if files else None
        return lazy if lazy is not None else super().state_dict(name)  # from_pretrained knows how

    def unbuilt_copy(self, name: str) -> UnbuiltModel | None:
        """Model `name`'s tensors as from_pretrained would load them, without its class: where
        `name` is a folder of safetensors files that hold the architecture's tensors and nothing
        else, all floating-point ones in the dtype its config gives (or in one dtype, with none
        given), so that loading converts, casts, quantises, initialises and drops nothing."""
        spec = self.model_spec(name)
        if not isinstance(spec, str) or self.from_pretrained_kwargs():
            return None
        folder = self.model_path(name)
        files = _folder_safetensors(folder) if folder.is_dir() else []
        if not files:
            return None
        layout = self._layout(folder, files, name)
        if not layout.exact or layout.keeps_float32:
            return None
        with _named_load_errors(name, folder):
            config = json.loads((folder / "config.json").read_text())
        state_dict = self._lazy_state_dict(files, layout)
        dtypes = {str(state_dict.dtype(key)).removeprefix("torch.") for key in state_dict if state_dict.dtype(key).is_floating_point}
        if "quantization_config" in config or len(dtypes) > 1 or config.get("dtype", config.get("torch_dtype")) not in (None, *dtypes):
            return None
        return UnbuiltModel(
            {key: state_dict[key] for key in state_dict},
            {key: state_dict.aliases(key) for key in state_dict},
            set(layout.buffers),
            layout.key_map,
            folder,
        )

    def _bare_state_dict(self, name: str, path: Path) -> LazyStateDict:
        """The tensors of a state-dict file, under the names of `_pretrained_`'s architecture."""
        folder = self._pretrained_folder(name, path)
        file = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchStateDictFile(path)
        lazy = self._lazy_state_dict([file], self._layout(folder, [file], PRETRAINED))
        if lazy is None:
            raise InputError(
                f"model {name!r}: {path} cannot be read as a bare state dict, as loading this architecture "
                "converts its tensors; save the model with save_pretrained and give the folder"
            )
        return lazy

    def _pretrained_folder(self, name: str, path: Path) -> Path:
        """The folder of `_pretrained_`, whose architecture the bare state dict of model `name` takes."""
        if not self.has_pretrained:
            raise InputError(
                f"model {name!r} is a bare state dict ({path}) and takes the architecture of {PRETRAINED}; "
                f"add the model it was fine-tuned from as {PRETRAINED}: <folder or hub id> under `models`"
            )
        folder = self.model_path(PRETRAINED)
        if folder.is_file():
            raise InputError(f"model {PRETRAINED!r} is a bare state dict ({folder}), which has no architecture; give it as a Hugging Face model folder or hub id")
        return folder

    def _lazy_state_dict(self, files: Sequence[SafetensorsFile | TorchStateDictFile], layout: CheckpointLayout) -> SafetensorsStateDict | None:
        """The files' tensors under the architecture's names; None when loading transforms
        tensors (only from_pretrained knows how)."""
        key_map = layout.key_map
        if key_map is None:
            return None
        loaded = _loaded_ties(layout.ties, key_map, SafetensorsStateDict(files, key_map))
        return SafetensorsStateDict(
            files, {key: key_map[source] for key, (source, _) in loaded.items()}, {key: names for key, (_, names) in loaded.items()}
        )

    def _layout(self, folder: Path, files: Sequence[SafetensorsFile | TorchStateDictFile], name: str) -> CheckpointLayout:
        """How model_class reads `files` with the config.json of `folder` (model `name`, for errors)."""
        _require_config(name, folder)
        with _named_load_errors(name, folder):
            config_text = (folder / "config.json").read_text()
        file_keys = [key for file in files for key in file.keys()]
        return cached_layout(self.model_class_name, config_text, file_keys, lambda: self._meta_model(folder, name))

    def _meta_model(self, folder: Path, name: str = PRETRAINED) -> nn.Module:
        """The architecture of the model in `folder` (model `name`, for errors), without weights
        (meta device)."""
        _require_config(name, folder)
        with _named_load_errors(name, folder):
            config_text = (folder / "config.json").read_text()
            if config_text not in self._architectures:
                self._architectures[config_text] = self._build_on_meta(folder)
        return self._architectures[config_text]

    def _build_on_meta(self, folder: Path) -> nn.Module:
        cls = self.model_class
        with torch.device("meta"):
            if hasattr(cls, "from_config"):  # the Auto* classes
                from transformers import AutoConfig

                return cls.from_config(AutoConfig.from_pretrained(folder))
            return cls(cls.config_class.from_pretrained(folder))


def with_base_model(models: Mapping[str, Any], base_model: str | None, key: str) -> dict[str, Any]:
    """`models` with `_pretrained_` filled from FusionBench's pool-level key for the base model
    (`key`: base_model, pretrained_model_name_or_path), which must agree with it if both are given."""
    models = dict(models)
    if base_model is not None:
        pretrained = models.setdefault(PRETRAINED, base_model)
        if isinstance(pretrained, str) and pretrained != base_model:
            raise InputError(f"{key} is {base_model!r} but models.{PRETRAINED} is {pretrained!r}; both name the base model, so give one of them, or the same model to both")
    return models


def load_tokenizer_spec(spec: Any, default: Callable[[], Path]) -> Any:
    """A pool's `tokenizer` key: an id or path for AutoTokenizer, or a config with `_target_`
    (FusionBench's `AutoTokenizer.from_pretrained` entries); None takes the folder `default()`."""
    spec = plain(spec)
    if isinstance(spec, Mapping):
        return instantiate(spec)
    return load_auto_tokenizer(spec if spec is not None else default(), "the tokenizer", "check the `tokenizer` key")


def load_auto_tokenizer(source: str | Path, what: str, fix: str) -> Any:
    """AutoTokenizer.from_pretrained(source), or one line: `what` <source> cannot be loaded (why); `fix`."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise InputError(f"{what} {str(source)!r} cannot be loaded ({first_line(error)}); {fix}") from None


def _require_config(name: str, folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise InputError(f"model {name!r}: {folder} has no config.json; is it a Hugging Face model folder? Give one saved with save_pretrained")


@contextmanager
def _named_load_errors(name: str, path: Path) -> Iterator[None]:
    """Errors that transformers raises on a bad model folder, as one line naming the model."""
    try:
        yield
    except InputError:
        raise
    except pickle.UnpicklingError as error:
        raise InputError(
            f"model {name!r}: the weights in {path} are not a plain state dict: torch.load(weights_only=True) refuses them "
            f"({weights_only_refusal(error)}); fusion_bench never runs a checkpoint's pickled code; save the model as safetensors"
        ) from error
    except _LOAD_ERRORS as error:
        raise InputError(
            f"model {name!r} cannot be loaded from {path} ({first_line(error)}); "
            "check that it is a complete Hugging Face model folder (config.json and weights)"
        ) from error


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


def _folder_safetensors(path: Path) -> list[SafetensorsFile]:
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
