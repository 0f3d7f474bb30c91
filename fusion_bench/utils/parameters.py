"""Parameter counts, as FusionBench's `fusion_bench.utils.parameters` gives them."""

import torch
from torch import nn

_SUFFIXES = ("", "K", "M", "B", "T", "P")


@torch.no_grad()
def count_parameters(module: nn.Module, non_zero_only: bool = False) -> tuple[int, int]:
    """(trainable, all): entries of the module's parameters, a tied parameter counting once; the
    trainable ones have requires_grad. non_zero_only: count only the entries that are not 0."""
    trainable = total = 0
    for param in module.parameters():
        count = int(torch.count_nonzero(param)) if non_zero_only else param.numel()
        total += count
        if param.requires_grad:
            trainable += count
    return trainable, total


def human_readable(num: int) -> str:
    """An int below 1000 as it is; anything else divided by 1000 until below 1000 in magnitude,
    with 2 decimals and K, M, B, T or P: 1500 → '1.50K', 151277313 → '151.28M'."""
    if isinstance(num, int) and num < 1000:
        return str(num)
    magnitude = 0
    while abs(num) >= 1000:
        num /= 1000.0
        magnitude += 1
    return f"{float(num):.2f}{_SUFFIXES[magnitude]}"


def model_summary(model: nn.Module) -> dict:
    """{"trainable_params", "all_params", "trainable_percentage"}, the last a fraction of 1 (0.0 for
    a model without parameters): what FusionBench's get_model_summary reports as "model_info"."""
    trainable, total = count_parameters(model)
    return {"trainable_params": trainable, "all_params": total, "trainable_percentage": trainable / total if total else 0.0}
