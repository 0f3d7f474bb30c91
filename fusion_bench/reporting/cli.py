"""`fusion_bench_report`: a table (and figures) from the reports of runs and sweeps.

    fusion_bench_report multirun/2026-11-23/10-00-00 --normalized --format latex --figures figures/
"""

import argparse
import sys
from pathlib import Path

from fusion_bench.reporting import figures
from fusion_bench.reporting.report import failed, meta
from fusion_bench.reporting.tables import find_reports, mark_best, render, rows_from_reports, split_of
from fusion_bench.utils.cache import write_atomically
from fusion_bench.utils.errors import InputError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fusion_bench_report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="run or sweep directories, or report.json files")
    parser.add_argument("--metric", default="accuracy", help="the per-task metric to tabulate (default: accuracy)")
    parser.add_argument("--normalized", action="store_true", help="divide by the individual fine-tuned models' scores")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv", "latex"])
    parser.add_argument("--select-on", choices=["validation"], help="choose λ on the validation split, report it on test")
    parser.add_argument("--split", choices=["test", "validation"], help="only the runs scored on this split")
    parser.add_argument("--output", type=Path, help="write the table here instead of printing it")
    parser.add_argument("--figures", type=Path, help="save PNG figures into this directory")
    args = parser.parse_args(argv)
    try:
        found = find_reports(args.paths)
        for path, report in found.items():
            if failed(report):  # listed, not dropped: a sweep with holes should say so
                print(f"failed run: {path.parent}: {' '.join(meta(report)['overrides'])}: {meta(report)['error']['message']}", file=sys.stderr)
        reports = [r for r in found.values() if args.split in (None, split_of(r))]
        rows = [row for row in rows_from_reports(reports, metric=args.metric, normalized=args.normalized) if row.scores]
        if not rows:
            completed = sum(not failed(r) for r in reports)
            raise InputError(
                f"nothing to tabulate: {completed} completed run(s) with no {args.metric!r} score on any task "
                f"({len(found) - completed} failed); runs with taskpool=dummy score nothing, and --metric names the per-task metric"
            )
        table_rows = mark_best(rows, select_on=args.select_on)
    except InputError as error:
        print(f"fusion_bench_report: error: {error}", file=sys.stderr)
        sys.exit(2)
    table = render(table_rows, args.format)
    if args.output:
        write_atomically(args.output, lambda temporary: temporary.write_text(table))
    else:
        print(table, end="")
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)
        label = ("normalised " if args.normalized else "") + args.metric
        test_rows = [r for r in rows if r.split == "test"]
        made = [
            figures.lambda_curves(test_rows, args.figures / "lambda.png", ylabel=f"average {label}"),
            figures.task_scaling(test_rows, args.figures / "task_scaling.png", ylabel=f"average {label}"),
            figures.ablations(test_rows, args.figures / "ties_ablations.png", ylabel=f"best average {label}"),
        ]
        for path in filter(None, made):
            print(f"figure: {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
