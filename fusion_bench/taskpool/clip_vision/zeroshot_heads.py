"""Zero-shot classification heads: each class name in every prompt template, through CLIP's text
tower; the embeddings normalised, averaged over templates, normalised again (Radford et al., 2021).

A head depends only on the text tower, the tokenizer, the class names and the templates, never on
the merged vision tower, so each is computed once and kept on disk under a key hashed from exactly
those inputs.
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

from fusion_bench.tasks.clip_classification import ClassificationTask
from fusion_bench.utils.cache import write_atomically
from fusion_bench.utils.progress import progress_bar

_FORMAT = 1  # bump when the computation changes, so old files are not read
_PROMPTS_PER_BATCH = 256


def text_tower_digest(clip_model: Any, tokenizer: Any) -> str:
    """A hash of what heads are computed from: the text tower's weights and the tokenizer."""
    digest = hashlib.sha256()
    for module_name in ("text_model", "text_projection"):
        for key, tensor in getattr(clip_model, module_name).state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{module_name}.{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(-1).view(torch.uint8).numpy())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    return digest.hexdigest()


def head_key(tower_digest: str, task: ClassificationTask) -> str:
    spec = {"format": _FORMAT, "text_tower": tower_digest, "classnames": task.classnames, "templates": task.templates}
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


@torch.no_grad()
def compute_head(clip_model: Any, tokenizer: Any, task: ClassificationTask, device: torch.device, description: str = "") -> Tensor:
    """The (classes × embedding) head, float32, rows of unit length."""
    prompts = task.prompts()
    embeddings = []
    for start in progress_bar(range(0, len(prompts), _PROMPTS_PER_BATCH), desc=f"zero-shot head {description}".strip()):
        tokens = tokenizer(prompts[start : start + _PROMPTS_PER_BATCH], padding=True, truncation=True, return_tensors="pt")
        pooled = clip_model.text_model(input_ids=tokens["input_ids"].to(device), attention_mask=tokens["attention_mask"].to(device)).pooler_output
        embeddings.append(clip_model.text_projection(pooled).float())
    per_prompt = F.normalize(torch.cat(embeddings), dim=-1)
    per_class = per_prompt.view(len(task.classnames), len(task.templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


class HeadCache:
    """Heads on disk, one safetensors file per key, written atomically."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> Tensor | None:
        path = self.path(key)
        return load_file(str(path))["head"] if path.is_file() else None

    def save(self, key: str, head: Tensor, metadata: dict[str, str]) -> None:
        tensors = {"head": head.detach().cpu().contiguous()}
        write_atomically(self.path(key), lambda temporary: save_file(tensors, str(temporary), metadata=metadata))
