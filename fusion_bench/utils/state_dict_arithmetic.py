"""Arithmetic on state dicts (mappings from parameter names to tensors), key by key.

FusionBench's `fusion_bench.utils.state_dict_arithmetic`, with the same names, arguments and
results. State dicts come back as new OrderedDicts in the first input's key order, and the inputs
are left as they are (but for state_dict_to_device(..., inplace=True)). Sums are accumulated in place in the
first state dict's dtypes, so an integer tensor given a fractional weight raises torch's
RuntimeError, as in FusionBench.

Bad input raises InputError (a ValueError) with a one-line message: an empty list of state dicts,
an empty state dict, keys that differ, tensors under one key with different shapes or dtypes,
weights that do not pair up with the state dicts.
"""

import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import reduce
from typing import Literal

import torch
from torch import Tensor

from fusion_bench.utils.errors import InputError
from fusion_bench.utils.progress import progress_bar

__all__ = [
    "state_dict_sub",
    "state_dict_add",
    "state_dict_add_scalar",
    "state_dict_mul",
    "state_dict_div",
    "state_dict_power",
    "state_dict_avg",
    "state_dict_sum",
    "state_dict_weighted_sum",
    "state_dict_interpolation",
    "state_dict_diff_abs",
    "state_dict_binary_mask",
    "state_dict_hadamard_product",
    "state_dict_max",
    "state_dict_max_abs",
    "state_dict_flatten",
    "num_params_of_state_dict",
    "state_dict_to_device",
    "state_dicts_check_keys",
]

StateDict = Mapping[str, Tensor]
Device = torch.device | str

_COMPARISONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "greater": operator.gt,
    "less": operator.lt,
    "equal": operator.eq,
    "not_equal": operator.ne,
}


def _name_keys(keys: Iterable[str], shown: int = 5) -> str:
    """The first `shown` keys in sorted order, and how many there are in all if more."""
    keys = sorted(keys)
    listed = ", ".join(repr(key) for key in keys[:shown])
    return listed if len(keys) <= shown else f"{listed}, … ({len(keys)} in all)"


def _check_list(state_dicts: Sequence[StateDict]) -> None:
    """state_dicts is a non-empty list or tuple of non-empty mappings."""
    if not isinstance(state_dicts, (list, tuple)):
        raise TypeError(f"state_dicts must be a list or tuple of state dicts, not {type(state_dicts).__name__}")
    if not state_dicts:
        raise InputError("state_dicts is empty; give at least one state dict")
    for i, state_dict in enumerate(state_dicts):
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state dict {i} is a {type(state_dict).__name__}, not a mapping of names to tensors")
        if not state_dict:
            raise InputError(f"state dict {i} is empty")


def _check_same_layout(state_dicts: Sequence[StateDict]) -> None:
    """Every state dict has the first one's keys, each naming a tensor of the first one's shape
    and dtype. Nothing to check for fewer than two."""
    if len(state_dicts) < 2:
        return
    first = state_dicts[0]
    if not first:
        raise InputError("state dict 0 has no keys")
    for i, state_dict in enumerate(state_dicts[1:], start=1):
        if missing := first.keys() - state_dict.keys():
            raise InputError(f"state dict {i} lacks keys that state dict 0 has: {_name_keys(missing)}")
        if extra := state_dict.keys() - first.keys():
            raise InputError(f"state dict {i} has keys that state dict 0 lacks: {_name_keys(extra)}")
        for key, expected in first.items():
            tensor = state_dict[key]
            for index, value in ((0, expected), (i, tensor)):
                if not isinstance(value, Tensor):
                    raise TypeError(f"{key!r} is a {type(value).__name__} in state dict {index}, not a tensor")
            if tensor.shape != expected.shape:
                raise InputError(f"{key!r} has shape {list(expected.shape)} in state dict 0 but {list(tensor.shape)} in state dict {i}")
            if tensor.dtype != expected.dtype:
                raise InputError(f"{key!r} is {expected.dtype} in state dict 0 but {tensor.dtype} in state dict {i}")


def _check_pairs(state_dicts: Sequence[StateDict], weights: Sequence, name: str) -> None:
    """weights is a list or tuple with one entry per state dict."""
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple, not {type(weights).__name__}")
    if len(weights) != len(state_dicts):
        raise InputError(f"{len(state_dicts)} state dicts but {len(weights)} {name}; give one per state dict")


def _paired_keys(a: StateDict, b: StateDict, strict: bool) -> list[str]:
    """a's keys, checked to be b's (strict), or else only those b has too, in a's order."""
    if strict:
        _check_same_layout([a, b])
        return list(a)
    return [key for key in a if key in b]


