"""GLUE examples for the methods that learn from data, as a Seq2SeqLMPool serves them (Flan-T5).

Each example is the Flan prompt the task pool scores (fusion_bench.tasks.glue), tokenized as the
task pool tokenizes it; the decoder gets its start token only, and the head takes the logits of the
answer's first token (models.task_heads.FirstAnswerTokenHead). Labels: the class id, or for STS-B,
which has no label words, the first token of its score as the task pool writes it ("3.8").
"""

from collections.abc import Mapping
from typing import Any

import torch

from fusion_bench.modelpool.task_data import Batch, Batches, TaskData, check_enough_examples, draw_indices
from fusion_bench.models.task_heads import FirstAnswerTokenHead
from fusion_bench.taskpool.tokenized_cache import tokenizer_fingerprint
from fusion_bench.tasks.glue import GLUE_TASKS, GlueTask, load_glue_split, prompt_max_length
from fusion_bench.utils.cache import fingerprint
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain

# FusionBench's GLUE loader in its Seq2SeqLMPool configs: it renders the same prompts, so an
# entry naming it is read as the same GLUE task and split
FUSIONBENCH_GLUE_LOADER = "fusion_bench.tasks.flan_t5_text_generation.glue_load_dataset.load_glue_dataset"
_ENTRY_KEYS = {"_target_", "_recursive_", "name", "split", "tokenizer", "cache_dir"}


def glue_entry(model: str, spec: Any, role: str) -> tuple[GlueTask, str]:
    """(task, split) of a `train_datasets` / `test_datasets` entry: a GLUE task name, or
    {name, split} as FusionBench writes it. The default split: train, or for test data the split
    the task pool scores (validation; MNLI validation_matched)."""
    spec = plain(spec)
    key = f"{role}_datasets.{model}"
    if isinstance(spec, str):
        name, split = spec, None
    elif isinstance(spec, Mapping):
        if spec.get("_target_", FUSIONBENCH_GLUE_LOADER) != FUSIONBENCH_GLUE_LOADER:
            raise InputError(f"{key}: Seq2SeqLMPool serves GLUE tasks only; write {{name: <GLUE task>, split: <split>}} instead of _target_: {spec['_target_']}")
        unknown = sorted(set(spec) - _ENTRY_KEYS)
        if unknown or "name" not in spec:
            problem = f"unknown key {unknown[0]!r}" if unknown else "no `name`"
            raise InputError(f"{key} has {problem}; an entry has name (a GLUE task) and split")
        name, split = spec["name"], spec.get("split")
    else:
        raise InputError(f"{key} is {spec!r}; give a GLUE task name, or {{name: <GLUE task>, split: <split>}}")
    task = GLUE_TASKS.get(str(name).removeprefix("glue-"))
    if task is None:
        raise InputError(f"{key}: {name!r} is not a GLUE task; use one of {', '.join(GLUE_TASKS)}")
    return task, split or ("train" if role == "train" else task.split)


def glue_task_data(
    task: GlueTask,
    split: str,
    *,
    labeled: bool,
    dataset_path: str,
    tokenizer: Any,
    decoder_start_token_id: int,
    num_examples: int | None,
    batch_size: int,
    seed: int,
) -> TaskData:
    """`num_examples` examples of the task's `split` (drawn with `seed`, batched by length), with
    labels where `labeled`; the head over the answer's first token."""
    dataset = load_glue_split(dataset_path, task, split)
    check_enough_examples(task.name, split, len(dataset), num_examples, "the method")
    drawn = draw_indices(len(dataset), num_examples, seed)
    examples = dict(zip(drawn, dataset.select(drawn).to_list()))  # only the drawn rows: MNLI's train split has 393k
    prompts = {row: task.render(example) for row, example in examples.items()}
    drawn = sorted(drawn, key=lambda row: len(prompts[row]))
    max_length = prompt_max_length(tokenizer)
    if task.is_regression:
        class_tokens, labels = None, {row: _first_token(tokenizer, task.target(example)) for row, example in examples.items()}
    else:
        class_tokens, labels = _class_tokens(tokenizer, task), {row: example["label"] for row, example in examples.items()}

    def make(indices: list[int]) -> Batch:
        tokens = tokenizer([prompts[i] for i in indices], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        decoder = torch.full((len(indices), 1), decoder_start_token_id, dtype=torch.long)
        given = torch.tensor([labels[i] for i in indices]) if labeled else None
        return Batch({"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "decoder_input_ids": decoder}, given)

    source = getattr(dataset, "_fingerprint", None) or dataset_path
    key = fingerprint("glue", task.name, split, labeled, source, tokenizer_fingerprint(tokenizer), max_length, decoder_start_token_id, drawn, batch_size)
    return TaskData(task.name, split, Batches(drawn, batch_size, make), FirstAnswerTokenHead(class_tokens), key)


def _first_token(tokenizer: Any, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise InputError(f"the tokenizer turns the answer {text!r} into no tokens; use the tokenizer the models were fine-tuned with")
    return ids[0]


def _class_tokens(tokenizer: Any, task: GlueTask) -> list[int]:
    """The first token of each label word; they must differ, or the classes cannot be told apart."""
    tokens = [_first_token(tokenizer, word) for word in task.label_words]
    if len(set(tokens)) < len(tokens):
        raise InputError(f"{task.name}: the label words {list(task.label_words)} begin with the same token under this tokenizer, so their first-token logits cannot tell the classes apart")
    return tokens
