"""Tiny stand-ins for causal language models (Llama, Mistral, Qwen2 layouts) and their tokenizer,
built on disk offline.

Each family's model has its real layout (rotary attention, gated MLP, RMSNorm; Qwen2's q/k/v
biases), a few dozen thousand parameters, and a word-level tokenizer that knows a small English
vocabulary. Task models are the base with every tensor moved a little, as full fine-tunes are.
`write_causal_lm` saves in bf16 by default and shards when asked (`model.safetensors.index.json`).

The tokenizer is also written on its own, in `<pool>/tokenizer` (no config.json beside it): in a
Qwen2 folder transformers 5's AutoTokenizer reads the file as a Qwen2Tokenizer (byte-level BPE)
and splits the words differently, so tests that need exact token ids use that folder.
"""

import atexit
import shutil
import tempfile
from pathlib import Path

import torch

_ROOT = Path(tempfile.mkdtemp(prefix="fusion_bench_test_llm_"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = (
    "the a cat dog sat ran on mat is not big small why how sun rain and it was of to in that he she they "
    "we you i this day night red blue green tree house water fire one two three good bad yes no"
).split()
VOCAB = SPECIAL + WORDS
FAMILIES = ("llama", "mistral", "qwen2")


def write_tokenizer(folder: Path) -> Path:
    """A word-level fast tokenizer: pad 0, <s> 1 (prepended to every text), </s> 2, unk 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", model_max_length=64
    )
    tokenizer.save_pretrained(folder)
    return folder


def tiny_causal_lm(seed: int, family: str = "llama", vocab_size: int = len(VOCAB), tie_word_embeddings: bool = False):
    """A randomly initialised causal LM of the family's layout: hidden 16, 2 layers, 4 heads (2 KV)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    config = config_class(
        vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie_word_embeddings,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return model_class(config).eval()


def finetuned_copy(model, seed: int, scale: float = 0.02):
    """A copy of `model` with every tensor moved by `scale` · N(0, 1) noise, as a full fine-tune."""
    import copy

    task_model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in task_model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return task_model


def write_causal_lm(model, folder: Path, dtype: torch.dtype = torch.bfloat16, max_shard_size: str | None = None) -> Path:
    """Save `model` (cast to `dtype`) with the tokenizer, as one file or sharded."""
    model = model.to(dtype)
    model.config.dtype = dtype
    if max_shard_size is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    write_tokenizer(folder)
    return folder


def write_causal_lm_pool(
    root: Path | None = None,
    family: str = "llama",
    tasks=("task_a", "task_b", "task_c"),
    dtype: torch.dtype = torch.bfloat16,
    max_shard_size: str | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """`root/base`, one fine-tuned copy per task under `root/<task>` and `root/tokenizer`; returns root."""
    root = Path(tempfile.mkdtemp(dir=_ROOT)) if root is None else Path(root)
    write_tokenizer(root / "tokenizer")
    base = tiny_causal_lm(0, family, tie_word_embeddings=tie_word_embeddings)
    write_causal_lm(base, root / "base", dtype, max_shard_size)
    for index, task in enumerate(tasks, start=1):
        write_causal_lm(finetuned_copy(base, seed=index), root / task, dtype, max_shard_size)
    return root
