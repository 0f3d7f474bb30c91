"""EleutherAI's lm-evaluation-harness, run in this process on the merged model object."""

import difflib
import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fusion_bench.modelpool.base import BaseModelPool
from fusion_bench.taskpool.base import BaseTaskPool, TaskMetrics
from fusion_bench.taskpool.causal_lm_tokenizer import TokenizerChoice
from fusion_bench.utils.errors import InputError, first_line
from fusion_bench.utils.instantiation import plain

log = logging.getLogger(__name__)

VERBOSITY = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")


class LMEvalHarnessTaskPool(BaseTaskPool):
    """Scores a language model on lm-eval tasks (`lm_eval` 0.4, `pip install -e .[lmeval]`) with
    FusionBench's keys. The model is wrapped as it is (lm_eval.models.huggingface.HFLM), on the
    Fabric's device, and lm_eval.simple_evaluate runs every task in one pass; nothing is reloaded
    from disk.

    Per task, lm-eval's metrics as it names them, without the default filter's ",none" (`acc`,
    `acc_stderr`, `acc_norm`, ...; other filters stay, as `exact_match,strict-match`). A group
    with aggregate metrics (mmlu) reports those; a tag or a group without them reports each of its
    tasks.

    tasks: task, group or tag names, or paths to task YAML files (a list, or one comma-separated
        string as lm-eval's --tasks); checked, and their datasets loaded, before the merge.
    tokenizer: a folder or hub id; null: the model pool's tokenizer (its `tokenizer` key or its
        base model's folder), or, without a model pool, the folder the model was loaded from.
    include_path: a folder (or list of folders) of your own task YAMLs, indexed beside lm-eval's.
    include_defaults: false: index only include_path, not lm-eval's own ~15,000 task configs
        (seconds faster to start when every task is your own).
    batch_size: an integer, or "auto" / "auto:N" (lm-eval finds the largest that fits).
    num_fewshot: few-shot examples per prompt (null: each task's own default, else 0).
    limit: only the first `limit` documents of each task (a fraction below 1: that share of them).
    apply_chat_template: format prompts with the tokenizer's chat template (true, or its name).
    metadata: a mapping passed to lm-eval's tasks (some need it, e.g. {max_seq_lengths: [4096]}).
    verbosity: the level of lm-eval's logger (CRITICAL, ERROR, WARNING, INFO, DEBUG; null: as is).
    output_path: a folder where lm-eval's full results (results_<time>.json) and, with
        log_samples, every scored sample (samples_<task>_<time>.jsonl) are written; new files
        only, an existing file is never replaced; null: none (the run's report holds the metrics).
    log_samples: also write each document's prompt, responses and scores (needs output_path).
    fast_dev_run: score only the first `batch_size` documents of each task (as limit).
    """

    uses_fabric = True

    def __init__(
        self,
        tasks: str | Sequence[str],
        *,
        tokenizer: str | None = None,
        apply_chat_template: bool | str = False,
        include_path: str | Sequence[str] | None = None,
        include_defaults: bool = True,
        batch_size: int | str = 1,
        num_fewshot: int | None = None,
        limit: int | float | None = None,
        metadata: Mapping[str, Any] | None = None,
        verbosity: str | None = None,
        output_path: str | None = None,
        log_samples: bool = False,
        fast_dev_run: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        tasks = plain(tasks)
        self.tasks = [name.strip() for name in tasks.split(",")] if isinstance(tasks, str) else list(tasks or [])
        if not self.tasks or not all(isinstance(name, str) and name for name in self.tasks):
            raise InputError(f"tasks={tasks!r} must name lm-eval tasks, e.g. [arc_easy, hellaswag]")
        if len(set(self.tasks)) != len(self.tasks):
            raise InputError(f"the task pool lists a task twice: {self.tasks}")
        self.tokenizer = TokenizerChoice(tokenizer)
        include_path = plain(include_path)
        self.include_path = [include_path] if isinstance(include_path, str) else list(include_path or [])
        for folder in self.include_path:
            if not Path(folder).expanduser().exists():
                raise InputError(f"include_path {folder} does not exist; give the folder of your task YAML files")
        if not isinstance(include_defaults, bool) or not (include_defaults or self.include_path):
            raise InputError(f"include_defaults={include_defaults!r} must be true, or false with an include_path (else no task is known)")
        self.include_defaults = include_defaults
        if not _is_batch_size(batch_size):
            raise InputError(f"batch_size={batch_size!r} must be a positive integer, or auto / auto:N")
        if num_fewshot is not None and (isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0):
            raise InputError(f"num_fewshot={num_fewshot!r} must be a non-negative integer, or null (each task's default)")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise InputError(f"limit={limit!r} must be a positive number of documents (below 1: a share of them), or null (all)")
        if not isinstance(apply_chat_template, (bool, str)):
            raise InputError(f"apply_chat_template={apply_chat_template!r} must be true, false, or the name of one of the tokenizer's chat templates")
        if verbosity is not None and str(verbosity).upper() not in VERBOSITY:
            raise InputError(f"verbosity={verbosity!r} is no logging level; use one of {', '.join(VERBOSITY)}, or null")
        self.metadata = plain(metadata)
        if self.metadata is not None and not isinstance(self.metadata, Mapping):
            raise InputError(f"metadata={metadata!r} must be a mapping, e.g. {{max_seq_lengths: [4096]}}")
        self.output_path = Path(output_path).expanduser() if output_path else None
        if log_samples and self.output_path is None:
            raise InputError("log_samples=true needs output_path, the folder the samples are written to")
        self.apply_chat_template, self.batch_size, self.num_fewshot = apply_chat_template, batch_size, num_fewshot
        self.limit = batch_size if fast_dev_run and isinstance(batch_size, int) else (1 if fast_dev_run else limit)
        self.verbosity, self.log_samples = verbosity, log_samples
        self._loaded: dict[str, list[Any]] = {}  # task name: lm-eval's Task and Group objects

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        self.tokenizer.take_from(modelpool)

    def prepare(self) -> None:
        """Before merging: output_path is no file, the tokenizer loads, every task is known to
        lm-eval and its dataset loads (kept for the evaluation)."""
        if self.output_path is not None and self.output_path.exists() and not self.output_path.is_dir():
            raise InputError(f"output_path {self.output_path} is a file; give a folder (lm-eval's results are written into it as new files)")
        self.tokenizer.prepare()
        if self.verbosity is not None:
            logging.getLogger("lm_eval").setLevel(str(self.verbosity).upper())
        manager = self._task_manager()
        for name in self.tasks:
            if name not in self._loaded:
                self._loaded[name] = self._load(manager, name)

    def local_paths(self) -> dict[str, Path]:
        return {f"the task pool's include_path {folder}": Path(folder).expanduser() for folder in self.include_path}

    def task_names(self) -> list[str]:
        return list(self.tasks)

    def evaluate_tasks(self, model: nn.Module, fabric: Any = None, tasks: Sequence[str] | None = None) -> TaskMetrics:
        """{task: lm-eval's metrics} for `tasks` (default: all), in one simple_evaluate call."""
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        self.prepare()
        names = [name for name in self.tasks if tasks is None or name in tasks]
        device = fabric.device if fabric is not None else torch.device("cpu")
        model = model.to(device).eval()
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer.for_model(model), batch_size=self.batch_size)
        with fabric.autocast() if fabric is not None else nullcontext():
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=[item for name in names for item in self._loaded[name]],
                num_fewshot=self.num_fewshot,
                batch_size=self.batch_size,
                limit=self.limit,
                log_samples=self.log_samples,
                apply_chat_template=self.apply_chat_template,
                task_manager=self._task_manager(),
            )
        if self.output_path is not None:
            self._write(results)
        metrics = {}
        for item in (item for name in names for item in self._loaded[name]):
            own = _metrics(results["results"].get(_name(item), {}))
            leaves = item.get_all_tasks() if hasattr(item, "get_all_tasks") else []
            metrics.update({_name(item): own} if own or not leaves else {leaf.task_name: _metrics(results["results"][leaf.task_name]) for leaf in leaves})
        for task, values in metrics.items():
            log.info("%s: %s", task, values)
        return metrics

    def _task_manager(self):
        return _task_manager(tuple(self.include_path), self.include_defaults, json.dumps(self.metadata, sort_keys=True))

    def _load(self, manager: Any, name: str) -> list[Any]:
        """The task's lm-eval objects, datasets loaded: a task or a group (a tag: its tasks)."""
        if name not in manager.all_tasks and not (name.endswith((".yaml", ".yml")) and Path(name).is_file()):
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise InputError(
                f"lm-eval has no task {name!r}{hint}; list its tasks with `lm-eval ls tasks`, "
                f"or add the folder of your task YAMLs with taskpool.include_path=<folder>"
            )
        try:
            loaded = manager.load([name])
        except (OSError, ValueError, KeyError) as error:
            raise InputError(f"lm-eval task {name!r} cannot be loaded ({first_line(error)}); check its dataset (hub access or a local copy) and its YAML") from None
        children = {child for group in loaded["groups"].values() for child in group.child_names}
        return [group for key, group in loaded["groups"].items() if key not in children] + [
            task for key, task in loaded["tasks"].items() if key not in children
        ]

    def _write(self, results: Mapping[str, Any]) -> None:
        """lm-eval's results (and samples) as new files in output_path; "x" refuses an existing name."""
        from lm_eval.utils import handle_non_serializable

        self.output_path.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
        results = dict(results)
        samples = results.pop("samples", None) or {}
        with open(self.output_path / f"results_{stamp}.json", "x", encoding="utf-8") as f:
            json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
        for task, rows in samples.items():
            with open(self.output_path / f"samples_{task}_{stamp}.jsonl", "x", encoding="utf-8") as f:
                f.writelines(json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n" for row in rows)
        log.info("lm-eval's results: %s", self.output_path / f"results_{stamp}.json")


@lru_cache(maxsize=4)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool, metadata: str):
    """lm-eval's index of its ~15,000 task configs and the include_path folders (seconds to build),
    built once per process: a sweep's runs share it."""
    from lm_eval.tasks import TaskManager

    folders = [str(Path(folder).expanduser()) for folder in include_path] or None
    return TaskManager(include_path=folders, include_defaults=include_defaults, metadata=json.loads(metadata))


def _name(item: Any) -> str:
    """A Task's or a Group's name in lm-eval's results."""
    return item.task_name if hasattr(item, "task_name") else item.name


def _metrics(entry: Mapping[str, Any]) -> dict[str, float]:
    """lm-eval's "metric,filter" numbers, the default filter's without ",none"; "N/A" stderrs and
    the alias dropped."""
    metrics = {}
    for key, value in entry.items():
        metric, _, filter_name = key.partition(",")
        if filter_name and isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[metric if filter_name == "none" else key] = float(value)
    return metrics


def _is_batch_size(value: Any) -> bool:
    if isinstance(value, str):
        head, _, factor = value.partition(":")
        return head == "auto" and (not factor or factor.isdigit())
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
