"""The run report: one JSON document per run, in a versioned schema, and its table for people."""

import json
import os
import platform
import resource
from collections.abc import Mapping
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from fusion_bench.cache import write_atomically

SCHEMA = "fusion_bench.report/1"
_PACKAGES = ("fusion_bench", "torch", "transformers", "hydra-core", "safetensors", "lightning", "peft", "datasets")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


def peak_memory() -> dict[str, int | None]:
    """Peak resident memory of this process (Linux reports kB), and of CUDA if used."""
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cuda_bytes": cuda}


def average_metrics(tasks: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Each metric's unweighted mean over the tasks that report it (the papers' "Avg.")."""
    names = dict.fromkeys(name for metrics in tasks.values() for name in metrics)
    return {name: sum(m[name] for m in tasks.values() if name in m) / sum(name in m for m in tasks.values()) for name in names}


def build_report(
    *,
    config: Mapping[str, Any],
    models: Mapping[str, str],
    tasks: Mapping[str, Mapping[str, float]],
    model_info: Mapping[str, int],
    merge_seconds: float,
    eval_seconds: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config),
        "models": dict(models),
        "versions": package_versions(),
        "tasks": {task: dict(metrics) for task, metrics in tasks.items()},
        "average": average_metrics(tasks),
        "model_info": dict(model_info),
        "timing": {"merge_seconds": merge_seconds, "eval_seconds": eval_seconds},
        "peak_memory": peak_memory(),
        **(extra or {}),
    }


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically (a temporary file renamed into place)."""
    return write_atomically(Path(path), lambda temporary: temporary.write_text(json.dumps(report, indent=2) + "\n"))


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    report = json.loads(Path(path).read_text())
    if report.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a fusion_bench report (schema {report.get('schema')!r}, expected {SCHEMA!r})")
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """Tasks as rows and metrics as columns, the average last, then time and memory."""
    tasks, average = report["tasks"], report["average"]
    metrics = list(average)
    lines = []
    if tasks:
        rows = [[task] + [_cell(values.get(m)) for m in metrics] for task, values in tasks.items()]
        rows.append(["average"] + [_cell(average[m]) for m in metrics])
        header = ["task"] + metrics
        widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    info, timing = report["model_info"], report["timing"]
    lines.append(
        f"merged model: {info['parameters']:,} parameters | merge {timing['merge_seconds']:.1f} s | "
        f"evaluation {timing['eval_seconds']:.1f} s | peak RSS {report['peak_memory']['rss_bytes'] / 2**30:.2f} GiB"
    )
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
