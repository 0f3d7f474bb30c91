"""Causal language models (Llama, Mistral, Qwen2, ...): hub ids or local folders, sharded or not,
read one tensor at a time and saved sharded in their own dtype."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion_bench.modelpool.base import PRETRAINED
from fusion_bench.modelpool.huggingface import AutoModelPool, load_tokenizer_spec, with_base_model
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain

_DTYPES = {"auto": "auto", "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_MODEL_KWARGS = ("torch_dtype", "dtype", "attn_implementation")


class CausalLMPool(AutoModelPool):
    """`models` maps names to hub ids or local model folders, loaded with AutoModelForCausalLM;
    FusionBench's entries (`{_target_: transformers.AutoModelForCausalLM.from_pretrained,
    pretrained_model_name_or_path: ..., torch_dtype: ...}`, or a `LlamaForCausalLM` etc.) are read
    as their paths.

    Methods read the checkpoints tensor by tensor (sharded ones through
    model.safetensors.index.json) and compute in float32 per chunk; the merged model keeps the
    models' dtype (`model_kwargs.torch_dtype`, default `auto`: the checkpoint's, so bf16 stays
    bf16) and is saved sharded (`merged_model_save_kwargs.max_shard_size`). Tied input and output
    embeddings stay tied. Models whose vocabularies differ are refused before merging: rows of
    one token id mean different tokens in them.

    tokenizer: an id or path, or FusionBench's `AutoTokenizer.from_pretrained` config (default:
        the base model's folder).
    model_kwargs: `torch_dtype` (or transformers 5's `dtype`) and `attn_implementation`, for
        from_pretrained.
    base_model / pretrained_model_name_or_path: FusionBench's pool-level names for the base
        model; either fills `models._pretrained_` (they must agree).
    enable_lazy_loading: FusionBench's switch; models here are always read lazily.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        tokenizer: str | Mapping[str, Any] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        base_model: str | None = None,
        pretrained_model_name_or_path: str | None = None,
        enable_lazy_loading: bool = True,
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ):
        model_kwargs = dict(plain(model_kwargs) or {})
        unknown = [key for key in model_kwargs if key not in _MODEL_KWARGS]
        if unknown:
            raise InputError(f"model_kwargs has an unknown key {unknown[0]!r}; CausalLMPool takes {', '.join(_MODEL_KWARGS)}")
        entries = {name: _path_and_dtype(name, spec) for name, spec in plain(models).items()}
        given = {f"model_kwargs.{key}": _dtype(model_kwargs.pop(key), f"model_kwargs.{key}") for key in ("torch_dtype", "dtype") if key in model_kwargs}
        given.update({f"models.{name}.torch_dtype": dtype for name, (_, dtype) in entries.items() if dtype is not None})
        self.dtype = _one_dtype(given)
        paths = {name: path for name, (path, _) in entries.items()}
        paths = with_base_model(paths, base_model, "base_model")
        paths = with_base_model(paths, pretrained_model_name_or_path, "pretrained_model_name_or_path")
        super().__init__(
            paths, model_class="transformers.AutoModelForCausalLM", train_datasets=train_datasets, val_datasets=val_datasets, test_datasets=test_datasets
        )
        self._model_kwargs = model_kwargs
        self._tokenizer = tokenizer

    def from_pretrained_kwargs(self) -> dict[str, Any]:
        return {"dtype": self.dtype, **self._model_kwargs}

    def prepare(self) -> None:
        """Find or fetch every model, then refuse models whose vocabularies differ."""
        super().prepare()
        self.check_vocabularies()

    def check_vocabularies(self) -> None:
        """Raise InputError naming two models whose `vocab_size` differ (from their config.json)."""
        names = [PRETRAINED] if self.has_pretrained else []
        sizes = {name: self._meta_model(self.model_path(name), name).get_input_embeddings().num_embeddings for name in names + self.model_names}
        reference, reference_size = next(iter(sizes.items()))
        for name, size in sizes.items():
            if size != reference_size:
                raise InputError(
                    f"model {name!r} has a vocabulary of {size} tokens, model {reference!r} of {reference_size}; merging needs the same "
                    "tokenizer in every model (the same token id in the same embedding row): drop that model, or resize and align its embeddings first"
                )

    def load_tokenizer(self) -> Any:
        """The tokenizer given as `tokenizer`, else the base model's (else the first model's)."""
        return load_tokenizer_spec(self._tokenizer, lambda: self.model_path(PRETRAINED if self.has_pretrained else self.model_names[0]))

    def save_model(
        self, model: nn.Module, path: str | Path, *, save_tokenizer: bool = False, max_shard_size: int | str = "5GB", model_dtype: str | None = None
    ) -> None:
        """Write `model` with save_pretrained, in shards of at most `max_shard_size` (bytes, or
        e.g. "2GB"), cast to `model_dtype` if given (e.g. bfloat16), with the tokenizer if asked."""
        if model_dtype is not None:
            dtype = _dtype(model_dtype, "merged_model_save_kwargs.model_dtype")
            if dtype == "auto":
                raise InputError("merged_model_save_kwargs.model_dtype=auto names no dtype; give e.g. bfloat16, or drop it to keep the models' dtype")
            model = model.to(dtype)
        model.save_pretrained(path, max_shard_size=max_shard_size)
        if save_tokenizer:
            self.load_tokenizer().save_pretrained(path)


def _path_and_dtype(name: str, spec: Any) -> tuple[Any, Any]:
    """A model entry as (its path or hub id, the dtype it asks for or None); other specs as they are."""
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        return spec, None
    target, arguments = spec["_target_"], {key: value for key, value in spec.items() if key != "_target_"}
    if not target.endswith("ForCausalLM.from_pretrained") or "pretrained_model_name_or_path" not in arguments:
        return spec, None
    extra = set(arguments) - {"pretrained_model_name_or_path", "torch_dtype", "dtype"}
    if extra:
        raise InputError(f"model {name!r}: CausalLMPool reads {target} entries with pretrained_model_name_or_path and torch_dtype only, not {sorted(extra)[0]!r}; move it to model_kwargs or drop it")
    dtype = arguments.get("dtype", arguments.get("torch_dtype"))
    return arguments["pretrained_model_name_or_path"], None if dtype is None else _dtype(dtype, f"models.{name}.torch_dtype")


def _one_dtype(given: Mapping[str, Any]) -> Any:
    """The one dtype every model loads in, from {where it was given: dtype} (all must agree), else auto."""
    where = list(given)
    conflict = next((key for key in where if given[key] != given[where[0]]), None)
    if conflict is not None:
        raise InputError(
            f"{conflict} is {given[conflict]} but {where[0]} is {given[where[0]]}; a merge reads every model in one dtype, so give one torch_dtype (model_kwargs.torch_dtype)"
        )
    return given[where[0]] if where else "auto"


def _dtype(value: Any, key: str) -> Any:
    if isinstance(value, torch.dtype):
        return value
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise InputError(f"{key}={value!r} is not a dtype fusion_bench knows; use one of auto, float32, float16, bfloat16")
    return _DTYPES[name]
