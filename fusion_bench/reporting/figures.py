"""Figures from report rows (fusion_bench.reporting.tables), saved as PNG with matplotlib.

- lambda_curves: average score against the scaling factor λ, one line per method;
- task_scaling: average (normalised) score against the number of merged tasks, at each method's
  best λ (the TIES paper's scaling figure);
- ablations: the best average of each TIES variant (without trim, without elect, mean or sum).
"""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402

from fusion_bench.reporting.tables import Row  # noqa: E402


def lambda_curves(rows: Sequence[Row], path: Path, *, ylabel: str = "average accuracy") -> Path | None:
    groups = _by_group(r for r in rows if r.scaling_factor is not None)
    groups = {g: sorted(rs, key=lambda r: r.scaling_factor) for g, rs in groups.items() if len(rs) > 1}
    if not groups:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for group, group_rows in groups.items():
        axes.plot([r.scaling_factor for r in group_rows], [100 * r.average for r in group_rows], marker="o", label=group)
    for baseline in (r for r in rows if r.scaling_factor is None):
        axes.axhline(100 * baseline.average, linestyle="--", linewidth=1, color="grey")
        axes.annotate(baseline.group, (0, 100 * baseline.average), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
    axes.set(xlabel="scaling factor λ", ylabel=ylabel)
    return _save(figure, axes, path)


def task_scaling(rows: Sequence[Row], path: Path, *, ylabel: str = "average normalised accuracy") -> Path | None:
    points: dict[str, dict[int, float]] = {}
    for row in rows:
        if row.n_models > 1 or row.group.startswith("Simple"):
            best = points.setdefault(row.group, {})
            best[row.n_models] = max(best.get(row.n_models, float("-inf")), row.average)
    points = {g: p for g, p in points.items() if len(p) > 1}
    if not points:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    for group, by_count in points.items():
        counts = sorted(by_count)
        axes.plot(counts, [100 * by_count[c] for c in counts], marker="o", label=group)
    axes.set(xlabel="number of merged tasks", ylabel=ylabel)
    return _save(figure, axes, path)


def ablations(rows: Sequence[Row], path: Path, *, ylabel: str = "best average accuracy") -> Path | None:
    best: dict[str, float] = {}
    for row in rows:
        if row.group.startswith("TIES"):
            best[row.group] = max(best.get(row.group, float("-inf")), row.average)
    if len(best) < 2:
        return None
    figure, axes = plt.subplots(figsize=(6, 4))
    names = sorted(best, key=best.get)
    bars = axes.barh(names, [100 * best[n] for n in names])
    axes.bar_label(bars, fmt="%.1f", padding=3)  # the variants often differ by less than a bar's width shows
    axes.set(xlabel=ylabel)
    axes.margins(x=0.12)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path


def _by_group(rows) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.group, []).append(row)
    return groups


def _save(figure, axes, path: Path) -> Path:
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path
