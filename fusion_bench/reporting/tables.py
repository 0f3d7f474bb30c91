"""Tables from many run reports: rows are methods with their hyper-parameters, columns the tasks
and their average; Markdown, CSV or LaTeX.

Runs of `method=dummy` are the baselines: without model_name the pretrained model ("zero-shot"),
with model_name=t the fine-tuned model t scored on task t ("individual"; one report per task, one
row together). Normalised accuracy divides each task's score by the individual model's.
"""

import csv
import inspect
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hydra.utils import get_object

from fusion_bench.reporting.report import failed, meta, read_report, task_metrics
from fusion_bench.utils.errors import InputError, first_line

REPORT_NAMES = ("report.json", "program_report.json")  # ours, and FusionBench's default name

SHORT_NAMES = {
    "TiesMergingAlgorithm": "TIES",
    "TaskArithmeticAlgorithm": "Task Arithmetic",
    "SimpleAverageAlgorithm": "Simple Average",
    "WeightedAverageAlgorithm": "Weighted Average",
    "MagMaxAlgorithm": "MagMax",
    "TaskSingularVectorMerging": "TSV-M",
    "IsotropicMergingInCommonSubspace": "Iso-C",
    "ISO_C_Merge": "Iso-C",
    "IsotropicMergingInCommonAndTaskSubspace": "Iso-CTS",
    "ISO_CTS_Merge": "Iso-CTS",
    "WUDIMerging": "WUDI",
    "DareSimpleAverage": "DARE + Simple Average",
    "DareTaskArithmetic": "DARE + Task Arithmetic",
    "DareTiesMerging": "DARE + TIES",
    "TallMaskTaskArithmeticAlgorithm": "TALL masks (per task)",
    "ConsensusTaskArithmetic": "Consensus TA",
    "ConsensusTiesMerging": "Consensus TIES",
    "ModelBreadcrumbs": "Breadcrumbs",
    "FisherMergingAlgorithm": "Fisher merging",
    "FisherMergingForCLIPVisionModel": "Fisher merging",
    "RegMeanAlgorithm": "RegMean",
    "RegMeanAlgorithmForCLIP": "RegMean",
    "RegMeanAlgorithmPlusPlus": "RegMean++",
    "RegMeanAlgorithmForCLIPPlusPlus": "RegMean++",
    "TaskWiseAdaMergingAlgorithm": "AdaMerging (task-wise)",
    "CLIPTaskWiseAdaMergingAlgorithm": "AdaMerging (task-wise)",
    "LayerWiseAdaMergingAlgorithm": "AdaMerging (layer-wise)",
    "CLIPLayerWiseAdaMergingAlgorithm": "AdaMerging (layer-wise)",
}
# Keys that say where outputs go or how work is spread, not what is computed: rows never show them.
NOT_RESULTS = ("fast_dev_run", "save_merging_weights", "num_workers", "devices", "cache_dir")
# The key a method scales its merged task vector by, the λ that sweeps choose (TSV-M calls it alpha).
LAMBDA_KEYS = ("scaling_factor", "alpha")
ZERO_SHOT, INDIVIDUAL = "Pretrained (zero-shot)", "Fine-tuned (individual)"


@dataclass
class Row:
    """One method's scores: `group` names it without λ, so rows differing in λ share a group."""

    group: str
    scaling_factor: float | None
    split: str
    n_models: int
    scores: dict[str, float] = field(default_factory=dict)
    best: bool = False  # the best λ of its group on this split
    chosen_on: str | None = None  # the split its λ was chosen on, when that was another split

    @property
    def label(self) -> str:
        if self.scaling_factor is None:
            return self.group
        return f"{self.group}, λ={self.scaling_factor:g}" + (f" (chosen on {self.chosen_on})" if self.chosen_on else "")

    @property
    def average(self) -> float:
        return sum(self.scores.values()) / len(self.scores)


