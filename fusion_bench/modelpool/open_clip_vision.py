"""The task_vectors checkpoints (Ilharco et al., 2023: open_clip ViT-B-32 / ViT-B-16 / ViT-L-14
from OpenAI's weights, fine-tuned on the eight tasks), read from FusionBench's YAML unchanged.

    _target_: fusion_bench.modelpool.OpenCLIPVisionModelPool
    model_dir: ./.cache/task_vectors_checkpoints/
    models:
      _pretrained_: {model_name: ViT-B-32, pickle_path: ${...model_dir}/ViT-B-32/zeroshot.pt}
      sun397: {model_name: ViT-B-32, pickle_path: ${...model_dir}/ViT-B-32/SUN397/finetuned.pt}
    classification_heads:
      sun397: ${..model_dir}/ViT-B-32/head_SUN397.pt

The files are whole pickled modules (torch.save of an ImageEncoder). They are read without running
them (fusion_bench.modelpool.pickled_modules), converted once to safetensors in the cache (keyed by
the file's hash), and streamed from there like every other checkpoint; the architecture comes from
open_clip (`open_clip.create_model(model_name)`, no download). A model is an ImageEncoder with the
checkpoint's own keys (`model.visual.*`, and the text parts the checkpoints keep), so a merge
counts the same parameters as FusionBench's and the TIES paper's.
"""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool
from fusion_bench.modelpool.lazy_state_dict import LazyStateDict, SafetensorsStateDict
from fusion_bench.modelpool.pickled_modules import convert_to_safetensors, read_module
from fusion_bench.modelpool.safetensors_file import SafetensorsFile
from fusion_bench.models.open_clip import ClassificationHead, ImageEncoder, import_open_clip
from fusion_bench.utils.cache import cache_dir
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import instantiate, plain

_CHECKPOINT_KEYS = ("pickle_path", "state_dict_path")  # FusionBench's two keys: a pickled ImageEncoder, or its state dict
_TOWER = "model.visual."  # the image tower's keys in an ImageEncoder


