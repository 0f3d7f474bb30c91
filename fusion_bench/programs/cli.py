"""The `fusion_bench` command: compose the config with Hydra, build the program, run it.

Bad input ends the run with one line naming the problem and the fix, and exit status 2: an
InputError from our code, and Hydra's own refusals (an unknown config name, an override of a key
that does not exist, an override that does not parse), which Hydra would otherwise print over
several lines with exit status 1. In a sweep (--multirun) a failing run does not stop the others:
it leaves a report saying why it failed, and the sweep exits non-zero at the end. A launcher
(joblib, submitit) runs the jobs in other processes: the sweep then finds its failed runs by their
reports.
"""

import gc
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fusion_bench.programs.config_choices import config_choices, register_choices_resolver
from fusion_bench.utils.errors import InputError, first_line
from fusion_bench.utils.instantiation import instantiate_checked
from fusion_bench.utils.progress import configure_progress_bars

log = logging.getLogger(__name__)

# Our hydra/launcher configs (joblib, submitit_*) carry the plugins' names, so Hydra validates each
# against the plugin's schema of that name, as we mean it to, and Hydra 1.3 warns that this is
# deprecated, at each composition, in each job. Set on import, so in a launcher's processes too.
warnings.filterwarnings("ignore", message=r"\s*'hydra/launcher/[^']+' is validated against ConfigStore schema with the same name", category=UserWarning)

_failed_runs: list[tuple[list[str], str, bool]] = []  # the failed jobs of a sweep: overrides, message, whether bad input


