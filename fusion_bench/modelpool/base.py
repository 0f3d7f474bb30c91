"""The model pool: named models, where `_pretrained_` is the base model and the others are tasks."""

import copy
import hashlib
import inspect
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from safetensors.torch import save_model as save_safetensors
from torch import nn

from fusion_bench.modelpool.lazy_state_dict import LazyStateDict, ModuleStateDict
from fusion_bench.modelpool.task_data import TaskData
from fusion_bench.utils.dataset_loading import load_dataset_spec
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain
from fusion_bench.utils.local_paths import local_paths_in

PRETRAINED = "_pretrained_"


def is_special_name(name: str) -> bool:
    """`_pretrained_`-style names are roles, not tasks."""
    return name.startswith("_") and name.endswith("_")


class BaseModelPool:
    """Models by name, loaded only when asked for.

    `models` maps names to nn.Module instances or to configs with a `_target_` (instantiated on
    demand), as in FusionBench. Subclasses add paths and hub ids (AutoModelPool and its kin) and
    override `state_dict` to read checkpoints lazily. FusionBench's methods are here too
    (load_pretrained_model, get_model_config, get_model_path, models, named_models, save_model).
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ):
        if not models:
            raise InputError("the model pool has no models; list them under `models:`")
        self._models = dict(models.items())
        self._train_datasets = train_datasets
        self._val_datasets = val_datasets
        self._test_datasets = test_datasets

    @property
    def all_model_names(self) -> list[str]:
        return list(self._models)

    @property
    def model_names(self) -> list[str]:
        """The task models (every name but the special ones such as `_pretrained_`)."""
        return [name for name in self._models if not is_special_name(name)]

    @property
    def has_pretrained(self) -> bool:
        return PRETRAINED in self._models

    def __len__(self) -> int:
        return len(self.model_names)

    def __contains__(self, name: str) -> bool:
        return name in self._models

    def model_spec(self, name: str) -> Any:
        """What the pool was given for `name` (a module, a config, a path)."""
        if name not in self._models:
            raise InputError(f"model {name!r} is not in the pool; it has {', '.join(self._models)}")
        spec = self._models[name]
        return plain(spec)

    def load_model(self, name: str) -> nn.Module:
        """The model called `name`; an instance the pool was given is returned as it is."""
        spec = self.model_spec(name)
        if isinstance(spec, nn.Module):
            return spec
        if isinstance(spec, Mapping) and "_target_" in spec:
            return instantiate(spec)
        return self.load_model_from_spec(name, spec)

    def load_model_from_spec(self, name: str, spec: Any) -> nn.Module:
        raise InputError(
            f"model {name!r} is given as {spec!r}, which {type(self).__name__} cannot load; give a "
            "config with `_target_`, or use a pool that loads paths (e.g. fusion_bench.modelpool.AutoModelPool)"
        )

    # False where nothing will run the merged model: the program sets it when no task pool scores
    # the merge. Methods may then merge into unbuilt_copy(), which skips building the model class.
    merged_model_runs = True

    def load_model_copy(self, name: str) -> nn.Module:
        """A model the caller may overwrite: instances are deep-copied, others loaded afresh."""
        model = self.load_model(name)
        return copy.deepcopy(model) if model is self._models.get(name) else model

    def unbuilt_copy(self, name: str) -> nn.Module | None:
        """Model `name`'s state dict as a module the caller may overwrite and save, without
        building the model's class (fusion_bench.models.unbuilt_model); None where the pool
        cannot make one that equals the loaded model, as here by default."""
        return None

    def state_dict(self, name: str) -> LazyStateDict:
        """The model's tensors by name; file-backed pools read them one at a time."""
        return ModuleStateDict(self.load_model(name))

    def untouched_keys(self) -> set[str]:
        """Keys of `_pretrained_` that no task model changes, known without reading them (LoRA
        adapters in delta space); methods leave them out of the merge. None known by default."""
        return set()

    def load_pretrained_or_first_model(self) -> nn.Module:
        return self.load_model(PRETRAINED if self.has_pretrained else self.model_names[0])

    def load_pretrained_model(self) -> nn.Module:
        if not self.has_pretrained:
            raise InputError(f"the model pool has no pretrained model; add `{PRETRAINED}: <model>` under `models`")
        return self.load_model(PRETRAINED)

    def get_model_config(self, name: str, return_copy: bool = True) -> Any:
        """FusionBench's name for what the pool was given for `name`."""
        spec = self.model_spec(name)
        return copy.deepcopy(spec) if return_copy and not isinstance(spec, nn.Module) else spec

    def get_model_path(self, name: str) -> str:
        spec = self.model_spec(name)
        if not isinstance(spec, str):
            raise InputError(f"model {name!r} is given as {type(spec).__name__}, not as a path")
        return spec

    @staticmethod
    def is_special_model(name: str) -> bool:
        return is_special_name(name)

    def models(self) -> Iterator[nn.Module]:
        """The task models, loaded one after the other."""
        return (self.load_model(name) for name in self.model_names)

    def named_models(self) -> Iterator[tuple[str, nn.Module]]:
        return ((name, self.load_model(name)) for name in self.model_names)

    def prepare(self) -> None:
        """Make every model available before merging (download, build), so that this time is not
        counted as merging and a missing model fails before any merge. Nothing to do by default."""

    def local_paths(self) -> dict[str, Path]:
        """{what it is: path} of the local files and folders the pool reads; a merged model is
        never saved over them."""
        specs = {"models": self._models, "train_datasets": self._train_datasets, "val_datasets": self._val_datasets, "test_datasets": self._test_datasets}
        return {f"the model pool's {where}": path for key, spec in specs.items() for where, path in local_paths_in(plain(spec), key).items()}

    def save_model(self, model: nn.Module, path: str | Path, *, save_tokenizer: bool = False) -> None:
        """Write `model` into the folder `path`: Hugging Face format (save_pretrained) for
        transformers models, else `model.safetensors`; with save_tokenizer, the pool's tokenizer too."""
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(path)
        else:
            save_safetensors(model, str(Path(path) / "model.safetensors"))
        if save_tokenizer:
            self.load_tokenizer().save_pretrained(path)

    def check_save_kwargs(self, kwargs: Mapping[str, Any], *, saving: bool = True) -> None:
        """Before merging: `kwargs` (merged_model_save_kwargs) are keys save_model takes, and a
        tokenizer asked for can be loaded (when saving)."""
        accepted = [name for name in inspect.signature(self.save_model).parameters if name not in ("model", "path")]
        for key in kwargs:
            if key not in accepted:
                raise InputError(f"merged_model_save_kwargs has an unknown key {key!r}; {type(self).__name__}.save_model takes: {', '.join(accepted)}")
        if saving and kwargs.get("save_tokenizer"):
            self.load_tokenizer()

    def load_tokenizer(self) -> Any:
        raise InputError(f"{type(self).__name__} has no tokenizer to save; drop save_tokenizer from merged_model_save_kwargs")

    @property
    def train_dataset_names(self) -> list[str]:
        return list(self._train_datasets or {})

    @property
    def val_dataset_names(self) -> list[str]:
        return list(self._val_datasets or {})

    @property
    def test_dataset_names(self) -> list[str]:
        return list(self._test_datasets or {})

    def load_train_dataset(self, name: str) -> Any:
        """Datasets load on demand, like models; a bare hub id or folder gives its train split."""
        return _load_dataset(self._train_datasets, "train", name)

    def load_val_dataset(self, name: str) -> Any:
        return _load_dataset(self._val_datasets, "validation", name)

    def load_test_dataset(self, name: str) -> Any:
        return _load_dataset(self._test_datasets, "test", name)

    def check_task_data(self, split: str, what: str) -> None:
        """Raise InputError unless `task_data` can serve `split` for every task model, judged from
        the config alone (the program calls it before any work). `what` names the asking method."""
        raise InputError(
            f"{what} learns from data, which {type(self).__name__} does not provide; use a pool that does "
            "(CLIPVisionModelPool or Seq2SeqLMPool with train_datasets / test_datasets, OfflineTextPool)"
        )

    def task_data(self, task: str, *, split: str, num_examples: int | None, batch_size: int, seed: int = 0) -> TaskData:
        """Batches of `num_examples` examples of `task` (None: all), drawn with `seed`, ready for
        the task models, and the task's head (fusion_bench.modelpool.task_data)."""
        self.check_task_data(split, "this method")
        raise NotImplementedError

    def model_fingerprint(self, name: str) -> str:
        """A hash of model `name`'s tensors (names, dtypes, shapes, bytes), for keys of caches of
        statistics computed from the model (Fisher diagonals, Gram matrices)."""
        state_dict = self.state_dict(name)
        digest = hashlib.sha256()
        for key in state_dict:
            tensor = state_dict[key].detach().cpu().contiguous()
            digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy().data)
        return digest.hexdigest()[:16]


def _load_dataset(datasets: Mapping[str, Any] | None, split: str, name: str) -> Any:
    if not datasets or name not in datasets:
        known = ", ".join(datasets or {}) or "none"
        raise InputError(f"the model pool has no {split} dataset {name!r}; it has: {known}")
    return load_dataset_spec(name, datasets[name], split)


def as_modelpool(pool: "BaseModelPool | Mapping[str, nn.Module]") -> BaseModelPool:
    """Methods accept a pool or, as in FusionBench, a plain dict of modules."""
    if isinstance(pool, BaseModelPool):
        return pool
    if isinstance(pool, Mapping):
        return BaseModelPool(pool)
    raise InputError(f"expected a model pool or a dict of models, got {type(pool).__name__}")
