"""Save a merged model atomically: written under a temporary name, then renamed into place."""

import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_model
from torch import nn


def save_merged_model(model: nn.Module, path: str | Path) -> Path:
    """A Hugging Face folder (save_pretrained) for transformers models, else `model.safetensors`.

    A crash leaves no half-written folder at `path`; an existing folder there is replaced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.partial-"))
    try:
        if hasattr(model, "save_pretrained"):
            model.save_pretrained(staging)
        else:
            save_model(model, str(staging / "model.safetensors"))
        if path.exists():
            retired = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
            path.rename(retired / path.name)
            staging.rename(path)
            shutil.rmtree(retired)
        else:
            staging.rename(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return path
