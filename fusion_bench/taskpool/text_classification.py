"""Scores a sentence encoder on the offline text tasks with frozen class-name heads.

Each task's head is built once from the base (pretrained) encoder, as in fine-tuning, and cached on
disk; the evaluated encoder only supplies the text embeddings. Texts are batched by length to
spare padding. Per task: accuracy and cross-entropy (summed over examples, then divided).
"""

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoTokenizer, BertModel

from fusion_bench.modelpool.offline_text import packaged_minilm
from fusion_bench.models.sentence_embedding import cached_class_head, logits, mean_pooled
from fusion_bench.taskpool.base import BaseTaskPool, TaskMetrics
from fusion_bench.taskpool.sharding import batch_share, summed_over_processes
from fusion_bench.tasks.offline_text import TASKS
from fusion_bench.tasks.text_datasets import task_splits
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.progress import progress_bar

log = logging.getLogger(__name__)

SPLITS = ("test", "validation")


class TextClassificationTaskPool(BaseTaskPool):
    """tasks: names from fusion_bench.tasks.offline_text; split: test or validation (to choose λ);
    base_model: the encoder the heads come from (default: the packaged MiniLM); max_samples:
    evaluate only the first n examples of each task; fast_dev_run: one batch per task."""

    uses_fabric = True
    shards_across_processes = True  # fabric.devices=N: each process scores a share of the batches

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        split: str = "test",
        seed: int = 0,
        base_model: str | None = None,
        batch_size: int = 64,
        max_length: int = 64,
        max_samples: int | None = None,
        fast_dev_run: bool = False,
    ):
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise InputError(f"unknown offline task {unknown[0]!r}; the tasks are: {', '.join(TASKS)}")
        if split not in SPLITS:
            raise InputError(f"split={split!r} is unknown; use test, or validation to choose hyper-parameters")
        self.tasks, self.split, self.seed = list(tasks), split, seed
        self.base_model = Path(base_model) if base_model else packaged_minilm()
        self.batch_size, self.max_length = batch_size, max_length
        self.max_samples = 1 if fast_dev_run else max_samples
        self.batches_per_task = 1 if fast_dev_run else None
        self._heads: dict[str, Tensor] = {}

    def prepare(self) -> None:
        """Before merging: the base encoder's folder holds a BERT config and weights."""
        if not (self.base_model / "config.json").is_file() or not (self.base_model / "model.safetensors").is_file():
            raise InputError(f"the task pool's base_model {self.base_model} is no encoder folder (config.json and model.safetensors); check the path")

    def local_paths(self) -> dict[str, Path]:
        return {"the task pool's base_model": self.base_model}

    def task_names(self) -> list[str]:
        return list(self.tasks)

    @torch.no_grad()
    def evaluate_tasks(self, model: nn.Module, fabric: Any = None, tasks: Sequence[str] | None = None) -> TaskMetrics:
        self._check_fits(model)
        tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        model = fabric.to_device(model) if fabric else model
        model.eval()
        device = next(model.parameters()).device
        results = {}
        for task in self.tasks if tasks is None else tasks:
            start = time.perf_counter()
            data = task_splits(task, self.seed)[self.split]
            if self.max_samples:
                data = data.select(range(min(self.max_samples, len(data))))
            head = self.head(task).to(device)
            correct, loss, seen = 0, 0.0, 0
            order = sorted(range(len(data)), key=lambda i: len(data[i]["text"]))
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)][: self.batches_per_task]
            batches = [batches[i] for i in batch_share(len(batches), fabric)]
            for batch in progress_bar(batches, desc=f"evaluating {task}"):
                rows = data[batch]
                tokens = tokenizer(rows["text"], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt").to(device)
                labels = torch.tensor(rows["label"], device=device)
                scores = logits(mean_pooled(model, tokens["input_ids"], tokens["attention_mask"]), head)
                correct += int((scores.argmax(dim=1) == labels).sum())
                loss += float(F.cross_entropy(scores, labels, reduction="sum"))
                seen += len(batch)
            correct, loss, seen = summed_over_processes([correct, loss, seen], fabric)
            results[task] = {"accuracy": correct / seen, "loss": loss / seen}
            log.info("%s: accuracy %.4f, loss %.4f (%d texts, %.1f s)", task, correct / seen, loss / seen, seen, time.perf_counter() - start)
        return results

    def head(self, task: str) -> Tensor:
        """The task's frozen head from the base encoder, cached on disk by what it is built from."""
        if task not in self._heads:
            self._heads[task] = cached_class_head(self.base_model, TASKS[task], self.max_length)
        return self._heads[task]

    def _check_fits(self, model: nn.Module) -> None:
        expected = BertModel.config_class.from_pretrained(self.base_model).hidden_size
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden != expected:
            raise InputError(
                f"the merged model (hidden size {hidden}) does not fit this task pool, built for {self.base_model} "
                f"(hidden size {expected}); use the task pool of the model pool's base model"
            )
