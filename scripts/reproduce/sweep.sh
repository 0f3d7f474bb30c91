# Sourced by the reproduction scripts: `sweep <directory> <overrides...>` runs one Hydra multirun
# into <directory>, and skips it when a previous call completed it (it leaves <directory>/.done),
# so an interrupted script resumes where it stopped. $FUSION_BENCH names the command to run.
sweep() {
  local dir=$1; shift
  if [ -f "$dir/.done" ]; then return; fi
  "${FUSION_BENCH:-fusion_bench}" --multirun "hydra.sweep.dir=$dir" "$@"
  touch "$dir/.done"
}
