"""Sentence embeddings from a BERT-style encoder, and frozen zero-shot heads made of them.

all-MiniLM-L6-v2 embeds a text as the mean of its token states, L2-normalised; a class is embedded
as its readable name in a prompt ("a text about {}."). Logits are the scaled cosine similarity
between a text and each class, so the head needs no training: the protocol of CLIP on TA8.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOGIT_SCALE = 50.0


def mean_pooled(encoder: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """L2-normalised mean of the token states over the attended tokens."""
    states = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
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
