"""The run report: one JSON document per run, laid out as FusionBench lays out its reports.

    {"sun397": {"accuracy": 0.65, "loss": 1.2}, ...,       # one entry per task, at the top
     "average": {"accuracy": ..., "loss": ...},             # over the tasks (absent without tasks)
     "model_info": {"trainable_params", "all_params", "trainable_percentage", "size_bytes"},
     "_fusion_bench_": {"schema", "status", "error", "tasks", "overrides", "config", "models",
                        "versions", "timing", "peak_memory", "created"}}

Scripts written for FusionBench read `report["mnist"]["accuracy"]` and `report["average"]` as they
always did. fusion_bench's own record sits under `_fusion_bench_`: FusionBench keeps names of the
form `_name_` for roles (`_pretrained_`), never tasks, so no task can collide with it. Reports of
schema 1 (tasks under "tasks") are still read, converted to this layout.
"""

import json
import os
import platform
import resource
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from fusion_bench.utils.cache import write_atomically
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.model_saving import check_writable

SCHEMA = "fusion_bench.report/2"
OLD_SCHEMAS = ("fusion_bench.report/1",)
META = "_fusion_bench_"
RESERVED = ("average", "model_info", META)  # top-level keys that are not tasks
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
    names = dict.fromkeys(name for metrics in tasks.values() for name in metrics if _is_number(metrics[name]))
    return {name: sum(m[name] for m in tasks.values() if name in m) / sum(name in m for m in tasks.values()) for name in names}


def split_results(results: Mapping[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, float] | None, dict[str, Any] | None]:
    """(tasks, average, model_info) of what a task pool's evaluate returned, in FusionBench's layout:
    every mapping beside "average" and "model_info" is a task's metrics."""
    tasks = {name: dict(value) for name, value in results.items() if name not in RESERVED and isinstance(value, Mapping)}
    average, model_info = results.get("average"), results.get("model_info")
    return tasks, (dict(average) if isinstance(average, Mapping) else None), (dict(model_info) if isinstance(model_info, Mapping) else None)


def build_report(
    *,
    tasks: Mapping[str, Mapping[str, Any]],
    model_info: Mapping[str, Any] | None,
    config: Mapping[str, Any],
    models: Mapping[str, str],
    timing: Mapping[str, float],
    average: Mapping[str, float] | None = None,
    overrides: Sequence[str] = (),
    error: BaseException | None = None,
    per_task_models: Sequence[str] | None = None,
    method_outputs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A completed run's report, or (with `error`) a failed run's: its settings and why it failed.

    per_task_models: the models' names where the method made one model per task (each task then
    scored with its own model); the report records them, and model_info describes one of them.
    method_outputs: what the method learnt that a reader needs (AdaMerging's λ), JSON-able.
    """
    clashing = [task for task in tasks if task in RESERVED]
    if clashing:
        raise InputError(f"a task is named {clashing[0]!r}, a key the report keeps for itself; rename the task")
    report: dict[str, Any] = {task: dict(metrics) for task, metrics in tasks.items()}
    if tasks:
        report["average"] = dict(average) if average is not None else average_metrics(tasks)
    if model_info is not None:
        report["model_info"] = dict(model_info)
    report[META] = {
        "schema": SCHEMA,
        "status": "failed" if error is not None else "completed",
        "error": None if error is None else {"type": type(error).__name__, "message": str(error)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tasks": list(tasks),
        "per_task_models": list(per_task_models) if per_task_models is not None else None,
        "method_outputs": dict(method_outputs or {}),
        "overrides": list(overrides),
        "config": dict(config),
        "models": dict(models),
        "versions": package_versions(),
        "timing": dict(timing),
        "peak_memory": peak_memory(),
    }
    return report


def meta(report: Mapping[str, Any]) -> dict[str, Any]:
    """fusion_bench's record of the run: config, models, timing, status, ..."""
    return report[META]


def task_metrics(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{task: metrics} of a report, in the order the task pool scored them."""
    return {task: report[task] for task in report[META]["tasks"]}


def failed(report: Mapping[str, Any]) -> bool:
    return report[META]["status"] == "failed"


def check_report_path(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """Before any work: the report can be written at `path` and replaces nothing it should not."""
    target = Path(os.path.abspath(Path(path).expanduser()))
    if target.is_dir():
        raise InputError(f"report_save_path={path} is a folder; give a file path, e.g. report_save_path={Path(path) / 'report.json'}")
    if target.exists() or target.is_symlink():
        if not overwrite:
            raise InputError(f"report_save_path={path} exists; to replace it add report_save_overwrite=true, or give another path")
        try:
            read_report(target)
        except (OSError, ValueError):
            raise InputError(f"report_save_path={path} is not a fusion_bench report; fusion_bench replaces only its own reports; give another path") from None
    check_writable(target, "report_save_path")
    return target


def write_report(report: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write the report as JSON, atomically (a temporary file renamed into place); a full disk or
    another OSError is an InputError and leaves any earlier file as it was."""
    text = json.dumps(report, indent=2, default=str) + "\n"
    try:
        return write_atomically(Path(path), lambda temporary: temporary.write_text(text))
    except OSError as error:
        raise InputError(f"writing the report to {path} failed ({error.strerror or error}); free some space or choose another report_save_path") from None


def read_report(path: str | os.PathLike) -> dict[str, Any]:
    """A report of this schema, or of an older one converted to it."""
    report = json.loads(Path(path).read_text())
    schema = report.get(META, {}).get("schema") if isinstance(report.get(META), dict) else report.get("schema")
    if schema == SCHEMA:
        return report
    if schema in OLD_SCHEMAS:
        return _from_schema_1(report)
    raise ValueError(f"{path} is not a fusion_bench report (schema {schema!r}, expected {SCHEMA!r})")


def _from_schema_1(old: Mapping[str, Any]) -> dict[str, Any]:
    """Schema 1 kept tasks under "tasks" and our record at the top; model_info had our two counts."""
    info = old.get("model_info", {})
    timing = dict(old.get("timing", {}))
    report = build_report(
        tasks=old.get("tasks", {}),
        model_info={"trainable_params": info.get("parameters"), "all_params": info.get("parameters"), "trainable_percentage": 1.0, "size_bytes": info.get("size_bytes")},
        config=old.get("config", {}),
        models=old.get("models", {}),
        timing=timing,
        average=old.get("average"),
    )
    report[META].update(created=old.get("created"), versions=old.get("versions", {}), peak_memory=old.get("peak_memory", {}), upgraded_from=old.get("schema"))
    return report


def format_table(report: Mapping[str, Any]) -> str:
    """Tasks as rows and metrics as columns, the average last, then size, times and memory."""
    tasks, average = task_metrics(report), report.get("average", {})
    metrics = [name for name in average]
    lines = []
    if tasks:
        rows = [[task] + [_cell(values.get(m)) for m in metrics] for task, values in tasks.items()]
        rows.append(["average"] + [_cell(average[m]) for m in metrics])
        header = ["task"] + metrics
        widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        lines.append("  ".join("-" * w for w in widths))
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows]
    record = meta(report)
    timing = record["timing"]
    phases = " | ".join(f"{name.removesuffix('_seconds')} {seconds:.1f} s" for name, seconds in timing.items())
    parameters = report.get("model_info", {}).get("all_params")
    size = f"merged model: {parameters:,} parameters | " if parameters is not None else ""
    lines.append(f"{size}{phases} | peak RSS {record['peak_memory']['rss_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return f"{value:.4f}" if _is_number(value) else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
