# Sourced by the reproduction scripts: `sweep <directory> <overrides...>` runs one Hydra multirun
# into <directory>, and skips it when a previous call completed it (it leaves <directory>/.done).
# Within a partly failed sweep, skip_completed=true skips the runs that completed, so running the
# script again (once the cause is fixed) resumes where it stopped. $FUSION_BENCH names the command.
sweep() {
  local dir=$1; shift
  if [ -f "$dir/.done" ]; then return; fi
  "${FUSION_BENCH:-fusion_bench}" --multirun "hydra.sweep.dir=$dir" skip_completed=true "$@"
  touch "$dir/.done"
}

# `best_lambda <directory>` prints the λ (scaling_factor, or TSV-M's alpha) whose runs under
# <directory> score the best average: sweep λ on validation, then score only that λ on test.
best_lambda() {
  "${PYTHON:-python3}" - "$1" <<'PY'
import sys
from fusion_bench.reporting.tables import find_reports, rows_from_reports
rows = [row for row in rows_from_reports(list(find_reports([sys.argv[1]]).values())) if row.scaling_factor is not None]
print(max(rows, key=lambda row: row.average).scaling_factor)
PY
}
