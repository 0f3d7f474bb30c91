"""The run: check everything → prepare the pools → merge → save → evaluate → report.

Every check that can run before the merge runs before it (settings, the three configs, that the
task pool fits the model pool, where the model and the report will be written), and nothing is
written when one fails.
"""

import inspect
import logging
import random
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool
from fusion_bench.models.per_task_models import PerTaskModels
from fusion_bench.programs.multi_process import check_several_processes, is_evaluation_worker, several_processes, share_merged_model
from fusion_bench.reporting.report import build_report, check_report_path, failed, format_table, meta, read_report, split_results, write_report
from fusion_bench.taskpool.base import BaseTaskPool
from fusion_bench.utils.errors import InputError, first_line
from fusion_bench.utils.instantiation import instantiate_checked, plain
from fusion_bench.utils.model_saving import check_free_space, check_save_path, save_merged_model
from fusion_bench.utils.parameters import model_summary

log = logging.getLogger(__name__)


class FusionProgram:
    """Merges the model pool with the method, scores the result with the task pool, and writes one
    report. The parts arrive as configs and are built here, so a bad one fails before any work.

    The keys are FusionBench's (`fabric_model_fusion.yaml`), plus two that say an earlier output
    may be replaced:
      merged_model_save_path: a folder for the merged model (null: not saved); "{log_dir}" stands
        for the run's output folder. merged_model_save_kwargs go to the pool's save_model (e.g.
        {save_tokenizer: true}). An existing merged model there is replaced only with
        merged_model_save_overwrite: true; nothing else is ever replaced.
      report_save_path: the JSON report ("{log_dir}" as above; null: none); an existing report is
        replaced only with report_save_overwrite: true.
      skip_completed: where report_save_path holds the completed report of a run with the same
        overrides, do nothing but print it; where it holds the failed report of one, run and
        replace it. Rerunning a partly failed sweep with skip_completed=true runs only what failed.
      dry_run: build and check everything, merge nothing, write nothing.
      fast_dev_run: score a few batches per task (passed to task pools that take the key).
      print_config: print the composed config first. print_function_call: log each object built.
      path: FusionBench's folder settings, kept for the interpolations of its configs.
    """

    def __init__(
        self,
        method: DictConfig,
        modelpool: DictConfig,
        taskpool: DictConfig | None = None,
        *,
        fabric: DictConfig | None = None,
        seed: int | None = None,
        merged_model_save_path: str | None = None,
        merged_model_save_kwargs: Mapping[str, Any] | None = None,
        merged_model_save_overwrite: bool = False,
        report_save_path: str | None = None,
        report_save_overwrite: bool = False,
        skip_completed: bool = False,
        dry_run: bool = False,
        fast_dev_run: bool = False,
        print_config: bool = False,
        print_function_call: bool = False,
        path: DictConfig | None = None,
        log_dir: str | None = None,
    ):
        self.configs = {"method": method, "modelpool": modelpool, "taskpool": taskpool, "fabric": fabric}
        for key, value in (("merged_model_save_overwrite", merged_model_save_overwrite), ("report_save_overwrite", report_save_overwrite),
                           ("skip_completed", skip_completed), ("dry_run", dry_run), ("fast_dev_run", fast_dev_run), ("print_config", print_config),
                           ("print_function_call", print_function_call)):  # fmt: skip
            if not isinstance(value, bool):
                raise InputError(f"{key}={value!r} must be true or false")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(f"seed={seed!r} must be an integer, or null for no fixed seed")
        self.seed = seed
        # FusionBench's "{log_dir}" is its logger's folder, path.log_dir; its root configs name no log_dir
        self.log_dir = log_dir if log_dir is not None else (path or {}).get("log_dir")
        self.merged_model_save_path = expand_log_dir(merged_model_save_path, self.log_dir, "merged_model_save_path")
        self.merged_model_save_kwargs = _plain(merged_model_save_kwargs) or {}
        if not isinstance(self.merged_model_save_kwargs, Mapping):
            raise InputError(f"merged_model_save_kwargs={merged_model_save_kwargs!r} must be a mapping of keys, e.g. {{save_tokenizer: true}}")
        self.merged_model_save_overwrite = merged_model_save_overwrite
        self.report_save_path = expand_log_dir(report_save_path, self.log_dir, "report_save_path")
        self.report_save_overwrite = report_save_overwrite
        if skip_completed and not self.report_save_path:
            raise InputError("skip_completed=true finds completed runs by their reports, and report_save_path is null; give a report_save_path")
        self.skip_completed = skip_completed
        self.dry_run, self.fast_dev_run = dry_run, fast_dev_run
        self.print_config, self.print_function_call = print_config, print_function_call

    def run(self) -> dict[str, Any] | None:
        """The report (None for a dry run)."""
        if self.print_config:
            print(OmegaConf.to_yaml({group: config for group, config in self.configs.items() if config is not None}, resolve=True))
        earlier = self._earlier_report() if self.skip_completed else None
        if earlier is not None and not failed(earlier):
            print(f"skipped: this run completed before; its report is {self.report_save_path}")
            print(format_table(earlier))
            return earlier
        if self.seed is not None:
            _seed_everything(self.seed)
        method, modelpool, taskpool, fabric = self._build_parts()
        if is_evaluation_worker(fabric):
            return self._help_evaluate(taskpool, fabric)
        save_target = self._check_outputs(modelpool, taskpool)
        if self.dry_run:
            print("dry run: the configs build and every check passed; nothing was merged or written")
            return None

        timing = {}
        start = time.perf_counter()
        modelpool.prepare()
        if hasattr(taskpool, "prepare"):  # FusionBench's task pools prepare nothing ahead
            taskpool.prepare()
        timing["prepare_seconds"] = time.perf_counter() - start
        if save_target is not None:
            copies = len(modelpool.model_names) if getattr(method, "makes_per_task_models", False) else 1
            check_free_space(save_target, copies * _model_bytes(modelpool))

        start = time.perf_counter()
        # A merge that nothing runs (only saved, or counted) need not build the model's class
        modelpool.merged_model_runs = taskpool is not None and getattr(taskpool, "runs_models", True)
        method.on_run_start()
        merged = method.run(modelpool)
        method.on_run_end()
        timing["merge_seconds"] = time.perf_counter() - start
        log.info("merged with %s in %.1f s", type(method).__name__, timing["merge_seconds"])

        if save_target is not None:
            start = time.perf_counter()
            save_merged_model(
                save_target,
                lambda staging: self._save(modelpool, merged, staging),
                record={"config": self._config_record(), "models": describe_models(modelpool)},
            )
            timing["save_seconds"] = time.perf_counter() - start
            log.info("saved the merged model to %s", save_target)

        results: Mapping[str, Any] = {}
        if taskpool is not None:
            start = time.perf_counter()
            if several_processes(fabric):
                merged = share_merged_model(fabric, merged)
            results = _evaluate(taskpool, merged, fabric)
            timing["eval_seconds"] = time.perf_counter() - start
        tasks, average, model_info = split_results(results)
        one_model = merged.any_model() if isinstance(merged, PerTaskModels) else merged
        report = build_report(
            tasks=tasks,
            average=average,
            model_info={**model_summary(one_model), **(model_info or {}), "size_bytes": _size_bytes(one_model)},
            config=self._config_record(),
            models=describe_models(modelpool),
            timing=timing,
            overrides=hydra_overrides(),
            per_task_models=list(merged) if isinstance(merged, PerTaskModels) else None,
            method_outputs=method.method_outputs() if hasattr(method, "method_outputs") else None,
        )
        if self.report_save_path:
            log.info("report: %s", write_report(report, self.report_save_path))
        print(format_table(report))
        return report

    def _earlier_report(self) -> dict[str, Any] | None:
        """The report at report_save_path of a run with this run's overrides (None if there is no
        file); InputError where the file is not a fusion_bench report or is another run's."""
        path = Path(self.report_save_path).expanduser()
        if not path.is_file():
            return None
        try:
            report = read_report(path)
        except (OSError, ValueError):
            raise InputError(f"report_save_path={self.report_save_path} is not a fusion_bench report; fusion_bench replaces only its own reports; give another path") from None
        if not same_run(report, hydra_overrides()):
            theirs, ours = run_overrides(meta(report)["overrides"]), run_overrides(hydra_overrides())
            raise InputError(
                f"report_save_path={self.report_save_path} is the report of another run ({' '.join(theirs) or 'no overrides'}), not of this one "
                f"({' '.join(ours) or 'no overrides'}); skip_completed resumes the same command into the same folder"
            )
        return report

    def _build_parts(self) -> tuple[Any, BaseModelPool, Any, Any]:
        """The method, the model pool, the task pool and, for a task pool that places models on
        devices, the Fabric: all built (and checked) before any work."""
        build = lambda group, **kwargs: instantiate_checked(self.configs[group], group, log_call=self.print_function_call, **kwargs)  # noqa: E731
        method = build("method")
        modelpool = build("modelpool")
        if hasattr(method, "check_modelpool"):  # not FusionBench's methods
            method.check_modelpool(modelpool)
        taskpool = fabric = None
        if self.configs["taskpool"] is not None:
            taskpool = build("taskpool", **({"fast_dev_run": True} if self.fast_dev_run and _takes(self.configs["taskpool"], "fast_dev_run") else {}))
            if hasattr(taskpool, "check_modelpool"):  # not FusionBench's task pools
                taskpool.check_modelpool(modelpool)
            if getattr(method, "makes_per_task_models", False):
                _check_scores_per_task_models(taskpool, modelpool)
        if getattr(taskpool, "uses_fabric", False) or getattr(method, "uses_fabric", False):
            fabric = self._fabric()
            if several_processes(fabric):
                check_several_processes(fabric, taskpool)
        if getattr(method, "uses_fabric", False):
            method.fabric = fabric
        return method, modelpool, taskpool, fabric

    def _check_outputs(self, modelpool: BaseModelPool, taskpool: Any) -> Path | None:
        """Refuse, before any work, outputs that would replace what the run did not write."""
        if self.report_save_path:
            # with skip_completed, a failed report of this same run is this run's to replace
            check_report_path(self.report_save_path, overwrite=self.report_save_overwrite or self.skip_completed)
        modelpool.check_save_kwargs(self.merged_model_save_kwargs, saving=bool(self.merged_model_save_path))
        if not self.merged_model_save_path:
            return None
        protected = {**modelpool.local_paths(), **(taskpool.local_paths() if hasattr(taskpool, "local_paths") else {})}
        target = check_save_path(self.merged_model_save_path, overwrite=self.merged_model_save_overwrite, protected=protected)
        if self.report_save_path and Path(self.report_save_path).expanduser().absolute().is_relative_to(target):
            raise InputError(f"report_save_path={self.report_save_path} lies inside merged_model_save_path={self.merged_model_save_path}; keep the report beside the model")
        return target

    def _save(self, modelpool: BaseModelPool, merged: nn.Module | PerTaskModels, staging: Path) -> None:
        """The merged model into `staging`; per-task models each into a folder named after its task."""
        if not isinstance(merged, PerTaskModels):
            modelpool.save_model(merged, staging, **self.merged_model_save_kwargs)
            return
        for name in merged:
            folder = Path(staging) / name
            folder.mkdir()
            modelpool.save_model(merged[name], folder, **self.merged_model_save_kwargs)

    def _fabric(self):
        try:
            fabric = instantiate_checked(self.configs["fabric"], "fabric", log_call=self.print_function_call)
        except InstantiationException as error:  # Lightning refuses an accelerator or precision it cannot provide
            cause = error.__cause__ or error
            raise InputError(f"the fabric config cannot be built ({type(cause).__name__}: {first_line(cause)}); e.g. fabric.accelerator=cpu") from None
        if not several_processes(fabric):  # several: launched for evaluation, after the merge
            fabric.launch()
        return fabric

    def _help_evaluate(self, taskpool: Any, fabric: Any) -> None:
        """A process rank 0 started to share its evaluation: score this process's share of the
        merged model's batches; rank 0 writes the report."""
        if hasattr(taskpool, "prepare"):
            taskpool.prepare()
        _evaluate(taskpool, share_merged_model(fabric, None), fabric)

    def _config_record(self) -> dict[str, Any]:
        """The configs as run: fast_dev_run, where it reached the task pool, shows there."""
        record = {group: _plain(config) for group, config in self.configs.items() if config is not None}
        if self.fast_dev_run and "taskpool" in record and _takes(self.configs["taskpool"], "fast_dev_run"):
            record["taskpool"]["fast_dev_run"] = True
        record.update(seed=self.seed, fast_dev_run=self.fast_dev_run, merged_model_save_path=self.merged_model_save_path)
        return record


