"""hydra.utils.instantiate, after checking the config against the target's parameters.

A misspelt key (`treshold: 20`), a missing one (`models:`), or a `???` left unset would otherwise
surface as a TypeError or an OmegaConf error deep inside Hydra; here each is one line that names
the key and the keys the class takes.
"""

import inspect
import logging
from collections.abc import Mapping
from typing import Any

import hydra.utils
from hydra.errors import InstantiationException
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from fusion_bench.utils.errors import InputError, first_line

log = logging.getLogger(__name__)

_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}
_METADATA_KEYS = {"_usage_", "_version_"}  # FusionBench's descriptive keys: for readers, not constructors
_EXAMPLE_TARGETS = {
    "method": "fusion_bench.method.TiesMergingAlgorithm",
    "modelpool": "fusion_bench.modelpool.AutoModelPool",
    "taskpool": "fusion_bench.taskpool.DummyTaskPool",
    "fabric": "lightning.Fabric",
    "root": "fusion_bench.programs.FusionProgram",
}


def plain(value: Any) -> Any:
    """A config node as plain dicts and lists, interpolations resolved; anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def instantiate(config: Any, *args: Any, **kwargs: Any) -> Any:
    """FusionBench's `fusion_bench.utils.instantiate`: Hydra's instantiate, with None passed through."""
    return None if config is None else hydra.utils.instantiate(config, *args, **kwargs)


def instantiate_checked(config: Any, group: str, *, log_call: bool = False, **kwargs: Any) -> Any:
    """Build the object a config describes; `group` (e.g. "method") names it in errors.
    kwargs override the config's keys, as in hydra.utils.instantiate."""
    example = _EXAMPLE_TARGETS.get(group, "package.module.Class")
    if not isinstance(config, (DictConfig, Mapping)) or "_target_" not in config:
        what = "is empty" if not config else "has no `_target_`"
        raise InputError(f"the {group} config {what}; name the class to build, e.g. _target_: {example}")
    if isinstance(config, DictConfig):
        config = config.copy()  # a copy to strip the metadata keys from; interpolations still resolve against the root
        with open_dict(config):
            for key in _METADATA_KEYS & set(config):
                config.pop(key)
        missing = sorted(OmegaConf.missing_keys(config))
        if missing:
            key = missing[0] if group == "root" else f"{group}.{missing[0]}"
            raise InputError(f"the config leaves {key} unset (???); give it a value, e.g. {key}=...")
    target = config["_target_"]
    try:
        factory = hydra.utils.get_object(target)
    except Exception as error:
        raise InputError(f"the {group} config's _target_ {target!r} cannot be imported ({first_line(error)}); check the name") from None
    _check_keys(factory, {*config, *kwargs} - _HYDRA_KEYS, group, target, partial=bool(config.get("_partial_")))
    if log_call:
        given = {key: value for key, value in config.items() if key not in _HYDRA_KEYS}
        log.info("instantiating %s(%s)", target, ", ".join(f"{key}={value!r}" for key, value in {**given, **kwargs}.items()))
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as error:  # Hydra wraps what constructors raise
        if isinstance(error.__cause__, InputError):
            raise error.__cause__ from None
        if isinstance(error.__cause__, OmegaConfBaseException):
            raise InputError(f"the {group} config cannot be resolved: {first_line(error.__cause__)}") from None
        raise
    except OmegaConfBaseException as error:  # an interpolation that names nothing, a bad value type
        raise InputError(f"the {group} config cannot be resolved: {first_line(error)}") from None


def refuse_unknown_keys(owner: object, kwargs: Mapping[str, Any], group: str) -> None:
    """For base classes that take **kwargs as FusionBench's do: only its descriptive keys pass."""
    unknown = sorted(key for key in kwargs if key not in _METADATA_KEYS)
    if unknown:
        cls = type(owner)
        raise InputError(_unknown_key(group, unknown[0], cls.__qualname__, _named_parameters(inspect.signature(cls).parameters)))


def _check_keys(factory: Any, keys: set[str], group: str, target: str, *, partial: bool) -> None:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin without a signature: let it check its own arguments
        return
    named = _named_parameters(parameters)
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        for key in sorted(keys):
            if key not in named:
                raise InputError(_unknown_key(group, key, target, named))
    required = [name for name, p in named.items() if p.default is p.empty and name not in keys]
    if required and not partial:
        raise InputError(f"the {group} config lacks {required[0]!r}, which {target} needs; its keys are: {', '.join(named)}")


def _named_parameters(parameters: Mapping[str, inspect.Parameter]) -> dict[str, inspect.Parameter]:
    """The parameters a config key can name: not self, *args or **kwargs."""
    return {name: p for name, p in parameters.items() if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def _unknown_key(group: str, key: str, target: str, named: Mapping[str, Any]) -> str:
    listing = f"its keys are: {', '.join(named)}" if named else "it takes no keys"
    return f"the {group} config has an unknown key {key!r} for {target}; {listing}"