def _progress(items: Iterable, desc: str, show_pbar: bool) -> Iterable:
    """items, under a progress bar if show_pbar (shown only on a terminal)."""
    return progress_bar(items, desc=desc) if show_pbar else items


def _sum_in_place(like: Tensor, terms: Iterable[Tensor]) -> Tensor:
    """zeros_like(like) + Σ terms, each added in place, so the sum keeps like's dtype."""
    total = torch.zeros_like(like)
    for term in terms:
        total += term
    return total


def state_dict_sub(a: StateDict, b: StateDict, strict: bool = True, device: Device | None = None) -> OrderedDict[str, Tensor]:
    """a − b. strict: the keys must match; else only the keys both have. device: where results go."""
    result = OrderedDict()
    for key in _paired_keys(a, b, strict):
        difference = a[key] - b[key]
        result[key] = difference if device is None else difference.to(device, non_blocking=True)
    return result


def state_dict_add(
    a: StateDict, b: StateDict, strict: bool = True, device: Device | None = None, show_pbar: bool = False
) -> OrderedDict[str, Tensor]:
    """a + b. strict: the keys must match; else only the keys both have. device: where results go."""
    keys = _paired_keys(a, b, strict)
    result = OrderedDict((key, a[key] + b[key]) for key in _progress(keys, "Adding state dicts", show_pbar))
    return result if device is None else state_dict_to_device(result, device)


def state_dict_add_scalar(state_dict: StateDict, scalar: float) -> OrderedDict[str, Tensor]:
    """θ + c for every tensor θ."""
    return OrderedDict((key, tensor + scalar) for key, tensor in state_dict.items())


def state_dict_mul(
    state_dict: StateDict, scalar: float, *, keep_dtype_when_zero: bool = True, show_pbar: bool = False
) -> OrderedDict[str, Tensor]:
    """c·θ for every tensor θ. keep_dtype_when_zero: a non-floating θ is copied as it is when c = 0
    or θ is all zeros (c·θ would be zeros of a floating dtype)."""
    result = OrderedDict()
    for key, tensor in _progress(state_dict.items(), "Multiplying state dict", show_pbar):
        keep = keep_dtype_when_zero and not tensor.is_floating_point() and (scalar == 0 or torch.all(tensor == 0))
        result[key] = tensor.clone() if keep else scalar * tensor
    return result


def state_dict_div(
    state_dict: StateDict, scalar: float, *, keep_dtype_when_zero: bool = True, show_pbar: bool = False
) -> OrderedDict[str, Tensor]:
    """θ / c for every tensor θ; ZeroDivisionError for c = 0. keep_dtype_when_zero: a non-floating θ
    that is all zeros is copied as it is (θ / c would be zeros of a floating dtype)."""
    if scalar == 0:
        raise ZeroDivisionError("cannot divide a state dict by zero")
    result = OrderedDict()
    for key, tensor in _progress(state_dict.items(), "Dividing state dict", show_pbar):
        keep = keep_dtype_when_zero and not tensor.is_floating_point() and torch.all(tensor == 0)
        result[key] = tensor.clone() if keep else tensor / scalar
    return result


def state_dict_power(state_dict: StateDict, p: float) -> OrderedDict[str, Tensor]:
    """θ^p, element-wise, for every tensor θ."""
    return OrderedDict((key, tensor**p) for key, tensor in state_dict.items())


def state_dict_sum(state_dicts: Sequence[StateDict]) -> OrderedDict[str, Tensor]:
    """Σ_i θ_i."""
    _check_list(state_dicts)
    _check_same_layout(state_dicts)
    first = state_dicts[0]
    return OrderedDict((key, _sum_in_place(first[key], (sd[key] for sd in state_dicts))) for key in first)


def state_dict_avg(state_dicts: Sequence[StateDict]) -> OrderedDict[str, Tensor]:
    """(1/n) Σ_i θ_i, divided in place: an integer tensor raises RuntimeError, as in FusionBench."""
    total = state_dict_sum(state_dicts)
    return OrderedDict((key, tensor.div_(len(state_dicts))) for key, tensor in total.items())


def state_dict_interpolation(state_dicts: Sequence[StateDict], scalars: Sequence[float]) -> OrderedDict[str, Tensor]:
    """Σ_i c_i·θ_i."""
    _check_list(state_dicts)
    _check_pairs(state_dicts, scalars, "scalars")
    _check_same_layout(state_dicts)
    first = state_dicts[0]
    return OrderedDict(
        (key, _sum_in_place(first[key], (scalar * sd[key] for sd, scalar in zip(state_dicts, scalars)))) for key in first
    )


