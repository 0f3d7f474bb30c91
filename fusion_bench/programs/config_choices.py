"""The choices of each config group, as `fusion_bench --help` and error messages list them.

Hydra would list every YAML file, `_template.yaml` included; files named `_*` are pieces other
configs include (FusionBench's layout), not choices, so they are left out. The folders searched
are ours and those given with --config-dir / --config-path, as Hydra searches them.
"""

import sys
import textwrap
from importlib.resources import files
from pathlib import Path

from omegaconf import OmegaConf

MAIN_GROUPS = ("method", "modelpool", "taskpool", "fabric")
_DIR_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp")


def config_folders(argv: list[str] | None = None) -> list[Path]:
    """Our config folder, then the user's from the command line."""
    argv = sys.argv[1:] if argv is None else argv
    folders = [Path(str(files("fusion_bench_config")))]
    for i, arg in enumerate(argv):
        flag, _, value = arg.partition("=")
        if flag in _DIR_FLAGS:
            value = value or (argv[i + 1] if i + 1 < len(argv) else "")
            if value:
                folders.append(Path(value).expanduser())
    return folders


def config_choices(group: str, argv: list[str] | None = None) -> list[str]:
    """Every config under `group` (sub-folders as `folder/name`), pieces named `_*` left out."""
    choices = set()
    for folder in config_folders(argv):
        root = folder / group
        for path in root.rglob("*.yaml") if root.is_dir() else ():
            relative = path.relative_to(root).with_suffix("")
            if not any(part.startswith("_") for part in relative.parts):
                choices.add(relative.as_posix())
    return sorted(choices)


def choices_help() -> str:
    """Each main group and its choices, wrapped for a terminal."""
    return "\n".join(
        textwrap.fill(", ".join(config_choices(group)), width=100, initial_indent=f"  {group + ':':<11}", subsequent_indent=" " * 13, break_on_hyphens=False)
        for group in MAIN_GROUPS
    )


def register_choices_resolver() -> None:
    """`${fusion_bench_choices:}` in the help template (config/hydra/help/fusion_bench.yaml)."""
    if not OmegaConf.has_resolver("fusion_bench_choices"):
        OmegaConf.register_new_resolver("fusion_bench_choices", choices_help)
