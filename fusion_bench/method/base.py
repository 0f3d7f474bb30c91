"""What every merging method shares: the interface, and checking a pool before any work."""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fusion_bench.modelpool.base import PRETRAINED, BaseModelPool
from fusion_bench.modelpool.lazy_state_dict import LazyStateDict
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import refuse_unknown_keys
from fusion_bench.utils.key_checks import check_string_list


class BaseAlgorithm:
    """A merging method. Its config keys are its constructor's arguments; `run` merges a pool.

    As in FusionBench, a subclass may pass unused keys up (`super().__init__(**kwargs)`; only its
    descriptive `_usage_` and `_version_` are taken), extend `_config_mapping` (attribute → config
    key), and hook `on_run_start` / `on_run_end`, which the program calls around `run`.
    """

    _config_mapping: dict[str, str] = {}
    # True where `run` returns PerTaskModels (one model per task): the program then checks, before
    # merging, that the task pool scores each task with its own model and has a model for each.
    makes_per_task_models = False
    # True where the method computes on a device (methods that learn from data): the program then
    # sets `fabric` to the run's Lightning Fabric; without one (the Python API) they use
    # `method_device()`.
    uses_fabric = False
    fabric = None

    def __init__(self, **kwargs):
        refuse_unknown_keys(self, kwargs, "method")

    def method_device(self) -> torch.device:
        """Where to compute: the Fabric's device, else CUDA when there is one, else the CPU."""
        if self.fabric is not None:
            return self.fabric.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def method_outputs(self) -> dict:
        """What the last `run` learnt that the report should keep (JSON-able); none by default."""
        return {}

    def check_modelpool(self, modelpool: BaseModelPool) -> None:
        """Raise InputError if the method cannot merge this pool, from its names and configs alone
        (e.g. one weight per task model): the program calls it before preparing the pool, so bad
        input fails before any download or fine-tuning, and in a dry run. The default accepts any."""

    def on_run_start(self) -> None:
        """Called by the program just before `run`."""

    def on_run_end(self) -> None:
        """Called by the program just after `run`."""

    def run(self, modelpool: BaseModelPool | Mapping[str, nn.Module]) -> nn.Module:
        raise NotImplementedError


@dataclass
class MergeInputs:
    """The state dicts a method streams over, checked against each other."""

    pretrained: LazyStateDict | None
    finetuned: dict[str, LazyStateDict]
    keys: list[str]  # the entries to merge: floating point, not in remove_keys, changed by some task
    # How many times each key (of keys and untouched) counts in global statistics: its state-dict
    # names not in remove_keys (tied weights share one tensor under several names).
    multiplicity: dict[str, int]
    untouched: list[str]  # entries no task model changes (LoRA adapters in delta space): left at θ₀

    def untouched_entries(self) -> int:
        """The untouched parameters as a flat task vector counts them: all zero."""
        return sum(self.pretrained.shape(key).numel() * self.multiplicity[key] for key in self.untouched)


def merge_inputs(pool: BaseModelPool, *, method: str, need_pretrained: bool, remove_keys: Sequence[str] = ()) -> MergeInputs:
    """The pool's state dicts, after checking that every task model matches the reference model
    (`_pretrained_`, else the first task model) key for key and shape for shape.

    remove_keys may name any state-dict name of a tied tensor: the tensor is left out once all its
    names are, and otherwise counts once per remaining name, as the reference flattens it.
    """
    if not pool.model_names:
        raise InputError(f"{method} needs at least one task model in the pool, besides {PRETRAINED}")
    untouched_keys = pool.untouched_keys()
    if (need_pretrained or untouched_keys) and not pool.has_pretrained:
        raise InputError(f"{method} needs the base model: add `{PRETRAINED}: <model>` under the pool's `models`")
    reference_name = PRETRAINED if need_pretrained or untouched_keys else pool.model_names[0]
    reference = pool.state_dict(reference_name)
    finetuned = {name: pool.state_dict(name) for name in pool.model_names}
    for name, state_dict in finetuned.items():
        _check_matches(name, state_dict, reference_name, reference)
    names = {alias for key in reference for alias in reference.aliases(key)}
    for key in remove_keys:
        if key not in names:
            raise InputError(f"remove_keys names {key!r}, which is not a key of model {reference_name!r}")
    multiplicity = {}
    for key in reference:
        kept = [alias for alias in reference.aliases(key) if alias not in remove_keys]
        if kept and reference.dtype(key).is_floating_point:
            multiplicity[key] = len(kept)
    return MergeInputs(
        reference if need_pretrained or untouched_keys else None,
        finetuned,
        keys=[key for key in multiplicity if key not in untouched_keys],
        multiplicity=multiplicity,
        untouched=[key for key in multiplicity if key in untouched_keys],
    )


def _check_matches(name: str, state_dict: LazyStateDict, reference_name: str, reference: LazyStateDict) -> None:
    for key in reference:
        if key not in state_dict:
            raise InputError(f"model {name!r} lacks {key!r}, which model {reference_name!r} has; are they the same architecture?")
        if state_dict.shape(key) != reference.shape(key):
            raise InputError(
                f"model {name!r} has {key!r} of shape {tuple(state_dict.shape(key))}, model {reference_name!r} "
                f"of shape {tuple(reference.shape(key))}; are they the same architecture?"
            )
    for key in state_dict:
        if key not in reference:
            raise InputError(f"model {name!r} has {key!r}, which model {reference_name!r} lacks; are they the same architecture?")


def output_model(pool: BaseModelPool, name: str, keys: Sequence[str], *, runs: bool = False) -> nn.Module:
    """A copy of model `name` to write the merge into, with fresh memory for the merged tensors.

    transformers maps checkpoint files into memory, so writing into a loaded model first copies
    each page from the file; fresh memory skips that copy (and the merge overwrites it all anyway).
    Where nothing will run the result (pool.merged_model_runs is false, and the method does not
    run it either: `runs`), the copy is the pool's unbuilt_copy if it has one.
    """
    model = None if runs or pool.merged_model_runs else pool.unbuilt_copy(name)
    if model is None:
        model = pool.load_model_copy(name)
    for key in keys:
        module_name, _, attribute = key.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = getattr(module, attribute)
        tensor.data = torch.empty_like(tensor.data)
    return model


def check_scaling_factor(scaling_factor: float) -> float:
    if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) or not math.isfinite(scaling_factor):
        raise InputError(f"scaling_factor={scaling_factor!r} must be a finite number, e.g. scaling_factor=0.3")
    return float(scaling_factor)


def check_remove_keys(remove_keys: Sequence[str] | None) -> list[str]:
    """TIES's remove_keys: the state-dict keys left out of the merge."""
    return check_string_list(remove_keys, "remove_keys", "keys", "[text_model.embeddings.position_ids]")
