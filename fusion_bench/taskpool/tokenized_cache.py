"""Tokenized prompts, cached on disk under the texts and the tokenizer that made them.

Tokenizing GLUE's validation sets takes longer than generating with a small model, and the result
depends only on the prompts (so on the dataset and the template) and the tokenizer: it is stored
once under ~/.cache/fusion_bench/tokenized (or $FUSION_BENCH_CACHE/tokenized), named by a hash of
exactly those, and read back on every later run.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from fusion_bench.utils.cache import cache_dir as fusion_cache_dir
from fusion_bench.utils.cache import write_atomically

_FORMAT = 1  # bump when the stored layout changes


def tokenizer_fingerprint(tokenizer) -> str:
    """What makes a tokenizer's output: its full serialisation where it has one (fast tokenizers),
    else its class, vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        described = backend.to_str()
    else:
        described = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens])
    return hashlib.sha256(described.encode()).hexdigest()


class TokenizedTexts:
    """Token ids of many texts, stored flat: text i is ids[offsets[i]:offsets[i + 1]]."""

    def __init__(self, ids: Tensor, offsets: Tensor):
        self.ids, self.offsets = ids, offsets

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, index: int) -> Tensor:
        return self.ids[self.offsets[index] : self.offsets[index + 1]]

    def lengths(self) -> Tensor:
        return self.offsets.diff()


def tokenize_cached(tokenizer, texts: Sequence[str], *, max_length: int, cache_dir: Path | None = None) -> TokenizedTexts:
    """tokenizer(texts, truncation=True, max_length=max_length)'s input ids, from the cache if there."""
    key = hashlib.sha256()
    key.update(json.dumps([_FORMAT, tokenizer_fingerprint(tokenizer), max_length, len(texts)]).encode())
    for text in texts:
        key.update(text.encode())
        key.update(b"\0")
    path = (cache_dir or fusion_cache_dir("tokenized")) / f"{key.hexdigest()}.safetensors"
    if path.is_file():
        stored = load_file(path)
        return TokenizedTexts(stored["ids"], stored["offsets"])
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    lengths = torch.tensor([0] + [len(ids) for ids in encoded])
    tokenized = TokenizedTexts(torch.tensor([i for ids in encoded for i in ids], dtype=torch.int32), lengths.cumsum(0))
    write_atomically(path, lambda temporary: save_file({"ids": tokenized.ids, "offsets": tokenized.offsets}, str(temporary)))
    return tokenized

