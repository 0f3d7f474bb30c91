"""What the benchmark scripts measure: one fresh process's wall time and peak RSS, each started
with its input files in the page cache."""

import os
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path


def warm_page_cache(files: Iterable[Path]) -> None:
    """Read `files` once, so a run does not pay for a disk read another run evicted."""
    for path in files:
        with open(path, "rb") as file:
            while file.read(1 << 26):
                pass


def measure(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """Wall seconds and peak RSS (GiB) of one fresh process (os.wait4 reports that child alone)."""
    with tempfile.TemporaryFile("w+") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if status != 0:
            output.seek(0)
            raise RuntimeError(f"{' '.join(command)} failed:\n{output.read()[-5000:]}")
    return seconds, usage.ru_maxrss / 2**20
