"""GLUE for text-to-text models (Flan-T5): prompt, generate greedily, score the decoded answers."""

import logging
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion_bench.modelpool.huggingface import load_auto_tokenizer
from fusion_bench.taskpool.base import BaseTaskPool, TaskMetrics
from fusion_bench.taskpool.batched_generation import generate_answers
from fusion_bench.taskpool.sharding import batch_share, gathered_over_processes
from fusion_bench.taskpool.text_metrics import exact_match, spearman_of_scores
from fusion_bench.taskpool.tokenized_cache import tokenize_cached
from fusion_bench.tasks.glue import GLUE_TASKS, GlueTask, load_glue_split, prompt_max_length
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain

log = logging.getLogger(__name__)


class FlanT5GLUETextGenerationTaskPool(BaseTaskPool):
    """Scores a sequence-to-sequence model on GLUE validation sets as FusionBench does for Flan-T5.

    Each example becomes a Flan-style prompt (fusion_bench.tasks.glue); the model answers greedily
    in at most `max_new_tokens` tokens; the decoded answer must equal the label word (accuracy) or,
    for STS-B, state a number (Spearman's ρ against the score). Every task also reports
    `unparseable`, the answers that are no label word (no number), and `score`, its accuracy or ρ,
    whose average over the tasks is the GLUE average of the papers.

    tasks: GLUE task names (their default split: validation, MNLI validation_matched), or entries
        in FusionBench's form {name: ..., dataset: {name: ..., split: ...}}.
    tokenizer: the tokenizer's hub id or path (all Flan-T5 sizes share google/flan-t5-base's).
    dataset_path: what datasets.load_dataset reads GLUE from: a hub id or a local folder with the
        same configs (task names) and splits.
    max_samples: evaluate only the first max_samples examples of each task (null: all).
    fast_dev_run: evaluate one batch per task.
    cache_dir: where tokenized prompts are cached (null: $FUSION_BENCH_CACHE/tokenized, by default
        ~/.cache/fusion_bench/tokenized).
    """

    uses_fabric = True
    shards_across_processes = True  # fabric.devices=N: each process answers a share of the batches

    def __init__(
        self,
        tasks: Sequence[str | Mapping[str, Any]] = tuple(GLUE_TASKS),
        *,
        tokenizer: str,
        dataset_path: str = "glue",
        batch_size: int = 32,
        max_new_tokens: int = 9,
        max_samples: int | None = None,
        fast_dev_run: bool = False,
        cache_dir: str | None = None,
    ):
        self.tasks = [_task_entry(entry) for entry in plain(tasks)]
        names = [name for name, _, _ in self.tasks]
        if not names:
            raise InputError("the task pool has no tasks; list GLUE tasks under `tasks`, e.g. [cola, rte]")
        if len(set(names)) != len(names):
            raise InputError(f"the task pool lists a task twice: {names}")
        for value, key in ((batch_size, "batch_size"), (max_new_tokens, "max_new_tokens")):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{key}={value!r} must be a positive integer")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1):
            raise InputError(f"max_samples={max_samples!r} must be a positive integer or null (all examples)")
        self.tokenizer_name = tokenizer
        self.dataset_path = dataset_path
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        self.max_samples = min(max_samples or batch_size, batch_size) if fast_dev_run else max_samples
        self._examples_of: dict[str, tuple[list[str], list[str]]] = {}
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None

    def prepare(self) -> None:
        """Before merging: the tokenizer and every task's examples load."""
        self._tokenizer  # noqa: B018 - loading it is the check
        for name, task, split in self.tasks:
            self._examples(name, task, split)

    def task_names(self) -> list[str]:
        return [name for name, _, _ in self.tasks]

    def evaluate_tasks(self, model: nn.Module, fabric: Any = None, tasks: Sequence[str] | None = None) -> TaskMetrics:
        """{task: {score, accuracy or spearman_rho, unparseable}} on the Fabric's device (else CPU)."""
        tokenizer = self._tokenizer
        device = fabric.device if fabric is not None else torch.device("cpu")
        model = model.to(device).eval()
        results = {}
        for name, task, split in self.tasks:
            if tasks is not None and name not in tasks:
                continue
            prompts, targets = self._examples(name, task, split)
            tokenized = tokenize_cached(tokenizer, prompts, max_length=prompt_max_length(tokenizer), cache_dir=self.cache_dir)
            answers = generate_answers(
                model,
                tokenizer,
                tokenized,
                batch_size=self.batch_size,
                max_new_tokens=self.max_new_tokens,
                device=device,
                autocast=fabric.autocast if fabric is not None else None,
                desc=name,
                share=lambda batches: batch_share(batches, fabric),
            )
            answers = gathered_over_processes(answers, fabric)
            targets = _as_decoded(tokenizer, targets)
            if task.is_regression:
                metrics = spearman_of_scores(answers, targets)
                results[name] = {"score": metrics["spearman_rho"], **metrics}
            else:
                metrics = exact_match(answers, targets, _as_decoded(tokenizer, task.label_words))
                results[name] = {"score": metrics["accuracy"], **metrics}
            log.info("%s: %s", name, results[name])
        return results

    @cached_property
    def _tokenizer(self):
        """Loaded once: prepare() checks it before the merge, evaluation uses it."""
        return load_auto_tokenizer(self.tokenizer_name, "the task pool's tokenizer", "check the hub id or folder")

    def _examples(self, name: str, task: GlueTask, split: str) -> tuple[list[str], list[str]]:
        """The prompts and expected answers of the split (its first max_samples examples), loaded once."""
        if name not in self._examples_of:
            self._examples_of[name] = self._load_examples(task, split)
        return self._examples_of[name]

    def _load_examples(self, task: GlueTask, split: str) -> tuple[list[str], list[str]]:
        dataset = load_glue_split(self.dataset_path, task, split)
        if self.max_samples is not None:
            dataset = dataset.select(range(min(self.max_samples, len(dataset))))
        examples = dataset.to_list()
        return [task.render(example) for example in examples], [task.target(example) for example in examples]


def _task_entry(entry: str | Mapping[str, Any]) -> tuple[str, GlueTask, str]:
    """(report name, task, split) from a task name or a FusionBench task entry."""
    if isinstance(entry, str):
        name, dataset = entry, {}
    elif isinstance(entry, Mapping) and "name" in entry:
        name, dataset = entry["name"], entry.get("dataset") or {}
    else:
        raise InputError(f"task entry {entry!r} is neither a GLUE task name nor {{name: ..., dataset: {{name: ..., split: ...}}}}")
    glue_name = dataset.get("name", name).removeprefix("glue-")
    if glue_name not in GLUE_TASKS:
        raise InputError(f"task {name!r} is not a GLUE task; use one of {', '.join(GLUE_TASKS)}")
    task = GLUE_TASKS[glue_name]
    return name, task, dataset.get("split", task.split)


def _as_decoded(tokenizer, texts: Sequence[str]) -> list[str]:
    """Each text as it reads after tokenizing and decoding, which is what a generated answer is
    compared with (FusionBench compares decoded label tokens)."""
    decoded = {text: tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) for text in set(texts)}
    return [decoded[text] for text in texts]
