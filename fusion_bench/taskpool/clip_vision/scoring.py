"""Accuracy and loss of an image classifier on one task's test images, batched, shared among
processes: what both CLIP task pools (Hugging Face and open_clip towers) do per task."""

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from fusion_bench.taskpool.clip_vision.images import ImageBatches
from fusion_bench.taskpool.sharding import batch_share, summed_over_processes
from fusion_bench.utils.progress import progress_bar

log = logging.getLogger(__name__)


@torch.no_grad()
def score_images(
    task: str,
    dataset: Any,
    indices: Sequence[int],
    transform: Any,
    logits_of: Callable[[Tensor], Tensor],
    dataloader_kwargs: Mapping[str, Any],
    device: torch.device,
    fabric: Any = None,
) -> dict[str, float]:
    """{"accuracy", "loss"} of logits_of(normalised images) over dataset[indices].

    transform prepares each batch in the DataLoader's workers (ImageBatches) and normalises it on
    `device`; each process scores its share of the batches and the counts are summed over them.
    """
    start = time.perf_counter()
    batches = ImageBatches(dataset, indices, dataloader_kwargs["batch_size"], transform)
    correct = torch.zeros((), dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    share = batch_share(len(batches), fabric)
    workers = min(dataloader_kwargs["num_workers"], len(share))  # no idle workers for small tasks
    loader = DataLoader(
        batches,
        batch_size=None,  # each item is a whole batch
        sampler=share,
        num_workers=workers,
        pin_memory=dataloader_kwargs["pin_memory"] and device.type == "cuda",
        prefetch_factor=dataloader_kwargs["prefetch_factor"] if workers else None,
    )
    with progress_bar(total=sum(len(batches.batch_indices(i)) for i in share), desc=task, unit="img") as bar:
        for images, labels in loader:
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = logits_of(transform.normalize(images))
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(dim=-1) == labels).sum()
            bar.update(len(labels))
    correct_total, loss_total = summed_over_processes([correct.item(), loss_sum.item()], fabric)
    samples = len(batches.indices)
    metrics = {"accuracy": correct_total / samples, "loss": loss_total / samples}
    log.info("%s: accuracy %.4f, loss %.4f (%d images, %.1f s)", task, metrics["accuracy"], metrics["loss"], samples, time.perf_counter() - start)
    return metrics
