"""Whether a vision tower fits a CLIP model: the same ViT shape, else an error naming what to use."""

from typing import Any

from fusion_bench.utils.errors import InputError

_SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "patch_size", "image_size", "num_channels")

# The CLIP models FusionBench's pools are fine-tuned from, by (hidden size, layers, patch, image size),
# with the task pool config shipped for each (None: none shipped yet).
_KNOWN_BASES = {
    (768, 12, 32, 224): ("openai/clip-vit-base-patch32", "CLIPVisionModelTaskPool/clip-vit-classification_TA8"),
    (768, 12, 16, 224): ("openai/clip-vit-base-patch16", None),
    (1024, 24, 14, 224): ("openai/clip-vit-large-patch14", "CLIPVisionModelTaskPool/clip-vit-classification_TA8_L14"),
}


def check_tower_fits(tower_config: Any, base_config: Any, base_model: str, what: str = "the merged model") -> None:
    """Raise InputError unless `tower_config` (a CLIPVisionConfig) has the shape of `base_config`,
    the vision config of the task pool's CLIP model `base_model`."""
    if getattr(tower_config, "model_type", None) != "clip_vision_model":
        kind = type(tower_config).__name__.removesuffix("Config") if tower_config is not None else "not a transformers model"
        raise InputError(
            f"{what} is {kind}, not a CLIP vision tower; the CLIP task pool scores transformers.CLIPVisionModel, "
            "e.g. from a CLIPVisionModelPool"
        )
    differences = [f for f in _SHAPE_FIELDS if getattr(tower_config, f) != getattr(base_config, f)]
    if not differences:
        return
    shown = ", ".join(f"{f} {getattr(tower_config, f)} vs {getattr(base_config, f)}" for f in differences)
    raise InputError(f"{what} does not fit the task pool's base model {base_model} ({shown}); {_advice(tower_config)}")


def _advice(tower_config: Any) -> str:
    shape = (tower_config.hidden_size, tower_config.num_hidden_layers, tower_config.patch_size, tower_config.image_size)
    if shape in _KNOWN_BASES:
        hub_id, config_name = _KNOWN_BASES[shape]
        if config_name:
            return f"its shape is {hub_id}'s: use taskpool={config_name}"
        return f"its shape is {hub_id}'s: set taskpool.base_model={hub_id}"
    return "set taskpool.base_model to the CLIP model the vision towers were fine-tuned from"
