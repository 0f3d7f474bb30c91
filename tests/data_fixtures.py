"""Pools that serve data for methods that learn from data, tiny enough for tests.

TinyTextPool: tiny BERT models (modules or folders) whose tasks are random token sequences with
random labels, scored by a random class-name-like head over mean-pooled states: the offline
benchmark's structure (SentenceEmbeddingHead, attention masks with padding) at 1/10⁴ of its size.
`clip_data_pool(world)`: the tiny CLIP world's pool with train and test images.
"""

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fusion_bench.modelpool import CLIPVisionModelPool
from fusion_bench.modelpool.huggingface import AutoModelPool
from fusion_bench.modelpool.task_data import Batch, Batches, TaskData, check_data_request, check_enough_examples, draw_indices
from fusion_bench.models.task_heads import SentenceEmbeddingHead
from fusion_bench.utils.cache import fingerprint
from tests.clip_fixtures import CLIP_TASKS


class TinyTextPool(AutoModelPool):
    """`examples` token sequences per task and split (lengths 3..seq_len, padded), `num_classes`
    classes; everything seeded by the task's name, so two pools with the same keys serve the same data."""

    def __init__(self, models: Mapping[str, Any], *, num_classes: int = 3, examples: int = 12, seq_len: int = 8, vocab_size: int = 64, hidden_size: int = 16):
        super().__init__(models, model_class="transformers.BertModel")
        self.num_classes, self.examples, self.seq_len, self.vocab_size, self.hidden_size = num_classes, examples, seq_len, vocab_size, hidden_size

    def check_task_data(self, split: str, what: str) -> None:
        check_data_request(split, None, 1, what)

    def rows(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask, labels) of every example of the task's split."""
        generator = torch.Generator().manual_seed(int(fingerprint(task, split), 16) % 2**31)
        ids = torch.randint(1, self.vocab_size, (self.examples, self.seq_len), generator=generator)
        lengths = torch.randint(3, self.seq_len + 1, (self.examples,), generator=generator)
        mask = (torch.arange(self.seq_len) < lengths[:, None]).long()
        labels = torch.randint(0, self.num_classes, (self.examples,), generator=generator)
        return ids * mask, mask, labels

    def task_data(self, task: str, *, split: str, num_examples: int | None, batch_size: int, seed: int = 0) -> TaskData:
        check_data_request(split, num_examples, batch_size, f"the {split} data of {task!r}")
        check_enough_examples(task, split, self.examples, num_examples, "the method")
        ids, mask, labels = self.rows(task, split)
        drawn = draw_indices(self.examples, num_examples, seed)

        def make(indices: list[int]) -> Batch:
            return Batch({"input_ids": ids[indices], "attention_mask": mask[indices]}, labels[indices] if split == "train" else None)

        generator = torch.Generator().manual_seed(int(fingerprint(task, "head"), 16) % 2**31)
        head = SentenceEmbeddingHead(F.normalize(torch.randn(self.num_classes, self.hidden_size, generator=generator), dim=-1))
        key = fingerprint("tiny_text", task, split, self.examples, self.seq_len, self.num_classes, drawn, batch_size)
        return TaskData(task, split, Batches(drawn, batch_size, make), head, key)


def clip_data_pool(world, **datasets) -> CLIPVisionModelPool:
    """The tiny CLIP world's pool (FusionBench's layout) with train and test images of every task."""
    models = {"_pretrained_": str(world / "clip"), **{task: str(world / "towers" / task) for task in CLIP_TASKS}}
    splits = {
        f"{split}_datasets": {task: {"_target_": "datasets.load_dataset", "path": str(world / "data" / task), "split": split} for task in CLIP_TASKS}
        for split in ("train", "test")
    }
    return CLIPVisionModelPool(models, processor=str(world / "clip"), **{**splits, **datasets})
