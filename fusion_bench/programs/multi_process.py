"""Evaluation on several processes through Fabric (`fabric.devices=N fabric.strategy=ddp`).

The merge runs once, in the process the user started (rank 0), before any other process exists.
Only then does rank 0 launch the others: Fabric's ddp launcher runs the same command again in N-1
processes (LOCAL_RANK set, Hydra's run dir shared, no .hydra folder of their own). Each of them
builds the configs, skips preparing, merging, saving and reporting, and receives the merged model
from rank 0 (a broadcast); every process scores its share of each task's batches, and the task
pool adds up the sums and counts (fusion_bench.taskpool.sharding). Rank 0 alone writes.
"""

from typing import Any

from fusion_bench.utils.errors import InputError


def several_processes(fabric: Any) -> bool:
    return fabric is not None and fabric.world_size > 1


def is_evaluation_worker(fabric: Any) -> bool:
    """Whether this process was started by rank 0's launch to help evaluate (rank > 0)."""
    return several_processes(fabric) and fabric.global_rank > 0


def check_several_processes(fabric: Any, taskpool: Any) -> None:
    """Before any work: what evaluating on several processes needs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not getattr(taskpool, "shards_across_processes", False):
        raise InputError(
            f"fabric.devices gives {fabric.world_size} processes, but {type(taskpool).__name__} scores on one; use fabric.devices=1"
        )
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and not fabric.strategy.cluster_environment.creates_processes_externally:
        raise InputError(
            "a --multirun cannot start several processes per job here (each would run the whole sweep); "
            "run its jobs side by side instead (hydra/launcher=joblib, docs/sweeps.md) with fabric.devices=1"
        )


def share_merged_model(fabric: Any, merged: Any) -> Any:
    """Start the other processes (rank 0) or join them, then hand rank 0's merged model to all."""
    fabric.launch()
    return fabric.broadcast(merged, src=0)