FabricModelFusionProgram = FusionProgram  # FusionBench's name, which its root configs give as _target_


def describe_models(pool: BaseModelPool) -> dict[str, str]:
    described = {}
    for name in pool.all_model_names:
        spec = pool.model_spec(name)
        if isinstance(spec, nn.Module):
            described[name] = f"<{type(spec).__name__} instance>"
        elif isinstance(spec, dict):
            described[name] = str(spec.get("pretrained_model_name_or_path", spec))
        else:
            described[name] = str(spec)
    return described


def _check_scores_per_task_models(taskpool: Any, modelpool: BaseModelPool) -> None:
    """Before merging: a method that makes one model per task needs a task pool that scores each
    task with its own model, and a model for every task it scores."""
    if not isinstance(taskpool, BaseTaskPool):
        raise InputError(f"the method makes one model per task, which {type(taskpool).__name__} cannot score; use a fusion_bench task pool")
    taskpool.check_per_task_models(modelpool.model_names)


def run_overrides(overrides: list[str]) -> list[str]:
    """The overrides that make a run what it is, sorted: not those saying whether to skip or
    replace it (skip_completed, report_save_overwrite)."""
    return sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("skip_completed", "report_save_overwrite"))


def same_run(report: Mapping[str, Any], overrides: list[str]) -> bool:
    """Whether `report` is of a run with these overrides (as skip_completed compares them)."""
    return run_overrides(meta(report)["overrides"]) == run_overrides(overrides)