def find_reports(paths: Iterable[str | Path]) -> dict[Path, dict]:
    """{file: report} for every report under the given directories (multirun sweeps included), or
    the given files; failed runs' reports included."""
    files = []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"{path} does not exist; point at a run or sweep directory")
        files += sorted(file for name in REPORT_NAMES for file in path.rglob(name)) if path.is_dir() else [path]
    if not files:
        raise InputError(f"no report.json under {', '.join(map(str, paths))}; point at a run or sweep directory")
    reports = {}
    for file in files:
        try:
            reports[file] = read_report(file)
        except (OSError, ValueError) as error:
            raise InputError(f"cannot read {file}: {first_line(error)}") from None
    return reports


def rows_from_reports(reports: Sequence[dict], *, metric: str = "accuracy", normalized: bool = False) -> list[Row]:
    """One row per method setting and split, from the completed runs (failed ones have no scores)."""
    rows: dict[tuple, Row] = {}
    individual: dict[str, Row] = {}
    for report in (r for r in reports if not failed(r)):
        method, split = meta(report)["config"]["method"], split_of(report)
        n_models = sum(1 for name in meta(report)["models"] if not (name.startswith("_") and name.endswith("_")))
        scores = {task: values[metric] for task, values in task_metrics(report).items() if metric in values}
        if method["_target_"].endswith("DummyAlgorithm") and method.get("model_name"):
            row = individual.setdefault(split, Row(INDIVIDUAL, None, split, 1))
            row.scores.update({task: score for task, score in scores.items() if is_model_of_task(method["model_name"], task)})
            continue
        group, scaling_factor = describe_method(method)
        key = (group, scaling_factor, split, tuple(sorted(scores)))
        if key in rows:  # the same setting on another subset of the same size: average its tasks
            rows[key].scores.update(scores)
        else:
            rows[key] = Row(group, scaling_factor, split, n_models, scores)
    # the papers' order: pretrained, fine-tuned, then each method (in the order first met) by λ
    groups = list(dict.fromkeys(row.group for row in rows.values()))
    methods = sorted((row for row in rows.values() if row.group != ZERO_SHOT), key=lambda row: (groups.index(row.group), row.split, row.n_models, row.scaling_factor or 0.0))
    result = [row for row in rows.values() if row.group == ZERO_SHOT] + list(individual.values()) + methods
    if normalized:
        baselines = {split: dict(row.scores) for split, row in individual.items()}  # before they become 1s
        for row in result:
            baseline = baselines.get(row.split, {})
            missing = [task for task in row.scores if task not in baseline]
            if missing:
                split = "" if row.split == "test" else f" taskpool.split={row.split}"
                raise InputError(f"normalised scores need the individual model's {row.split} score on {missing[0]!r}; run method=dummy method.model_name={missing[0]}{split}")
            row.scores = {task: score / baseline[task] for task, score in row.scores.items()}
    return result


def is_model_of_task(model_name: str, task: str) -> bool:
    """The pools name a task's model after the task, alone or as a suffix: `reuters8`, or
    `glue-cola` (FusionBench's Flan-T5 names) for the GLUE task `cola`."""
    return model_name == task or model_name.endswith(("-" + task, "_" + task))


def split_of(report: dict) -> str:
    """The split a run was scored on (test for task pools without one)."""
    return (meta(report)["config"].get("taskpool") or {}).get("split", "test")


