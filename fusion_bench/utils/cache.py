"""Where fusion_bench keeps what it builds once: datasets, fine-tuned models, zero-shot heads.

$FUSION_BENCH_CACHE, else ~/.cache/fusion_bench. Entries are keyed by what they are built from,
and written under a temporary name then renamed, so an interrupted build leaves nothing half-made.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cache_dir(*parts: str) -> Path:
    """The cache folder, or a folder under it (not created here)."""
    root = os.environ.get("FUSION_BENCH_CACHE") or Path.home() / ".cache" / "fusion_bench"
    return Path(root).expanduser().joinpath(*parts)


def fingerprint(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def file_digest(path: Path) -> str:
    """A short hash of a file's bytes, for keys that must survive reinstalling it (a new venv
    moves the packaged model and changes its mtime, not its contents)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()[:12]


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Make the file `path` by write(temporary_path) and a rename: readers (and later runs, should
    this one stop midway) see the whole file or none."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(descriptor)
    try:
        write(Path(temporary))
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def build_once(path: Path, build: Callable[[Path], None]) -> Path:
    """`path`, made by build(staging_directory) unless it exists already. Processes that build
    the same path at once (the jobs of a parallel sweep, test workers) each build their own staging
    folder; the first rename wins, and the others keep the winner's, which is the same thing."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        build(staging)
        try:
            staging.rename(path)
        except OSError:
            if not path.exists():
                raise  # a real failure, not another process finishing first
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path
