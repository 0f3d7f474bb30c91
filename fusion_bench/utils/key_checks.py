"""Checks shared by the methods' list-valued keys (remove_keys, exclude_keys, regex lists)."""

from collections.abc import Sequence
from typing import Any

from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import plain


def check_string_list(value: Any, key: str, what: str, example: str) -> list[str]:
    """`value` as a list of strings; None is the empty list. A lone string is refused: iterated,
    it would be read as its characters. `what` names the items ("keys"), `example` a valid value."""
    value = plain(value)
    if value is None:
        return []
    if isinstance(value, str):
        raise InputError(f"{key} must be a list of {what}, got the string {value!r}; write [{value!r}]")
    if not isinstance(value, Sequence) or not all(isinstance(item, str) for item in value):
        raise InputError(f"{key}={value!r} must be a list of {what}, e.g. {key}={example}")
    return list(value)
