"""Tiny stand-ins for Flan-T5, its LoRA adapters, its tokenizer and GLUE, built on disk offline.

The T5 has Flan-T5's layout: gated-GELU feed-forward, embeddings tied under three names
(`shared`, `encoder.embed_tokens`, `decoder.embed_tokens`) and an lm_head of its own. The
tokenizer (the `tokenizers` library) knows the GLUE label words and STS-B's scores as whole
words. The GLUE folder has the hub dataset's configs, splits and columns, in parquet files that
datasets.load_dataset reads from the folder.
"""

import atexit
import functools
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fusion_bench.tasks.glue import GLUE_TASKS

_ROOT = Path(tempfile.mkdtemp(prefix="fusion_bench_test_t5_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
# datasets caches what it reads under HF_DATASETS_CACHE, fixed when it is imported: keep the
# tests' data out of the user's cache
os.environ.setdefault("HF_DATASETS_CACHE", str(_ROOT / "datasets_cache"))

LORA_TASKS = ("cola", "rte", "stsb")  # glue-<task>: LoRA adapters; the last targets more modules
SPECIAL = ["<pad>", "</s>", "<unk>"]
WORDS = ["the", "cat", "dog", "sat", "ran", "a", "mat", "is", "not", "big", "why", "how", "sun", "rain"]
SCORES = [f"{i / 10:.1f}" for i in range(51)]
VOCAB = SPECIAL + sorted({w for task in GLUE_TASKS.values() for w in task.label_words or ()}) + WORDS + SCORES


def write_tokenizer(folder: Path) -> Path:
    """A word-level fast tokenizer: pad 0, </s> 1 (appended to every text), unk 2, as T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=40)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_t5(seed: int):
    """A T5 shaped like Flan-T5, with an lm_head untied from the embeddings (transformers 5 ties
    them when it builds a T5; a checkpoint with its own lm_head unties them on loading)."""
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(VOCAB), d_model=16, d_kv=4, d_ff=24, num_layers=2, num_decoder_layers=2, num_heads=2,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    model = T5ForConditionalGeneration(config)
    model.lm_head.weight = torch.nn.Parameter(torch.randn(len(VOCAB), 16))
    return model.eval()


def finetuned_t5(pretrained, seed: int, scale: float = 0.02):
    """The model with every tensor moved a little (the embeddings too), as a full fine-tune."""
    model = tiny_t5(0)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for target, source in zip(model.parameters(), pretrained.parameters()):
            target.copy_(source + scale * torch.randn(source.shape, generator=generator))
    return model


def write_lora_adapter(base_folder: Path, folder: Path, seed: int, target_modules=("q", "v")) -> Path:
    """A peft LoRA adapter (r=4, α=8) of the base model, with random A and B (B starts at zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    model = get_peft_model(
        AutoModelForSeq2SeqLM.from_pretrained(base_folder),
        LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules), lora_dropout=0.0, task_type="SEQ_2_SEQ_LM"),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(folder)
    return folder


def write_t5_pool(root: Path) -> Path:
    """root/pretrained, root/glue-<task> (full fine-tunes) and root/lora-<task> (adapters)."""
    pretrained = tiny_t5(0)
    pretrained.save_pretrained(root / "pretrained")
    write_tokenizer(root / "pretrained")
    for i, task in enumerate(LORA_TASKS):
        finetuned_t5(pretrained, seed=i + 1).save_pretrained(root / f"glue-{task}")
        targets = ("q", "v", "wo") if i == len(LORA_TASKS) - 1 else ("q", "v")
        write_lora_adapter(root / "pretrained", root / f"lora-{task}", seed=i + 1, target_modules=targets)
    return root


def glue_rows(task: str, count: int, seed: int) -> list[dict]:
    """GLUE-shaped examples with the task's columns: sentences of varied lengths, the first of
    index + 1 words, so no two prompts are the same."""
    generator = torch.Generator().manual_seed(seed)
    columns = {
        "cola": ["sentence"], "sst2": ["sentence"], "mnli": ["premise", "hypothesis"], "mrpc": ["sentence1", "sentence2"],
        "rte": ["sentence1", "sentence2"], "stsb": ["sentence1", "sentence2"], "qnli": ["question", "sentence"],
        "qqp": ["question1", "question2"],
    }[task]  # fmt: skip
    rows = []
    for index in range(count):
        row = {}
        for position, column in enumerate(columns):
            length = index + 1 if position == 0 else int(torch.randint(1, 12, (1,), generator=generator))
            row[column] = " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (length,), generator=generator))
        labels = GLUE_TASKS[task].label_words
        row["label"] = round(5 * float(torch.rand(1, generator=generator)), 3) if labels is None else index % len(labels)
        row["idx"] = index
        rows.append(row)
    return rows


def write_glue(root: Path, count: int = 10) -> Path:
    """A local GLUE: root/<task>/<split>.parquet for every task, its train split and the split the
    task pool scores, declared as configs in README.md, as the hub dataset declares them."""
    from datasets import Dataset

    configs = []
    for seed, (task, spec) in enumerate(GLUE_TASKS.items()):
        (root / task).mkdir(parents=True, exist_ok=True)
        files = []
        for split, rows in ((spec.split, glue_rows(task, count, seed)), ("train", glue_rows(task, count, 100 + seed))):
            Dataset.from_list(rows).to_parquet(root / task / f"{split}.parquet")
            files.append(f"  - split: {split}\n    path: {task}/{split}.parquet")
        configs.append(f"- config_name: {task}\n  data_files:\n" + "\n".join(files))
    (root / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n")
    return root


@functools.cache
def t5_pool_dir() -> Path:
    """The pool of write_t5_pool, built once per test session (test modules share it)."""
    return write_t5_pool(_ROOT / "pool")


@functools.cache
def glue_dir() -> Path:
    """The GLUE of write_glue, built once per test session."""
    return write_glue(_ROOT / "glue")
