"""Sentence embeddings from a BERT-style encoder, and frozen zero-shot heads made of them.

all-MiniLM-L6-v2 embeds a text as the mean of its token states, L2-normalised; a class is embedded
as its readable name in a prompt ("a text about {}."). Logits are the scaled cosine similarity
between a text and each class, so the head needs no training: the protocol of CLIP on TA8.
"""

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.utils.cache import cache_dir, file_digest, fingerprint, write_atomically

if TYPE_CHECKING:
    from fusion_bench.tasks.offline_text import TextTask

LOGIT_SCALE = 50.0


def mean_pooled(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """L2-normalised mean of the token states over the attended tokens."""
    return pooled_embedding(encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask)


def pooled_embedding(states: Tensor, attention_mask: Tensor) -> Tensor:
    """L2-normalised mean of token states [batch, tokens, dim] over the attended tokens."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return F.normalize((states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9), dim=-1)


@torch.no_grad()
def class_head(encoder: nn.Module, tokenizer, class_names: Sequence[str], template: str, max_length: int) -> Tensor:
    """[n_classes, dim]: each class name in the template, embedded and normalised."""
    batch = tokenizer([template.format(name) for name in class_names], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    device = next(encoder.parameters()).device
    return mean_pooled(encoder, batch["input_ids"].to(device), batch["attention_mask"].to(device))


def logits(embeddings: Tensor, head: Tensor) -> Tensor:
    return LOGIT_SCALE * embeddings @ head.T


def cached_class_head(base_model: Path, task: "TextTask", max_length: int) -> Tensor:
    """`class_head` of `task` from the encoder folder `base_model`, kept on disk under a key of
    the encoder's weights, the class names, the template and max_length."""
    from transformers import AutoTokenizer, BertModel

    key = fingerprint(_weights_digest(base_model), task.classes, task.template, max_length)
    path = cache_dir() / "heads" / f"{task.name}-{key}.pt"
    if path.exists():
        return torch.load(path)
    encoder = BertModel.from_pretrained(base_model)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    head = class_head(encoder, tokenizer, list(task.classes.values()), task.template, max_length)
    write_atomically(path, lambda temporary: torch.save(head, temporary))
    return head


@functools.cache
def _weights_digest(base_model: Path) -> str:
    return file_digest(Path(base_model) / "model.safetensors")