@hydra.main(config_path="pkg://fusion_bench_config", config_name="fusion_bench", version_base=None)
def _run(config: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        try:
            instantiate_checked(config, "root").run()
        except OmegaConfBaseException as error:  # an interpolation that names nothing, a value of the wrong type
            raise InputError(f"the config cannot be resolved: {first_line(error)}") from error
    except Exception as error:
        if not in_sweep:
            if isinstance(error, InputError):
                _fail(str(error))  # here, before Hydra adds its own lines about the failed job
            raise
        overrides = list(HydraConfig.get().overrides.task)
        _failed_runs.append((overrides, first_line(error), isinstance(error, InputError)))
        log.error("run failed (%s): %s", " ".join(overrides), error, exc_info=not isinstance(error, InputError))
        _write_failure_report(config, overrides, error)
        # In a launcher's process, _failed_runs is not main()'s: the error, sent back to it, says
        # where to look for the sweep's failed reports
        error.sweep_folder = _sweep_folder()  # type: ignore[attr-defined]
        raise  # Hydra records the job as failed and goes on with the next one


def _sweep_folder() -> str | None:
    """This job's sweep folder (hydra.sweep.dir, resolved): its output folder less the subdir."""
    from hydra.core.hydra_config import HydraConfig

    hydra_config = HydraConfig.get()
    try:
        depth = len(Path(str(hydra_config.sweep.subdir)).parts)
    except OmegaConfBaseException:  # a subdir naming the task's config, which Hydra's own copy lacks
        return None
    output_dir = Path(hydra_config.runtime.output_dir)
    return str(output_dir.parents[depth - 1] if depth else output_dir)


def _failures_reported(sweep_folder: str, since: float) -> list[tuple[list[str], str, bool]]:
    """The failed runs whose reports were written under `sweep_folder` after `since` (this sweep's,
    not those of an earlier sweep into the same folder)."""
    from fusion_bench.reporting.report import failed, meta, read_report
    from fusion_bench.reporting.tables import REPORT_NAMES

    failures = []
    for path in sorted(file for name in REPORT_NAMES for file in Path(sweep_folder).rglob(name)):
        try:
            report = read_report(path) if path.stat().st_mtime >= since else None
        except (OSError, ValueError):
            continue
        if report is not None and failed(report):
            error = meta(report)["error"]
            failures.append((meta(report)["overrides"], first_line(Exception(error["message"])), error["type"] == "InputError"))
    return failures


def _write_failure_report(config: DictConfig, overrides: list[str], error: BaseException) -> None:
    """A failed run's report: its settings and the reason, where its report would have gone."""
    from fusion_bench.programs.fusion_program import expand_log_dir
    from fusion_bench.reporting.report import build_report, write_report

    try:
        log_dir = config.get("log_dir") or OmegaConf.select(config, "path.log_dir")  # FusionBench's root configs: path.log_dir
        path = expand_log_dir(config.get("report_save_path"), log_dir, "report_save_path")
        if not path or (Path(path).exists() and not _replaceable_failure(config, path, overrides)):
            return
        record = {group: OmegaConf.to_container(config[group], resolve=False) for group in ("method", "modelpool", "taskpool") if config.get(group) is not None}
        write_report(build_report(tasks={}, model_info=None, config=record, models={}, timing={}, overrides=overrides, error=error), path)
    except (InputError, OSError, OmegaConfBaseException) as failure:
        log.warning("the failed run's report could not be written: %s", failure)


def _replaceable_failure(config: DictConfig, path: str, overrides: list[str]) -> bool:
    """Whether a resumed run (skip_completed) that failed again may replace the report it found:
    the failed report of a run with the same overrides."""
    from fusion_bench.programs.fusion_program import same_run
    from fusion_bench.reporting.report import failed, read_report

    try:
        report = read_report(path)
    except (OSError, ValueError):
        return False
    return config.get("skip_completed") is True and failed(report) and same_run(report, overrides)


def main() -> None:
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; the one-line messages are ours
    register_choices_resolver()
    configure_progress_bars()
    started = time.time()
    try:
        _run()
    except Exception as error:
        if not _failed_runs and getattr(error, "sweep_folder", None):  # the jobs ran in a launcher's processes
            _failed_runs.extend(_failures_reported(error.sweep_folder, since=started))
        if _failed_runs:  # the sweep re-raised its first failed run at the end
            _exit_sweep_failed()
        message = _one_line_message(error)
        if message is None:
            raise
        _fail(message)
    else:
        if _failed_runs:
            _exit_sweep_failed()
    finally:
        # Nothing is collected after the run, yet at exit the interpreter would sweep the half
        # million objects that torch and transformers create, about a second; frozen, it skips them.
        gc.freeze()


def _one_line_message(error: Exception) -> str | None:
    """The message for bad input, from us or from Hydra; None for anything else (a bug)."""
    if isinstance(error, InputError):
        return str(error)
    if isinstance(error, MissingConfigException):
        return _missing_config_message(error)
    if isinstance(error, ConfigCompositionException):
        return _composition_message(error)
    if isinstance(error, ValueError) and str(error).startswith("Config group override must be"):  # e.g. method=1
        return f"{error}: a config group takes a config name, e.g. method=ties_merging (quote a name that reads as a number)"
    if isinstance(error, OverrideParseException):
        return f"cannot parse the override: {first_line(error)}; write key=value, e.g. method.scaling_factor=0.3"
    if isinstance(error, ValueError) and str(error).startswith("Only one of --run, --multirun, --cfg"):
        return f"{error}: print a config without --multirun, e.g. fusion_bench hydra/launcher=submitit_slurm --cfg hydra"
    if isinstance(error, RuntimeError) and 'Could not detect "srun"' in str(error):
        return "hydra/launcher=submitit_slurm submits to SLURM, and this machine has no srun; run the sweep where SLURM is, or use hydra/launcher=submitit_local or joblib here"
    return None


def _fail(message: str) -> None:
    print(f"fusion_bench: error: {message}", file=sys.stderr)
    sys.exit(2)


def _exit_sweep_failed() -> None:
    for overrides, message, _ in _failed_runs:
        print(f"fusion_bench: failed run ({' '.join(overrides)}): {message}", file=sys.stderr)
    total = len(_failed_runs)
    print(f"fusion_bench: error: {total} run(s) of the sweep failed; each left a report.json saying why, the others ran", file=sys.stderr)
    sys.exit(2 if all(bad_input for _, _, bad_input in _failed_runs) else 1)


def _missing_config_message(error: MissingConfigException) -> str:
    missing = error.missing_cfg_file or ""
    group, _, name = missing.rpartition("/")
    if not group:
        return f"there is no config named {missing!r} (--config-name); the root configs are: fusion_bench, fabric_model_fusion, finetune"
    top = group.split("/")[0]
    listing = ", ".join(config_choices(top)) or "none"
    return f"{top}={missing.removeprefix(top + '/')} is not a config; the choices are: {listing} (or add yours with --config-dir)"


def _composition_message(error: ConfigCompositionException) -> str:
    cause: Any = error.__cause__
    key = getattr(cause, "full_key", None)
    node = getattr(cause, "parent_node", None)
    if key and node is not None and "not in struct" in str(cause):
        group, _, name = str(key).rpartition(".")
        keys = ", ".join(k for k in node if not str(k).startswith("_")) or "none"
        if group and _sweeps_group(group.split(".")[0]):
            # Hydra checks a multirun's other overrides against the group's default config
            return f"{key}: a --multirun over several {group.split('.')[0]} configs checks keys against the default one; write ++{key}=... to set it in every swept config"
        return f"{key}: the {group or 'root'} config has no key {name!r}; its keys are: {keys}; to add a key the class takes, write +{key}=..."
    return first_line(error)


def _sweeps_group(group: str, argv: list[str] | None = None) -> bool:
    """Whether the command line is a multirun with several choices for config group `group`."""
    argv = sys.argv[1:] if argv is None else argv
    multirun = any(arg in ("--multirun", "-m") for arg in argv)
    return multirun and any(arg.startswith(f"{group}=") and "," in arg for arg in argv)


if __name__ == "__main__":
    main()