def state_dict_weighted_sum(
    state_dicts: Sequence[StateDict], weights: Sequence[float], device: Device | None = None
) -> OrderedDict[str, Tensor]:
    """Σ_i w_i·θ_i, leaving out the terms with w_i = 0 and adding θ_i as it is where w_i = 1 (so an
    integer tensor keeps its dtype under 0/1 weights). device: where results go."""
    _check_list(state_dicts)
    _check_pairs(state_dicts, weights, "weights")
    _check_same_layout(state_dicts)
    result = OrderedDict()
    for key, like in state_dicts[0].items():
        terms = (sd[key] if w == 1.0 else w * sd[key] for sd, w in zip(state_dicts, weights) if w != 0.0)
        total = _sum_in_place(like, terms)
        result[key] = total if device is None else total.to(device, non_blocking=True)
    return result


def state_dict_diff_abs(a: StateDict, b: StateDict) -> OrderedDict[str, Tensor]:
    """|a − b|; the keys must match."""
    return OrderedDict((key, difference.abs()) for key, difference in state_dict_sub(a, b).items())


def state_dict_binary_mask(
    a: StateDict,
    b: StateDict,
    compare_fn: Literal["greater", "less", "equal", "not_equal"] | Callable[[Tensor, Tensor], Tensor] = "greater",
    strict: bool = True,
    show_pbar: bool = False,
) -> OrderedDict[str, Tensor]:
    """compare_fn(a, b), a boolean tensor per key: a > b, a < b, a == b, a != b, or any callable."""
    if isinstance(compare_fn, str):
        if compare_fn not in _COMPARISONS:
            raise InputError(f"compare_fn={compare_fn!r} is unknown; use one of {', '.join(_COMPARISONS)} or a callable")
        compare_fn = _COMPARISONS[compare_fn]
    elif not callable(compare_fn):
        raise InputError(f"compare_fn must be a name or a callable, not {type(compare_fn).__name__}")
    keys = _paired_keys(a, b, strict)
    return OrderedDict((key, compare_fn(a[key], b[key])) for key in _progress(keys, "Creating binary masks", show_pbar))


def state_dict_hadamard_product(a: StateDict, b: StateDict) -> OrderedDict[str, Tensor]:
    """a ⊙ b, element-wise; the keys must match."""
    return OrderedDict((key, a[key] * b[key]) for key in _paired_keys(a, b, strict=True))


def state_dict_max(state_dicts: Sequence[StateDict]) -> OrderedDict[str, Tensor]:
    """max_i θ_i, element-wise."""
    _check_list(state_dicts)
    _check_same_layout(state_dicts)
    first, rest = state_dicts[0], state_dicts[1:]
    return OrderedDict((key, reduce(torch.max, (sd[key] for sd in rest), first[key].clone())) for key in first)


def state_dict_max_abs(state_dicts: Sequence[StateDict]) -> OrderedDict[str, Tensor]:
    """max_i |θ_i|, element-wise."""
    _check_list(state_dicts)
    _check_same_layout(state_dicts)
    first, rest = state_dicts[0], state_dicts[1:]
    return OrderedDict((key, reduce(torch.max, (sd[key].abs() for sd in rest), first[key].abs())) for key in first)


def state_dict_flatten(state_dict: StateDict) -> Tensor:
    """Every tensor flattened and concatenated in key order, as one 1-D tensor."""
    return torch.cat([tensor.flatten() for tensor in state_dict.values()])


def num_params_of_state_dict(state_dict: StateDict) -> int:
    """Σ numel(θ) over the tensors (a tensor under two names counts twice)."""
    return sum(tensor.numel() for tensor in state_dict.values())


def state_dict_to_device(
    state_dict: StateDict, device: Device, copy: bool = False, inplace: bool = False
) -> StateDict:
    """Every tensor moved to device (copied even if already there when copy); inplace: written back
    into state_dict, which is returned, instead of into a new OrderedDict."""
    result = state_dict if inplace else OrderedDict()
    for key, tensor in state_dict.items():
        result[key] = tensor.to(device, non_blocking=True, copy=copy)
    return result


def state_dicts_check_keys(state_dicts: Sequence[StateDict]) -> None:
    """Raise InputError unless state_dicts is a non-empty list of non-empty state dicts with the
    same keys, each naming tensors of one shape and dtype."""
    _check_list(state_dicts)
    _check_same_layout(state_dicts)
