"""Fine-tuning a sentence encoder on one text task, with its frozen class-name head.

Only the encoder learns (its word embeddings frozen too, as the offline benchmark's recipe says);
the head is built from the pretrained encoder and never changes, so merged encoders can share it.
A fixed number of steps, not a time budget, so results do not depend on the machine's speed.
"""

import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertModel

from fusion_bench.models.sentence_embedding import class_head, logits, mean_pooled
from fusion_bench.tasks.offline_text import TASKS
from fusion_bench.tasks.text_datasets import task_splits
from fusion_bench.utils.progress import progress_bar

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneRecipe:
    """The fine-tuning hyper-parameters: part of each checkpoint's cache key."""

    steps: int = 80
    batch_size: int = 32
    learning_rate: float = 1e-4
    max_length: int = 64

    def as_dict(self) -> dict:
        return asdict(self)


@torch.enable_grad()  # pools build models on demand, often inside a method's no_grad
def finetune_text_encoder(base_model: Path, task_name: str, output: Path, *, recipe: FinetuneRecipe, seed: int, fabric) -> dict[str, float]:
    """Fine-tune `base_model` on the task's train split and save it (with its tokenizer) to
    `output`; returns the mean training loss and accuracy over the last quarter of the steps."""
    task = TASKS[task_name]
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = fabric.to_device(BertModel.from_pretrained(base_model))
    head = class_head(model, tokenizer, list(task.classes.values()), task.template, recipe.max_length)
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=recipe.learning_rate, weight_decay=0.0)
    encoder, optimizer = fabric.setup(model, optimizer)
    train = task_splits(task, seed)["train"]
    order = _batches(len(train), recipe, seed)
    encoder.train()
    tail_losses, tail_correct = [], []
    for step in progress_bar(range(recipe.steps), desc=f"fine-tuning {task_name}"):
        batch = train[order[step]]
        tokens = tokenizer(batch["text"], padding=True, truncation=True, max_length=recipe.max_length, return_tensors="pt")
        tokens = fabric.to_device(dict(tokens))
        labels = fabric.to_device(torch.tensor(batch["label"]))
        scores = logits(mean_pooled(encoder, tokens["input_ids"], tokens["attention_mask"]), head)
        loss = F.cross_entropy(scores, labels)
        optimizer.zero_grad()
        fabric.backward(loss)
        optimizer.step()
        if step >= recipe.steps * 3 // 4:
            tail_losses.append(loss.item())
            tail_correct.append((scores.argmax(dim=1) == labels).float().mean().item())
    model.cpu().save_pretrained(output)
    tokenizer.save_pretrained(output)
    return {"train_loss": sum(tail_losses) / len(tail_losses), "train_accuracy": sum(tail_correct) / len(tail_correct)}


def _batches(size: int, recipe: FinetuneRecipe, seed: int) -> list[list[int]]:
    """Each step's example indices: seeded shuffles of the train split, epoch after epoch."""
    rng = random.Random(seed)
    indices: list[int] = []
    while len(indices) < recipe.steps * recipe.batch_size:
        epoch = list(range(size))
        rng.shuffle(epoch)
        indices += epoch
    return [indices[i * recipe.batch_size : (i + 1) * recipe.batch_size] for i in range(recipe.steps)]