class OpenCLIPVisionModelPool(BaseModelPool):
    """task_vectors' ImageEncoders by name.

    models: name → `{model_name, pickle_path}` (a pickled ImageEncoder), `{model_name,
        state_dict_path}` (its state dict: .pt or .safetensors), or a bare path to a pickled
        ImageEncoder (FusionBench's ViT-B-16 / ViT-L-14 configs), whose open_clip model is found
        from its tensor shapes; or a module / `_target_` config, as in every pool.
        Every model takes `_pretrained_`'s architecture, including its MLP activation, read from
        the pickle (QuickGELU for OpenAI's weights).
    model_dir: the folder the paths are written under (`${...model_dir}` in the YAML).
    classification_heads: task → head_<Task>.pt (a pickled ClassificationHead, read the same safe way).
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        model_dir: str | None = None,
        classification_heads: Mapping[str, Any] | None = None,
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ):
        super().__init__(models, train_datasets=train_datasets, val_datasets=val_datasets, test_datasets=test_datasets)
        self.model_dir = model_dir
        self._classification_heads = dict(plain(classification_heads) or {})
        self._files: dict[str, SafetensorsFile] = {}
        self._architecture: tuple[str, bool | None] | None = None

    def checkpoint_path(self, name: str) -> Path:
        """The checkpoint file of model `name`, checked to exist."""
        spec = self.model_spec(name)
        if isinstance(spec, Mapping) and "_target_" not in spec:
            given = [key for key in _CHECKPOINT_KEYS if key in spec]
            if len(given) != 1:
                raise InputError(f"model {name!r} must give one of pickle_path or state_dict_path (with model_name), got keys {', '.join(spec) or 'none'}")
            spec = spec[given[0]]
        if not isinstance(spec, str):
            raise InputError(f"model {name!r} is given as {spec!r}; give {{model_name, pickle_path}} or the path of a task_vectors checkpoint")
        path = Path(spec).expanduser()
        if not path.is_file():
            raise InputError(f"model {name!r}: {path} does not exist; download the task_vectors checkpoints (docs/modelpools/open_clip_vision.md) or fix model_dir")
        return path

    def state_dict(self, name: str) -> LazyStateDict:
        spec = self.model_spec(name)
        if isinstance(spec, nn.Module) or (isinstance(spec, Mapping) and "_target_" in spec):
            return super().state_dict(name)
        return SafetensorsStateDict([self._file(name)])

    def load_model_from_spec(self, name: str, spec: Any) -> ImageEncoder:
        model_name, quick_gelu = self.architecture()
        state_dict = self.state_dict(name)
        encoder = ImageEncoder(model_name, quick_gelu=quick_gelu)
        expected = set(encoder.state_dict())
        missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
        if missing or unexpected:
            problem = f"lacks {missing[0]!r}, which open_clip's {model_name} has" if missing else f"has {unexpected[0]!r}, which open_clip's {model_name} lacks"
            raise InputError(f"model {name!r} ({self.checkpoint_path(name)}) {problem}; is it an ImageEncoder of that model?")
        encoder.load_state_dict({key: state_dict[key] for key in state_dict})
        return encoder

    def architecture(self) -> tuple[str, bool | None]:
        """(open_clip model name, QuickGELU or not, None: the model config's) of `_pretrained_`
        (else the first model), which every model of the pool takes."""
        if self._architecture is None:
            reference = PRETRAINED if self.has_pretrained else self.model_names[0]
            spec = self.model_spec(reference)
            model_name = spec.get("model_name") if isinstance(spec, Mapping) else None
            path = self.checkpoint_path(reference)
            if model_name is None:
                model_name = _model_name_from_shapes(reference, self._file(reference))
            self._architecture = (model_name, _quick_gelu(path))
        return self._architecture

    def prepare(self) -> None:
        """Convert every checkpoint (once: the cache keeps them) and check that the models name
        one open_clip architecture, before any merging."""
        model_name, _ = self.architecture()
        for name in self.all_model_names:
            spec = self.model_spec(name)
            if isinstance(spec, nn.Module) or (isinstance(spec, Mapping) and "_target_" in spec):
                continue
            given = spec.get("model_name", model_name) if isinstance(spec, Mapping) else model_name
            if given != model_name:
                raise InputError(f"model {name!r} is a {given} but the pool's base model is a {model_name}; models merged together share one architecture")
            self._file(name)
        for task in self._classification_heads:
            self.load_classification_head(task)

    def load_classification_head(self, task: str) -> ClassificationHead:
        """The classification head of `task` (FusionBench's name): head_<Task>.pt, or a module or config."""
        if task not in self._classification_heads:
            raise InputError(f"the model pool has no classification head for {task!r}; add it under classification_heads")
        return load_classification_head(self._classification_heads[task], f"the classification head of {task!r}")

    def local_paths(self) -> dict[str, Path]:
        paths = super().local_paths()
        if self.model_dir is not None and Path(self.model_dir).expanduser().exists():
            paths["the model pool's model_dir"] = Path(self.model_dir).expanduser()
        for task, spec in self._classification_heads.items():
            if isinstance(spec, str) and Path(spec).expanduser().exists():
                paths[f"the model pool's classification_heads.{task}"] = Path(spec).expanduser()
        return paths

    def _file(self, name: str) -> SafetensorsFile:
        """Model `name`'s tensors as a safetensors file: the checkpoint itself, or its conversion."""
        if name not in self._files:
            path = self.checkpoint_path(name)
            converted = path if path.suffix == ".safetensors" else convert_to_safetensors(path, cache_dir("open_clip_checkpoints"))
            self._files[name] = SafetensorsFile(converted)
        return self._files[name]


def load_classification_head(spec: Any, what: str) -> ClassificationHead:
    """A ClassificationHead from a module, a `_target_` config, or a file: a pickled head (its
    `normalize` read from the pickle) or a state dict of `weight` (and `bias`), taken as normalising."""
    spec = plain(spec)
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, Mapping):
        return instantiate(spec)
    if not isinstance(spec, str) or not Path(spec).expanduser().is_file():
        raise InputError(f"{what} is {spec!r}, which is not a file; give the path of head_<Task>.pt from the task_vectors checkpoints")
    path = Path(spec).expanduser()
    module = read_module(path)
    tensors, normalize = module.state_dict, module.attributes.get("normalize", True)
    if "weight" not in tensors or tensors["weight"].dim() != 2:
        raise InputError(f"{what} ({path}) has no [classes, features] weight; is it a task_vectors ClassificationHead?")
    return ClassificationHead(bool(normalize), tensors["weight"].float(), tensors["bias"].float() if "bias" in tensors else None)


def _quick_gelu(path: Path) -> bool | None:
    """Whether the pickled ImageEncoder in `path` uses QuickGELU (read from the classes the pickle
    names, never imported); None for a state dict, which does not say."""
    classes = read_module(path).classes if path.suffix != ".safetensors" else {}
    activations = {name.rpartition(".")[2] for key, name in classes.items() if key.startswith(_TOWER) and key.endswith(".mlp.gelu")}
    return None if not activations else activations == {"QuickGELU"}


def _model_name_from_shapes(name: str, file: SafetensorsFile) -> str:
    """The built-in open_clip model whose ViT has the checkpoint's shapes (the shortest name of
    those that do, e.g. ViT-B-32 rather than ViT-B-32-quickgelu: the activation is set apart)."""
    open_clip = import_open_clip()
    keys = set(file.keys())
    if f"{_TOWER}conv1.weight" not in keys or f"{_TOWER}proj" not in keys:
        raise InputError(f"model {name!r} ({file.path}) has no {_TOWER}conv1.weight; is it a task_vectors ImageEncoder of a ViT?")
    width, _, patch, _ = file.shape(f"{_TOWER}conv1.weight")
    layers = len({key.split(".")[4] for key in keys if key.startswith(f"{_TOWER}transformer.resblocks.")})
    grid = round((file.shape(f"{_TOWER}positional_embedding")[0] - 1) ** 0.5)
    embed_dim = file.shape(f"{_TOWER}proj")[1]
    matches = []
    for candidate in open_clip.list_models():
        config = open_clip.get_model_config(candidate) or {}
        vision = config.get("vision_cfg", {})
        image_size = vision.get("image_size")
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        if (vision.get("width"), vision.get("patch_size"), vision.get("layers"), image_size, config.get("embed_dim")) == (width, patch, layers, grid * patch, embed_dim):
            matches.append(candidate)
    if not matches:
        raise InputError(f"no open_clip model has the ViT of model {name!r} (width {width}, patch {patch}, {layers} layers); give its model_name")
    return min(matches, key=len)
