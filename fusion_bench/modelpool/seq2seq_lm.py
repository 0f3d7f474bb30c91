"""Sequence-to-sequence language models (T5, Flan-T5, BART): full checkpoints or LoRA adapters."""

import copy
from collections.abc import Mapping
from functools import cached_property
from typing import Any

import torch
from torch import nn

from fusion_bench.modelpool.base import PRETRAINED
from fusion_bench.modelpool.glue_task_data import glue_entry, glue_task_data
from fusion_bench.modelpool.huggingface import AutoModelPool, load_tokenizer_spec, with_base_model
from fusion_bench.modelpool.lazy_state_dict import LazyStateDict
from fusion_bench.modelpool.lora import LoraAdapter, LoraStateDict, is_adapter
from fusion_bench.modelpool.task_data import TaskData, check_data_request
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain

MERGE_SPACES = ("dense", "delta")


class Seq2SeqLMPool(AutoModelPool):
    """`models` maps names to model folders or hub ids (loaded with AutoModelForSeq2SeqLM), or to
    peft LoRA adapters (folders or hub ids holding an adapter_config.json) over `_pretrained_`.

    merge_space says how adapters reach the merging methods:
      dense: each adapter is loaded with peft over a fresh `_pretrained_` and merge_and_unload()-ed,
        as FusionBench does: n dense models in memory.
      delta: each adapted model is read one weight at a time as W₀ + s·B·A (the same tensors), and
        the weights no adapter changes are left out of the merge: they keep their pretrained
        values, and TIES counts them as zeros in its global cut. The same merged model, with the
        memory of one model and a fraction of the work.
    base_model: FusionBench's key for the base model; it fills `_pretrained_` (they must agree).
    tokenizer: the tokenizer's id or path, or a config with `_target_` (default: the base model's).
    train_datasets / test_datasets: model name → its GLUE task (a name, or {name, split} as
        FusionBench writes them), for methods that learn from data (fusion_bench.modelpool.
        glue_task_data); train examples come with labels, test inputs without.
    dataset_path: what datasets.load_dataset reads GLUE from (a hub id or a local folder).
    Entries in FusionBench's form ({_target_: ...load_lora_model, base_model_path, peft_model_path},
    or {_target_: ...from_pretrained, pretrained_model_name_or_path}) are read as their paths.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        base_model: str | None = None,
        tokenizer: str | Mapping[str, Any] | None = None,
        merge_space: str = "dense",
        train_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
        dataset_path: str = "glue",
    ):
        models = {name: _plain_entry(name, spec) for name, spec in models.items()}
        models = with_base_model(models, base_model, "base_model")
        for name, spec in models.items():
            if isinstance(spec, Mapping) and "peft_model_path" in spec:
                if spec.get("base_model_path", models.get(PRETRAINED)) != models.get(PRETRAINED):
                    raise InputError(f"model {name!r} is an adapter of {spec['base_model_path']!r}, not of models.{PRETRAINED}; adapters apply to {PRETRAINED}")
                models[name] = spec["peft_model_path"]
        super().__init__(models, model_class="transformers.AutoModelForSeq2SeqLM")
        if merge_space not in MERGE_SPACES:
            raise InputError(f"merge_space={merge_space!r} is unknown; use one of {', '.join(MERGE_SPACES)}")
        self.merge_space = merge_space
        self._tokenizer = tokenizer
        self.dataset_path = dataset_path
        self._glue = {
            role: {model: glue_entry(model, spec, role) for model, spec in plain(datasets or {}).items()}
            for role, datasets in (("train", train_datasets), ("test", test_datasets))
        }
        self._adapters: dict[str, LoraAdapter] = {}

    def is_adapter(self, name: str) -> bool:
        """Whether model `name` is a LoRA adapter (fetched from the hub if need be to tell)."""
        return isinstance(self.model_spec(name), str) and is_adapter(self.model_path(name))

    def load_model_from_spec(self, name: str, spec: Any) -> nn.Module:
        if not self.is_adapter(name):
            return super().load_model_from_spec(name, spec)
        from peft import PeftModel

        if not self.has_pretrained:
            raise InputError(f"model {name!r} is a LoRA adapter: add its base model as `{PRETRAINED}: <model>` under `models`")
        return PeftModel.from_pretrained(self.load_model_copy(PRETRAINED), str(self.model_path(name))).merge_and_unload()

    def state_dict(self, name: str) -> LazyStateDict:
        if self.merge_space == "delta" and name != PRETRAINED and self.is_adapter(name):
            return LoraStateDict(self._pretrained_state_dict, self.adapter(name))
        return super().state_dict(name)

    def untouched_keys(self) -> set[str]:
        """In delta space, when every task model is an adapter: the weights none of them changes."""
        if self.merge_space != "delta" or not all(self.is_adapter(name) for name in self.model_names):
            return set()
        changed = {key for name in self.model_names for key in self.adapter(name).keys()}
        return set(self._pretrained_state_dict) - changed

    def adapter(self, name: str) -> LoraAdapter:
        """The LoRA factors of adapter `name`."""
        if name not in self._adapters:
            if not self.has_pretrained:
                raise InputError(f"model {name!r} is a LoRA adapter: add its base model as `{PRETRAINED}: <model>` under `models`")
            self._adapters[name] = LoraAdapter(self.model_path(name), self._meta_architecture, name)
        return self._adapters[name]

    def check_task_data(self, split: str, what: str) -> None:
        check_data_request(split, None, 1, what)
        key = f"{split}_datasets"
        missing = [name for name in self.model_names if name not in self._glue[split]]
        if missing:
            raise InputError(f"{what} needs the {split} examples of every task, but the model pool's {key} lacks {missing[0]!r}; add e.g. `{missing[0]}: {{name: <GLUE task>, split: ...}}` under {key}")

    def task_data(self, task: str, *, split: str, num_examples: int | None, batch_size: int, seed: int = 0) -> TaskData:
        """The GLUE examples of model `task` (train_datasets: with labels; test_datasets: without),
        as Flan prompts tokenized by the pool's tokenizer, and the head over the answer's first
        token (fusion_bench.modelpool.glue_task_data)."""
        check_data_request(split, num_examples, batch_size, f"the {split} examples of {task!r}")
        self.check_task_data(split, "the method")
        glue, glue_split = self._glue[split][task]
        return glue_task_data(
            glue,
            glue_split,
            labeled=split == "train",
            dataset_path=self.dataset_path,
            tokenizer=self._data_tokenizer,
            decoder_start_token_id=self._decoder_start_token_id,
            num_examples=num_examples,
            batch_size=batch_size,
            seed=seed,
        )

    @cached_property
    def _data_tokenizer(self):
        return self.load_tokenizer()

    @cached_property
    def _decoder_start_token_id(self) -> int:
        """The token generation starts the decoder with, from the base model's config."""
        model = self._meta_architecture() if self.has_pretrained else self.load_model(self.model_names[0])
        return model.config.decoder_start_token_id

    def load_tokenizer(self):
        """The tokenizer given as `tokenizer`, else the base model's."""
        return load_tokenizer_spec(self._tokenizer, lambda: self.model_path(PRETRAINED))

    @cached_property
    def _pretrained_state_dict(self) -> LazyStateDict:
        return self.state_dict(PRETRAINED)

    def _meta_architecture(self) -> nn.Module:
        """A fresh copy of the base model's architecture on the meta device (peft modifies it)."""
        spec = self.model_spec(PRETRAINED)
        if isinstance(spec, nn.Module):
            with torch.device("meta"):
                return type(spec)(spec.config)
        return copy.deepcopy(self._meta_model(self.model_path(PRETRAINED)))


def _plain_entry(name: str, spec: Any) -> Any:
    """A FusionBench model entry as the path it loads; other entries as they are."""
    spec = plain(spec)
    if not isinstance(spec, Mapping) or "_target_" not in spec:
        return spec
    target, arguments = spec["_target_"], {k: v for k, v in spec.items() if k != "_target_"}
    if target.endswith(".load_lora_model") and set(arguments) <= {"base_model_path", "peft_model_path", "is_trainable", "merge_and_unload"}:
        if arguments.get("merge_and_unload", True) is False:
            raise InputError(f"model {name!r}: merge_and_unload: false leaves a PeftModel, which methods cannot merge; drop it")
        return {key: arguments[key] for key in ("base_model_path", "peft_model_path") if key in arguments}
    if target.endswith("AutoModelForSeq2SeqLM.from_pretrained") and set(arguments) == {"pretrained_model_name_or_path"}:
        return arguments["pretrained_model_name_or_path"]
    return spec