def describe_method(method: dict) -> tuple[str, float | None]:
    """(name with the hyper-parameters that differ from its defaults, λ) of a method config."""
    class_name = method["_target_"].rsplit(".", 1)[-1]
    if class_name == "DummyAlgorithm":
        return ZERO_SHOT, None
    try:
        target = get_object(method["_target_"])
        # a factory that picks its class by a key (adamerging/clip's `name`, as FusionBench's) names that class
        selector = "name" if method.get("name") in getattr(target, "selects", {}) else None
        target = target.selects[method["name"]] if selector else target
        class_name = target.__name__
        defaults = {name: p.default for name, p in inspect.signature(target).parameters.items()}
    except Exception:  # a method not installed here: show every parameter
        defaults, selector = {}, None
    scale = next((key for key in LAMBDA_KEYS if isinstance(method.get(key), (int, float)) and not isinstance(method.get(key), bool)), None)
    shown = [key for key in method if not key.startswith("_") and key != scale and key not in NOT_RESULTS and key != selector]
    changed = [f"{k}={_format(method[k])}" for k in shown if _differs(method[k], defaults.get(k, inspect.Parameter.empty))]
    name = SHORT_NAMES.get(class_name, class_name)
    return (f"{name} ({', '.join(changed)})" if changed else name), method.get(scale) if scale else None


def mark_best(rows: list[Row], *, select_on: str | None = None) -> list[Row]:
    """Mark each group's best λ by average, per number of merged tasks. With select_on="validation",
    keep the test rows whose λ was best on validation (the paper's protocol) and drop the rest;
    none is marked best then, each being its method's one row, and the label says where its λ was
    chosen."""
    groups: dict[tuple[str, int], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.group, row.n_models), []).append(row)
    kept = []
    for group_rows in groups.values():
        if select_on:
            judged = [r for r in group_rows if r.split == select_on] or group_rows
            winner = max(judged, key=lambda r: r.average)
            chosen = [r for r in group_rows if r.split == "test" and r.scaling_factor == winner.scaling_factor]
            for row in chosen:
                row.chosen_on = winner.split if winner.scaling_factor is not None and winner.split != row.split else None
            kept += chosen or [winner]
        else:
            test_rows = [r for r in group_rows if r.split == "test"] or group_rows
            if len(test_rows) > 1:
                max(test_rows, key=lambda r: r.average).best = True
            kept += group_rows
    return kept


def render(rows: Sequence[Row], fmt: str = "markdown", *, percent: bool = True) -> str:
    tasks = list(dict.fromkeys(task for row in rows for task in row.scores))
    header = ["method", *tasks, "average"]

    def is_merge(row: Row) -> bool:
        return row.group not in (ZERO_SHOT, INDIVIDUAL)

    mixed = len({row.n_models for row in rows if is_merge(row)}) > 1  # a scaling table: say how many tasks each row merged

    def label(row: Row) -> str:
        return f"{row.label} [{row.n_models} tasks]" if mixed and is_merge(row) else row.label

    def cell(value: float | None) -> str:
        return "" if value is None or math.isnan(value) else f"{100 * value:.1f}" if percent else f"{value:.3f}"

    body = [[label(row) + (" *" if row.best and fmt == "csv" else ""), *(cell(row.scores.get(t)) for t in tasks), cell(row.average)] for row in rows]
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out).writerows([header, *body])
        return out.getvalue()
    if fmt == "markdown":
        bold = [[f"**{c}**" if row.best and c else c for c in line] for row, line in zip(rows, body)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(line) + " |" for line in bold]
        return "\n".join(lines) + "\n"
    if fmt == "latex":
        escape = lambda text: text.replace("_", r"\_").replace("λ", r"$\lambda$")  # noqa: E731
        bold = [[rf"\textbf{{{escape(c)}}}" if row.best and c else escape(c) for c in line] for row, line in zip(rows, body)]
        lines = [r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}", r"\toprule", " & ".join(map(escape, header)) + r" \\", r"\midrule"]
        lines += [" & ".join(line) + r" \\" for line in bold] + [r"\bottomrule", r"\end{tabular}"]
        return "\n".join(lines) + "\n"
    raise InputError(f"format {fmt!r} is unknown; use markdown, csv or latex")


def _differs(value, default) -> bool:
    if default is inspect.Parameter.empty:
        return True
    if isinstance(default, tuple):
        default = list(default)
    return value != default


def _format(value) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
