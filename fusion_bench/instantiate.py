"""hydra.utils.instantiate, after checking every config key against the target's parameters.

A misspelt key (`treshold: 20`) would otherwise surface as a TypeError deep inside Hydra.
"""

import inspect
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig

from fusion_bench.errors import InputError

_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


def instantiate_checked(config: DictConfig, group: str) -> Any:
    """Build the object a config describes; `group` (e.g. "method") names it in errors."""
    if "_target_" not in config:
        raise InputError(f"the {group} config has no `_target_`; name the class to build, e.g. _target_: fusion_bench.method.TiesMergingAlgorithm")
    target = config["_target_"]
    try:
        factory = get_object(target)
    except Exception as error:
        raise InputError(f"the {group} config's _target_ {target!r} cannot be imported: {error}") from error
    parameters = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        for key in config:
            if key not in _HYDRA_KEYS and key not in parameters:
                known = ", ".join(name for name in parameters if name != "self")
                raise InputError(f"the {group} config has an unknown key {key!r} for {target}; its keys are: {known}")
    try:
        return instantiate(config)
    except InstantiationException as error:  # Hydra wraps what constructors raise
        if isinstance(error.__cause__, InputError):
            raise error.__cause__ from None
        raise
