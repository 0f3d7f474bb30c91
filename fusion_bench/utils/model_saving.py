"""Save a merged model without ever losing a file the run did not write.

Before the merge, `check_save_path` refuses a path that is an existing file, a folder holding
anything but a merged model saved earlier by fusion_bench (each save leaves a marker listing its
files), an earlier merged model unless overwriting was asked for, or a path that is, contains or
lies inside a folder the pools read from. The save itself writes the whole model beside the
target and only then puts it in place: renamed onto a new or empty path, or swapped with the
earlier model in one atomic exchange, so a crash at any moment leaves either the old model or the
new one at the path, whole.
"""

import ctypes
import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fusion_bench.utils.errors import InputError

log = logging.getLogger(__name__)

MARKER = "fusion_bench_merged_model.json"
MARKER_SCHEMA = "fusion_bench.merged_model/1"


def check_save_path(path: str | Path, *, overwrite: bool, protected: Mapping[str, Path], key: str = "merged_model_save_path") -> Path:
    """The absolute path to save at, after refusing every path a save could do harm at.

    protected: {what it is: path} for the folders and files the pools read (models, datasets).
    """
    target = Path(os.path.abspath(Path(path).expanduser()))
    real = Path(os.path.realpath(target))  # a symbolic link on the way must not hide a model folder
    for what, used in protected.items():
        used = Path(os.path.realpath(used))
        if real == used or used.is_relative_to(real) or real.is_relative_to(used):
            relation = "is" if real == used else "contains" if used.is_relative_to(real) else "lies inside"
            raise InputError(f"{key}={path} {relation} {used}, {what}; a save there would replace it; choose another path")
    if target.is_symlink():
        raise InputError(f"{key}={path} is a symbolic link; give the folder it points to, or a new path")
    if target.exists():
        _check_existing(target, path, overwrite=overwrite, key=key)
    check_writable(target, key)
    return target


def _check_existing(target: Path, given: Any, *, overwrite: bool, key: str) -> None:
    if not target.is_dir():
        raise InputError(f"{key}={given} is an existing file; fusion_bench replaces nothing it did not write; give a new folder path")
    contents = sorted(p.name for p in target.iterdir())
    if not contents:
        return
    marker = read_marker(target)
    if marker is None:
        raise InputError(
            f"{key}={given} is a folder that holds other files ({_listing(contents)}), not a merged model saved by fusion_bench; "
            "give a new or empty folder"
        )
    if not overwrite:
        raise InputError(
            f"{key}={given} holds a merged model saved on {marker.get('created', '?')}; to replace it, add "
            "merged_model_save_overwrite=true, or give another path"
        )
    foreign = sorted(set(_relative_files(target)) - set(marker["files"]) - {MARKER})
    if foreign:
        raise InputError(
            f"{key}={given} holds files fusion_bench did not write ({_listing(foreign)}) beside the earlier merged model; "
            "move them out, or give another path"
        )


def check_writable(target: Path, key: str) -> None:
    """Refuse a path whose nearest existing folder cannot be written (probed with an empty folder
    made and removed at once, since permission bits do not tell: root may write where the kernel refuses)."""
    ancestor = _nearest_existing(target.parent)
    if not ancestor.is_dir():
        raise InputError(f"{key}={target} lies under {ancestor}, which is a file, not a folder; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(dir=ancestor, prefix=".fusion_bench-probe-"))
    except OSError as error:
        raise InputError(f"{key}={target}: cannot write in {ancestor} ({error.strerror}); choose another path") from None


def check_free_space(target: Path, needed_bytes: int, key: str = "merged_model_save_path") -> None:
    """Refuse before the merge when the model cannot fit (the earlier model stays until the new one is whole)."""
    ancestor = _nearest_existing(target)
    free = shutil.disk_usage(ancestor).free
    if free < needed_bytes:
        raise InputError(
            f"{key}={target}: the merged model needs about {needed_bytes / 2**20:,.0f} MiB but {ancestor} has "
            f"{free / 2**20:,.0f} MiB free; free some space or choose another path"
        )


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a merged model fusion_bench saved in `folder`, or None."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("schema") != MARKER_SCHEMA or not isinstance(marker.get("files"), list):
        return None
    return marker


def save_merged_model(target: Path, write: Callable[[Path], None], *, record: Mapping[str, Any]) -> Path:
    """Run write(staging_folder), mark the folder as ours, and put it at `target` atomically.

    `target` has passed check_save_path: it is new, empty, or an earlier merged model that may be
    replaced. On any failure the staging folder is removed and `target` is as it was; an OSError
    (a full disk, a read-only file system) becomes an InputError naming it.
    """
    leftovers = sorted(p for kind in ("partial", "old") for p in target.parent.glob(f".{target.name}.{kind}-*")) if target.parent.is_dir() else []
    if leftovers:  # never removed here: another run may be saving into one of them right now
        log.warning("%s holds %d unfinished save(s) of interrupted runs (%s); delete them once no run is saving there", target.parent, len(leftovers), leftovers[0].name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the model folder should not be
    except OSError as error:
        raise InputError(f"cannot save the merged model to {target}: {error.strerror}; choose another path") from None
    try:
        write(staging)
        marker = {
            "schema": MARKER_SCHEMA,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": sorted(_relative_files(staging)),
            **record,
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
        _put_in_place(staging, target)
    except OSError as error:
        raise InputError(
            f"saving the merged model to {target} failed ({error.strerror or error}); nothing was replaced; free some space or choose another path"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the new model's leftovers, or the old model after a swap
    return target


def _put_in_place(staging: Path, target: Path) -> None:
    """Rename `staging` to `target`; over an earlier model, exchange the two in one step, so the
    path never lacks a whole model (the old one ends up at `staging`, removed by the caller)."""
    if target.is_dir() and any(target.iterdir()):
        try:
            _exchange(staging, target)
            return
        except OSError as error:
            if error.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
                raise
        # no atomic exchange on this system or file system: two renames, with a moment between them
        retired = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        target.rename(retired / target.name)
        staging.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
        return
    os.replace(staging, target)  # a new path, or an empty folder


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists (the folder a save would be made in)."""
    while not path.exists():
        path = path.parent
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _relative_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]


def _listing(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
