"""An open_clip ViT image tower in Hugging Face's CLIPVisionModelWithProjection layout, and back.

The two implement the same network (the OpenAI CLIP ViT); only names and the attention's
packing differ. With `open_clip` keys relative to the image tower (`visual.` in a CLIP model,
`model.visual.` in a task_vectors ImageEncoder) and `hf` keys of CLIPVisionModelWithProjection:

| open_clip (`visual.`)                         | Hugging Face                                                      |
|-----------------------------------------------|-------------------------------------------------------------------|
| `class_embedding`                             | `vision_model.embeddings.class_embedding`                        |
| `conv1.weight`                                | `vision_model.embeddings.patch_embedding.weight`                 |
| `positional_embedding`                        | `vision_model.embeddings.position_embedding.weight`             |
| `ln_pre.*`                                    | `vision_model.pre_layrnorm.*` (sic)                               |
| `transformer.resblocks.{i}.ln_1.*`            | `vision_model.encoder.layers.{i}.layer_norm1.*`                  |
| `transformer.resblocks.{i}.attn.in_proj_weight` [3W, W] | `...layers.{i}.self_attn.{q,k,v}_proj.weight` [W, W] each, in that order |
| `transformer.resblocks.{i}.attn.in_proj_bias` [3W] | `...layers.{i}.self_attn.{q,k,v}_proj.bias` [W] each          |
| `transformer.resblocks.{i}.attn.out_proj.*`   | `...layers.{i}.self_attn.out_proj.*`                              |
| `transformer.resblocks.{i}.ln_2.*`            | `...layers.{i}.layer_norm2.*`                                     |
| `transformer.resblocks.{i}.mlp.c_fc.*`        | `...layers.{i}.mlp.fc1.*`                                         |
| `transformer.resblocks.{i}.mlp.c_proj.*`      | `...layers.{i}.mlp.fc2.*`                                         |
| `ln_post.*`                                   | `vision_model.post_layernorm.*`                                   |
| `proj` [W, E] (features @ proj)               | `visual_projection.weight` [E, W] (a Linear: its transpose)       |

A CLIPVisionModel (no projection) holds the `vision_model.*` part; its pooled output is the
features before `proj`, which the task pool multiplies by the base CLIPModel's projection.
The activation must agree too: the OpenAI weights use QuickGELU (`hidden_act: quick_gelu`), as
open_clip's `-quickgelu` models and every task_vectors checkpoint do.
"""

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fusion_bench.utils.errors import InputError

_HF = "vision_model."
_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")
_HF_LAYER = re.compile(r"vision_model\.encoder\.layers\.(\d+)\.(.+)")
_GLOBAL = {
    "class_embedding": "embeddings.class_embedding",
    "conv1.weight": "embeddings.patch_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}
_IN_LAYER = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_QKV = ("q_proj", "k_proj", "v_proj")  # the order of nn.MultiheadAttention's packed in_proj


def open_clip_visual_to_hf(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """CLIPVisionModelWithProjection's state dict from an open_clip ViT tower's tensors, those
    of `state_dict` under `prefix` (e.g. "visual." or "model.visual."; other keys are ignored)."""
    tower = {key[len(prefix) :]: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}
    if "proj" not in tower or "conv1.weight" not in tower:
        raise InputError(f"no open_clip ViT image tower under {prefix!r}: conv1.weight or proj is missing")
    converted = {}
    for key, tensor in tower.items():
        if key in _GLOBAL:
            converted[_HF + _GLOBAL[key]] = tensor
        elif key == "proj":
            converted["visual_projection.weight"] = tensor.t().contiguous()
        elif match := _LAYER.fullmatch(key):
            layer, name = match.groups()
            converted.update(_layer_to_hf(f"{_HF}encoder.layers.{layer}.", name, tensor))
        else:
            raise InputError(f"open_clip key {prefix}{key} has no Hugging Face CLIP counterpart (is this an OpenAI-style ViT?)")
    return converted


def _layer_to_hf(hf_prefix: str, name: str, tensor: Tensor) -> dict[str, Tensor]:
    if name in ("attn.in_proj_weight", "attn.in_proj_bias"):
        kind = name.rpartition("_")[2]
        return {f"{hf_prefix}self_attn.{proj}.{kind}": part.contiguous() for proj, part in zip(_QKV, tensor.chunk(3, dim=0))}
    module, _, kind = name.rpartition(".")
    if module not in _IN_LAYER:
        raise InputError(f"open_clip layer key {name} has no Hugging Face CLIP counterpart (layer scale or another variant?)")
    return {f"{hf_prefix}{_IN_LAYER[module]}.{kind}": tensor}


def hf_to_open_clip_visual(state_dict: Mapping[str, Tensor], prefix: str = "", projection: Tensor | None = None) -> dict[str, Tensor]:
    """An open_clip ViT tower's state dict (keys under `prefix`) from CLIPVisionModelWithProjection's,
    or from CLIPVisionModel's (`vision_model.*` keys) with `projection`, the base CLIPModel's
    `visual_projection.weight`."""
    weight = state_dict.get("visual_projection.weight", projection)
    if weight is None:
        raise InputError("the Hugging Face tower has no visual_projection.weight; give the base CLIPModel's as `projection`")
    inverse_global = {hf: oc for oc, hf in _GLOBAL.items()}
    inverse_layer = {hf: oc for oc, hf in _IN_LAYER.items()}
    converted = {f"{prefix}proj": weight.t().contiguous()}
    packed: dict[tuple[str, str], dict[str, Tensor]] = {}  # (layer, weight|bias) -> {q_proj: ...}
    for key, tensor in state_dict.items():
        if key == "visual_projection.weight" or key == f"{_HF}embeddings.position_ids":
            continue
        if key.startswith(_HF) and key[len(_HF) :] in inverse_global:
            converted[prefix + inverse_global[key[len(_HF) :]]] = tensor
            continue
        match = _HF_LAYER.fullmatch(key)
        module, _, kind = (match.group(2) if match else "").rpartition(".")
        if match and module.startswith("self_attn.") and module[len("self_attn.") :] in _QKV:
            packed.setdefault((match.group(1), kind), {})[module[len("self_attn.") :]] = tensor
        elif match and module in inverse_layer:
            converted[f"{prefix}transformer.resblocks.{match.group(1)}.{inverse_layer[module]}.{kind}"] = tensor
        else:
            raise InputError(f"Hugging Face key {key} has no open_clip counterpart")
    for (layer, kind), parts in packed.items():
        if set(parts) != set(_QKV):
            raise InputError(f"layer {layer} lacks {sorted(set(_QKV) - set(parts))[0]}.{kind}; q, k and v are packed together in open_clip")
        converted[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts[proj] for proj in _QKV])
    return converted


def hf_vision_config(visual: nn.Module):
    """The CLIPVisionConfig of an open_clip ViT tower (`model.visual`), for the converted weights."""
    from transformers import CLIPVisionConfig

    blocks = visual.transformer.resblocks
    width = visual.conv1.out_channels
    return CLIPVisionConfig(
        hidden_size=width,
        intermediate_size=blocks[0].mlp.c_fc.out_features,
        num_hidden_layers=len(blocks),
        num_attention_heads=blocks[0].attn.num_heads,
        image_size=visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size,
        patch_size=visual.conv1.kernel_size[0],
        projection_dim=visual.proj.shape[1],
        hidden_act="quick_gelu" if type(blocks[0].mlp.gelu).__name__ == "QuickGELU" else "gelu",
        layer_norm_eps=blocks[0].ln_1.eps,
    )
