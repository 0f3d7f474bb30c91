"""Progress bars on terminals only.

A bar redraws itself with carriage returns: on a terminal that is one line, in a log file or a CI
log it is thousands. Off a terminal, bars stay silent and the parts log one line per task or
phase instead. TQDM_DISABLE=1 silences bars on terminals too.
"""

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm


def bars_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "").lower() not in ("1", "true")


def progress_bar(iterable: Iterable | None = None, **kwargs: Any) -> tqdm:
    """tqdm, shown only when stderr is a terminal."""
    return tqdm(iterable, disable=not bars_enabled(), leave=False, **kwargs)


def configure_progress_bars() -> None:
    """Turn off the bars of transformers, datasets and huggingface_hub when not on a terminal
    (transformers 5 draws one each time it loads weights)."""
    if bars_enabled():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
