"""GLUE as text-to-text tasks: the Flan-style prompts, label words and splits of FusionBench.

The prompts are FusionBench's (fusion_bench.tasks.flan_t5_text_generation.glue_prompt_templates),
spelling included: the tanganke/flan-t5-*_glue-* models were fine-tuned on exactly these strings.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fusion_bench.utils.errors import InputError, first_line

_NO_LIMIT = 1_000_000  # tokenizers without a maximum length report a huge number instead


@dataclass(frozen=True)
class GlueTask:
    """One GLUE task: its prompt, and the answer expected for each example."""

    name: str  # the GLUE config name, as in load_dataset("glue", name)
    prompt: str  # str.format template over the dataset's columns
    label_words: tuple[str, ...] | None  # the answer for each class id; None: STS-B's score
    split: str = "validation"  # the split evaluated by default

    @property
    def is_regression(self) -> bool:
        return self.label_words is None

    def render(self, example: Mapping[str, Any]) -> str:
        return self.prompt.format(**example)

    def target(self, example: Mapping[str, Any]) -> str:
        """The expected answer: the label word, or the similarity score to one decimal."""
        if self.is_regression:
            return f"{example['label']:.1f}"
        return self.label_words[example["label"]]


GLUE_TASKS = {
    task.name: task
    for task in [
        GlueTask(
            "cola",
            "Indicate if the following sentence is grammatically correct or not: \"{sentence}\". Answere 'acceptable' or 'unacceptable'.",
            ("unacceptable", "acceptable"),
        ),
        GlueTask(
            "mnli",
            "Does the premise: '{premise}' logically imply, contradict, or is neutral to the hypothesis: '{hypothesis}'? "
            "Answere with 'entailment', 'contradiction', or 'neutral'.",
            ("entailment", "neutral", "contradiction"),
            split="validation_matched",
        ),
        GlueTask(
            "mrpc",
            "Are the following sentences '{sentence1}' and '{sentence2}' conveying the same meaning? Answere with 'yes' or 'no'.",
            ("no", "yes"),
        ),
        GlueTask(
            "qnli",
            "Given the context: '{sentence}', does the question '{question}' have an answer based on the information provided? "
            "Answer with 'yes' or 'no'.",
            ("yes", "no"),
        ),
        GlueTask(
            "qqp",
            "Do the questions '{question1}' and '{question2}' have the same intent? Answere with 'yes' or 'no'.",
            ("no", "yes"),
        ),
        GlueTask(
            "rte",
            "Does the text: '{sentence1}' entail that '{sentence2}' is true? Provide 'yes' or 'no'.",
            ("yes", "no"),
        ),
        GlueTask(
            "sst2",
            "Given the sentence '{sentence}', determine the sentiment. Is it positive or negative?",
            ("negative", "positive"),
        ),
        GlueTask(
            "stsb",
            "Consider the sentences '{sentence1}' and '{sentence2}'. On a scale from 1 (completely different) to 5 "
            "(completely similar), rate the similarity.",
            None,
        ),
    ]
}


def load_glue_split(dataset_path: str, task: GlueTask, split: str):
    """The `split` of `task` as datasets.load_dataset reads it from `dataset_path` (a hub id, or a
    local folder with the same configs and splits)."""
    from datasets import load_dataset

    try:
        return load_dataset(dataset_path, task.name, split=split)
    except Exception as error:
        raise InputError(
            f"cannot load GLUE task {task.name!r} (split {split!r}) from dataset_path={dataset_path!r}: "
            f"{type(error).__name__}: {first_line(error)}"
        ) from error


def prompt_max_length(tokenizer) -> int:
    """Prompts are truncated as FusionBench truncates them: to the tokenizer's maximum length."""
    return tokenizer.model_max_length if tokenizer.model_max_length < _NO_LIMIT else 512
