"""What a model class makes of a checkpoint's tensor names, learnt once and kept on disk.

Reading a checkpoint tensor by tensor needs the architecture's view of it: which checkpoint
tensor fills which state-dict entry (fusion_bench.modelpool.checkpoint_keys), which entries are
tied, which are buffers. Learning that builds the model on the meta device, and importing a
transformers model's code takes seconds (CLIPVisionModel: about 3.5 s and 150 MB here) that a
merge of a few seconds would otherwise pay on every run. The layout depends only on the model
class, the transformers version, config.json and the checkpoint's tensor names, so it is cached
under that key; classes outside transformers, whose code may change under the same name, are
never cached.
"""

import importlib.metadata
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from torch import nn

from fusion_bench.modelpool.checkpoint_keys import checkpoint_key_map, tied_names
from fusion_bench.utils.cache import cache_dir, fingerprint, write_atomically

log = logging.getLogger(__name__)

_FORMAT = 1  # of the cached JSON: bump it when its fields, or how layout_of computes them, change


@dataclass(frozen=True)
class CheckpointLayout:
    """key_map: {state-dict key: checkpoint key} for the entries the checkpoint provides; None
    where loading transforms tensors (only from_pretrained can read such a checkpoint).
    ties: {first state-dict name: all names of that tensor}, every entry of the architecture.
    buffers: the state-dict keys that are buffers, not parameters.
    keeps_float32: the class keeps some modules in float32 whatever dtype it loads in.
    exact: the checkpoint holds every tensor of the architecture and nothing else, so
        from_pretrained initialises and drops nothing: the checkpoint is this model, whole (not,
        say, a CLIPModel read as its vision tower).
    """

    key_map: dict[str, str] | None
    ties: dict[str, list[str]]
    buffers: list[str]
    keeps_float32: bool
    exact: bool


def layout_of(architecture: nn.Module, file_keys: Sequence[str]) -> CheckpointLayout:
    """The layout of a checkpoint with `file_keys` for `architecture` (on the meta device, say)."""
    state_dict = architecture.state_dict()
    key_map = checkpoint_key_map(architecture, file_keys)
    ties = tied_names(architecture)
    return CheckpointLayout(
        key_map=key_map,
        ties=ties,
        buffers=[name for name, _ in architecture.named_buffers(remove_duplicate=False) if name in state_dict],
        keeps_float32=bool(getattr(architecture, "_keep_in_fp32_modules", None) or getattr(architecture, "_keep_in_fp32_modules_strict", None)),
        exact=key_map is not None
        and set(key_map.values()) == set(file_keys)
        and all(any(name in key_map for name in names) for names in ties.values()),
    )


def cached_layout(model_class: str, config_text: str, file_keys: Sequence[str], architecture: Callable[[], nn.Module]) -> CheckpointLayout:
    """The layout for `model_class` (its import path), from the cache, else from architecture()
    and then cached (for transformers' classes only)."""
    if not model_class.startswith("transformers."):
        return layout_of(architecture(), file_keys)
    key = fingerprint(_FORMAT, model_class, importlib.metadata.version("transformers"), config_text, sorted(file_keys))
    path = cache_dir("checkpoint_layouts", f"{key}.json")
    try:
        return CheckpointLayout(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):  # absent, or unreadable: learn it again
        pass
    layout = layout_of(architecture(), file_keys)
    try:
        write_atomically(path, lambda temporary: temporary.write_text(json.dumps(asdict(layout))))
    except OSError as error:  # a read-only cache costs the next run time, not this one its result
        log.warning("the checkpoint layout cannot be cached at %s (%s)", path, error)
    return layout