def hydra_overrides() -> list[str]:
    """The command line's overrides of this run (of this job, in a sweep); none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _evaluate(taskpool: Any, model: nn.Module, fabric: Any) -> Mapping[str, Any]:
    """FusionBench's task pools take the model alone; ours also the Fabric that places it."""
    takes_fabric = "fabric" in inspect.signature(taskpool.evaluate).parameters
    return taskpool.evaluate(model, fabric) if takes_fabric else taskpool.evaluate(model)


def _model_bytes(pool: BaseModelPool) -> int:
    """The size of one model of the pool, as a saved copy of the merged model will be."""
    state_dict = pool.state_dict(PRETRAINED if pool.has_pretrained else pool.model_names[0])
    return sum(state_dict.shape(key).numel() * state_dict.dtype(key).itemsize for key in state_dict)


def _size_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def _takes(config: DictConfig, key: str) -> bool:
    from hydra.utils import get_object

    return key in inspect.signature(get_object(config["_target_"])).parameters


def expand_log_dir(path: str | None, log_dir: str | None, key: str) -> str | None:
    """FusionBench writes "{log_dir}" in its paths for the run's folder."""
    if not path or "{log_dir}" not in str(path):
        return path
    if log_dir is None:
        raise InputError(f"{key}={path} names {{log_dir}}, but this run has no log_dir; give a plain path")
    return str(path).replace("{log_dir}", str(log_dir))


def _plain(value: Any) -> Any:
    try:
        return plain(value)
    except OmegaConfBaseException as error:
        raise InputError(f"the config cannot be resolved: {first_line(error)}") from None


def _seed_everything(seed: int) -> None:
    import numpy

    random.seed(seed)
    numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed)
