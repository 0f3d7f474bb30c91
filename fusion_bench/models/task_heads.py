"""Frozen heads that turn a task model's output into class logits, as the task pools score them:
CLIP's zero-shot head over the pooled image embedding, the offline tasks' class-name head over
mean-pooled sentence embeddings, and a text-to-text model's first answer token. Data-dependent
methods (fusion_bench.modelpool.task_data) use them."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.models.sentence_embedding import LOGIT_SCALE, pooled_embedding


class CLIPZeroShotHead(nn.Module):
    """logit_scale · normalise(projection(pooler_output)) · headᵀ, where head holds each class's
    normalised text embedding (fusion_bench.taskpool.clip_vision.zeroshot_heads)."""

    def __init__(self, projection: nn.Module, logit_scale: float, class_embeddings: Tensor):
        super().__init__()
        self.projection = projection.requires_grad_(False)
        self.logit_scale = logit_scale
        self.register_buffer("class_embeddings", class_embeddings.detach().float())

    def forward(self, outputs, batch) -> Tensor:
        embeddings = self.projection(outputs.pooler_output)
        return self.logit_scale * F.normalize(embeddings.float(), dim=-1) @ self.class_embeddings.T


class SentenceEmbeddingHead(nn.Module):
    """The offline tasks' head: the mean of the token states over the attention mask, normalised,
    against each class name's embedding (fusion_bench.models.sentence_embedding)."""

    def __init__(self, class_embeddings: Tensor):
        super().__init__()
        self.register_buffer("class_embeddings", class_embeddings.detach().float())

    def forward(self, outputs, batch) -> Tensor:
        pooled = pooled_embedding(outputs.last_hidden_state, batch.inputs["attention_mask"])
        return LOGIT_SCALE * pooled.float() @ self.class_embeddings.T


class FirstAnswerTokenHead(nn.Module):
    """A sequence-to-sequence model's logits at the decoder's first step, over the first token of
    each label word (the classes, in label order), or over the whole vocabulary where the task has
    no label words (STS-B's scores): the answer is decided by its first token."""

    def __init__(self, class_tokens: list[int] | None):
        super().__init__()
        self.register_buffer("class_tokens", None if class_tokens is None else torch.tensor(class_tokens))

    def forward(self, outputs, batch) -> Tensor:
        logits = outputs.logits[:, 0].float()
        return logits if self.class_tokens is None else logits[:, self.class_tokens]
