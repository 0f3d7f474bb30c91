"""A task's batches shared among the processes of a multi-process Fabric (fabric.devices=N).

Process r scores batches r, r + N, r + 2N, ...: whole batches, the same ones a single process
makes, so each batch's numbers are the single process's; the task's sums and counts are then added
over the processes, or per-example results (generated answers) gathered. One process (or no
Fabric): every batch, nothing to add.
"""

from typing import Any, TypeVar

import torch
from torch import Tensor


def batch_share(num_batches: int, fabric: Any) -> range:
    """The batches this process scores."""
    if fabric is None or fabric.world_size == 1:
        return range(num_batches)
    return range(fabric.global_rank, num_batches, fabric.world_size)


def summed_over_processes(values: list[float], fabric: Any) -> list[float]:
    """`values` (this process's sums and counts) added over the processes, in float64."""
    if fabric is None or fabric.world_size == 1:
        return values
    total: Tensor = fabric.all_reduce(torch.tensor(values, dtype=torch.float64, device=fabric.device), reduce_op="sum")
    return total.tolist()


Value = TypeVar("Value")


def gathered_over_processes(values: list[Value | None], fabric: Any) -> list[Value | None]:
    """Per-example values, each process's list filled in for its own batches (None elsewhere),
    completed from every process: each process gets the whole list."""
    if fabric is None or fabric.world_size == 1:
        return values
    import torch.distributed

    lists: list[list[Value | None] | None] = [None] * fabric.world_size
    torch.distributed.all_gather_object(lists, values)
    return [next((given[i] for given in lists if given[i] is not None), None) for i in range(len(values))]
