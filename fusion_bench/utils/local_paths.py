"""The local files and folders a config names, so that nothing is ever saved over them."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

_NOT_PATHS = ("_target_", "split")  # keys whose values name classes or splits, even if a folder shares the name


def local_paths_in(spec: Any, what: str) -> dict[str, Path]:
    """{where in the config: path} for the strings in `spec` (nested mappings and lists too) that
    name existing local paths."""
    found: dict[str, Path] = {}
    if isinstance(spec, str) and spec and Path(spec).expanduser().exists():
        found[what] = Path(spec).expanduser()
    elif isinstance(spec, Mapping):
        for key, value in spec.items():
            if key not in _NOT_PATHS:
                found.update(local_paths_in(value, f"{what}.{key}"))
    elif isinstance(spec, (list, tuple)):
        for index, value in enumerate(spec):
            found.update(local_paths_in(value, f"{what}[{index}]"))
    return found
