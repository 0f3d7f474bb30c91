"""Greedy generation over many prompts, in batches of similar length.

Padding every prompt to the tokenizer's maximum (512 for T5) makes the encoder do several times
the work the prompts need. Sorting the prompts by length and padding each batch only to its
longest keeps the padding small; the answers are returned in the prompts' order.
"""

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch
from torch import nn

from fusion_bench.taskpool.tokenized_cache import TokenizedTexts
from fusion_bench.utils.progress import progress_bar


@torch.no_grad()
def generate_answers(
    model: nn.Module,
    tokenizer,
    prompts: TokenizedTexts,
    *,
    batch_size: int,
    max_new_tokens: int,
    device: torch.device,
    autocast=None,
    desc: str = "generating",
    share: Callable[[int], Sequence[int]] = range,
) -> list[str | None]:
    """The decoded greedy answer (special tokens skipped) to each prompt, longest batches first
    (so running out of memory shows at once). `autocast` is a context manager factory for
    mixed precision (e.g. Fabric's), or None. share(number of batches) gives the batches to run
    (fusion_bench.taskpool.sharding); the prompts of the others get None."""
    lengths = prompts.lengths()
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    batches = [batches[i] for i in share(len(batches))]
    answers: list[str | None] = [None] * len(prompts)
    with progress_bar(total=sum(map(len, batches)), desc=desc, unit="example") as progress:
        for batch in batches:
            width = int(lengths[batch[0]])
            input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, index in enumerate(batch):
                ids = prompts[index]
                input_ids[row, : ids.numel()] = ids
                attention_mask[row, : ids.numel()] = 1
            with autocast() if autocast is not None else nullcontext():
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                )
            for index, answer in zip(batch, tokenizer.batch_decode(output, skip_special_tokens=True)):
                answers[index] = answer
            progress.update(len(batch))
    return answers
