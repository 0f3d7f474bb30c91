"""CLIP vision towers (transformers.CLIPVisionModel) by name, read from FusionBench's YAML unchanged.

    _target_: fusion_bench.modelpool.CLIPVisionModelPool
    _recursive_: false
    processor: openai/clip-vit-base-patch32
    models: {_pretrained_: openai/clip-vit-base-patch32, sun397: tanganke/clip-vit-base-patch32_sun397}
    platform: hf

`_pretrained_` may be a full CLIPModel checkpoint (the openai/* ones are): the vision tower is read
out of it, lazily like every other model, and the text tower is never loaded.
"""

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate

from fusion_bench.modelpool.huggingface import AutoModelPool
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain

_PLATFORMS = ("hf", "huggingface")


class CLIPVisionModelPool(AutoModelPool):
    """An AutoModelPool of CLIPVisionModel, with the CLIP processor and image datasets of its tasks.

    processor: hub id or folder of the CLIPProcessor (or a `_target_` config).
    platform: where hub ids live; only the Hugging Face hub ("hf") is supported.
    """

    def __init__(
        self,
        models: Mapping[str, Any],
        *,
        processor: str | Mapping[str, Any] | None = None,
        platform: str = "hf",
        train_datasets: Mapping[str, Any] | None = None,
        val_datasets: Mapping[str, Any] | None = None,
        test_datasets: Mapping[str, Any] | None = None,
    ):
        if platform not in _PLATFORMS:
            raise InputError(
                f"platform={platform!r} is not supported: fusion_bench reads models from the Hugging Face hub "
                "(platform: hf) or from local folders; download the models and list their folders"
            )
        super().__init__(
            models,
            model_class="transformers.CLIPVisionModel",
            train_datasets=train_datasets,
            val_datasets=val_datasets,
            test_datasets=test_datasets,
        )
        self.platform = platform
        self._processor = plain(processor)

    def load_processor(self):
        """The CLIPProcessor (image processor and tokenizer) named by `processor`."""
        if self._processor is None:
            raise InputError("the model pool has no `processor`; set it to the CLIP model's hub id or folder")
        if isinstance(self._processor, Mapping):
            return instantiate(self._processor)
        from transformers import CLIPProcessor

        try:
            return CLIPProcessor.from_pretrained(self._processor)
        except OSError as error:
            raise InputError(f"processor {self._processor!r} cannot be loaded ({error}); check the hub id or folder") from error

    def load_clip_model(self, name: str):
        """The whole CLIPModel (text tower included) of model `name`, e.g. `_pretrained_`."""
        from transformers import CLIPModel

        return CLIPModel.from_pretrained(self.model_path(name))
