"""Zero-shot classification tasks for CLIP: each task's class names and prompt templates.

A template is a format string with one `{}` for the class name. Tasks are looked up by the names
the configs give them (the keys of `test_datasets`, as in FusionBench).
"""

from dataclasses import dataclass
from types import ModuleType

from fusion_bench.tasks.clip_classification import dtd, eurosat, gtsrb, mnist, resisc45, stanford_cars, sun397, svhn
from fusion_bench.utils.errors import InputError

_TASKS: dict[str, ModuleType] = {
    "sun397": sun397,
    "stanford-cars": stanford_cars,
    "stanford_cars": stanford_cars,
    "resisc45": resisc45,
    "eurosat": eurosat,
    "svhn": svhn,
    "gtsrb": gtsrb,
    "mnist": mnist,
    "dtd": dtd,
}


@dataclass(frozen=True)
class ClassificationTask:
    classnames: tuple[str, ...]
    templates: tuple[str, ...]

    def prompts(self) -> list[str]:
        """Every template filled with every class name, class by class: classes × templates."""
        return [template.format(name) for name in self.classnames for template in self.templates]


def classification_task(name: str) -> ClassificationTask:
    if name not in _TASKS:
        raise InputError(
            f"no class names and prompt templates for task {name!r}; the known tasks are {', '.join(sorted(_TASKS))}"
        )
    module = _TASKS[name]
    return ClassificationTask(tuple(module.classnames), tuple(module.templates))


__all__ = ["ClassificationTask", "classification_task"]
