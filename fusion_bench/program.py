"""The run: modelpool → method → (save) → taskpool → report."""

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from fusion_bench.errors import InputError
from fusion_bench.instantiate import instantiate_checked
from fusion_bench.model_saving import save_merged_model
from fusion_bench.modelpool.base import BaseModelPool
from fusion_bench.report import build_report, format_table, write_report

log = logging.getLogger(__name__)


class FusionProgram:
    """Merges the model pool with the method, scores the result with the task pool, and writes one
    report. The three parts arrive as configs and are built here, so a bad one fails before any work.
    """

    def __init__(
        self,
        method: DictConfig,
        modelpool: DictConfig,
        taskpool: DictConfig,
        fabric: DictConfig | None = None,
        seed: int | None = None,
        merged_model_save_path: str | None = None,
        report_save_path: str | None = None,
    ):
        self.configs = {"method": method, "modelpool": modelpool, "taskpool": taskpool, "fabric": fabric}
        self.seed = seed
        self.merged_model_save_path = merged_model_save_path
        self.report_save_path = report_save_path

    def run(self) -> dict[str, Any]:
        if self.seed is not None:
            random.seed(self.seed)
            torch.manual_seed(self.seed)
        for path in (self.merged_model_save_path, self.report_save_path):
            _ensure_writable_parent(path)
        method = instantiate_checked(self.configs["method"], "method")
        modelpool = instantiate_checked(self.configs["modelpool"], "modelpool")
        taskpool = instantiate_checked(self.configs["taskpool"], "taskpool")
        taskpool.check_modelpool(modelpool)

        start = time.perf_counter()
        merged = method.run(modelpool)
        merge_seconds = time.perf_counter() - start
        log.info("merged with %s in %.1f s", type(method).__name__, merge_seconds)
        if self.merged_model_save_path:
            log.info("saved the merged model to %s", save_merged_model(merged, self.merged_model_save_path))

        fabric = self._fabric() if taskpool.uses_fabric else None
        start = time.perf_counter()
        tasks = taskpool.evaluate(merged, fabric)
        eval_seconds = time.perf_counter() - start

        report = build_report(
            config=self._config_record(),
            models=_describe_models(modelpool),
            tasks=tasks,
            model_info=_model_info(merged),
            merge_seconds=merge_seconds,
            eval_seconds=eval_seconds,
        )
        if self.report_save_path:
            log.info("report: %s", write_report(report, self.report_save_path))
        print(format_table(report))
        return report

    def _fabric(self):
        fabric = instantiate_checked(self.configs["fabric"], "fabric")
        fabric.launch()
        return fabric

    def _config_record(self) -> dict[str, Any]:
        record = {
            group: OmegaConf.to_container(config, resolve=True)
            for group, config in self.configs.items()
            if config is not None
        }
        record.update(seed=self.seed, merged_model_save_path=self.merged_model_save_path)
        return record


def _ensure_writable_parent(path: str | None) -> None:
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot write to {path}: {error}; choose another path") from error


def _describe_models(pool: BaseModelPool) -> dict[str, str]:
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


def _model_info(model: nn.Module) -> dict[str, int]:
    parameters = {id(p): p for p in model.parameters()}.values()
    return {
        "parameters": sum(p.numel() for p in parameters),
        "size_bytes": sum(p.numel() * p.element_size() for p in parameters),
    }
