"""Where fusion_bench keeps what it computes once: ~/.cache/fusion_bench, or $FUSION_BENCH_CACHE."""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """The cache folder, or a folder under it (not created here)."""
    root = os.environ.get("FUSION_BENCH_CACHE") or Path.home() / ".cache" / "fusion_bench"
    return Path(root).expanduser().joinpath(*parts)
