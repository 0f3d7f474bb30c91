"""The modules of task_vectors' checkpoints (Ilharco et al., 2023), under FusionBench's names
(`fusion_bench.models.open_clip.ImageEncoder`, `ClassificationHead`), built from open_clip.

open_clip is imported only through `import_open_clip`, after `import fusion_bench` has made
torchvision importable where its compiled ops do not fit the installed torch
(fusion_bench.utils.torchvision_compat).
"""

import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.utils.errors import InputError, first_line

OPEN_CLIP_SCHEMAS = ("local-dir:", "hf-hub:")  # open_clip model names that carry their own config (and weights)


def import_open_clip() -> ModuleType:
    """The open_clip package, or an InputError saying how to install it."""
    try:
        import open_clip
    except ImportError as error:
        raise InputError(f"open_clip cannot be imported ({first_line(error)}); install it with pip install 'fusion_bench[openclip]'") from None
    return open_clip


class ImageEncoder(nn.Module):
    """task_vectors' ImageEncoder: the open_clip CLIP model `model_name` without its text
    transformer (the token embedding, final layer norm and text projection stay, as in the saved
    checkpoints); forward gives the image embeddings (`model.encode_image`).

    Only the architecture is built (on the meta device, then given memory): its tensors are
    uninitialised until a state dict is loaded, as the model pool does; nothing is downloaded, and
    no time goes into a random initialisation (9 s for ViT-L-14 on a CPU).
    quick_gelu: the MLP activation (QuickGELU for OpenAI's weights, which every task_vectors
    checkpoint starts from); None takes the model config's.
    val_preprocess: open_clip's evaluation transform for this model (PIL image → tensor).
    """

    def __init__(self, model_name: str, *, quick_gelu: bool | None = None):
        super().__init__()
        open_clip = import_open_clip()
        if not model_name.startswith(OPEN_CLIP_SCHEMAS) and model_name not in open_clip.list_models():
            raise InputError(f"model_name={model_name!r} is not an open_clip model; known ViTs include ViT-B-32, ViT-B-16, ViT-L-14")
        overrides = {} if quick_gelu is None else {"quick_gelu": quick_gelu}
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)  # open_clip warns (on the root logger) that no pretrained weights were loaded: they are loaded next, from the checkpoint
        try:
            with torch.device("meta"):
                self.model, _, self.val_preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, device="meta", **overrides)
        finally:
            logging.disable(previous)
        if hasattr(self.model, "transformer"):
            del self.model.transformer
            self.model.attn_mask = None  # the text transformer's mask (not in the state dict), used by nothing else
        self.model.to_empty(device="cpu")

    def forward(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)


class ClassificationHead(nn.Linear):
    """task_vectors' ClassificationHead: a linear map of the (optionally L2-normalised) image
    embeddings to class logits. Its zero-shot heads are the class embeddings times CLIP's logit
    scale, with `normalize` true."""

    def __init__(self, normalize: bool, weights: Tensor, biases: Tensor | None = None):
        classes, features = weights.shape
        super().__init__(features, classes)
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(weights)
            self.bias.copy_(biases if biases is not None else torch.zeros(classes))

    def forward(self, inputs: Tensor) -> Tensor:
        return super().forward(F.normalize(inputs, dim=-1) if self.normalize else inputs)
