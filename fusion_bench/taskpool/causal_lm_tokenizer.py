"""Which tokenizer a language-model task pool scores with, found before the merge where it can be."""

from typing import Any

from torch import nn

from fusion_bench.modelpool.base import BaseModelPool
from fusion_bench.modelpool.huggingface import load_auto_tokenizer
from fusion_bench.utils.errors import InputError

_FIX = "check the folder or hub id, or give taskpool.tokenizer"


class TokenizerChoice:
    """The task pool's `tokenizer` key if given; else the model pool's tokenizer (its `tokenizer`
    key or its base model's folder), taken before the merge; else, for a model scored without a
    model pool, the folder or hub id the model was loaded from (`model.name_or_path`)."""

    def __init__(self, source: str | None):
        if source is not None and (not isinstance(source, str) or not source):
            raise InputError(f"tokenizer={source!r} must be a folder or hub id, or null (the model pool's)")
        self.source = source
        self._tokenizer: Any = None

    def prepare(self) -> None:
        """Load the `tokenizer` key's tokenizer (a bad one fails before the merge)."""
        if self.source is not None and self._tokenizer is None:
            self._tokenizer = load_auto_tokenizer(self.source, "the task pool's tokenizer", _FIX)

    def take_from(self, modelpool: BaseModelPool) -> None:
        """Without a `tokenizer` key, use the model pool's: the merged model speaks its vocabulary."""
        if self.source is not None or self._tokenizer is not None:
            return
        if type(modelpool).load_tokenizer is BaseModelPool.load_tokenizer:
            return  # a pool with no tokenizer: the merged model's name_or_path is tried at evaluation
        try:
            self._tokenizer = modelpool.load_tokenizer()
        except InputError as error:
            reason = str(error).split(";")[0]  # the pool's message ends with a fix for saving, not ours
            raise InputError(f"the task pool needs a tokenizer and the model pool's cannot be loaded ({reason}); give taskpool.tokenizer=<folder or hub id>") from None

    def for_model(self, model: nn.Module) -> Any:
        """The tokenizer to score `model` with."""
        self.prepare()
        if self._tokenizer is None:
            source = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
            if not source:
                raise InputError(f"the task pool cannot tell which tokenizer {type(model).__name__} uses; give taskpool.tokenizer=<folder or hub id>")
            self._tokenizer = load_auto_tokenizer(str(source), "the tokenizer of the model's folder", _FIX)
        return self._tokenizer
