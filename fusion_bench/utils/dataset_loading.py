"""Datasets named in configs, as FusionBench writes them: a `_target_` config (usually
`datasets.load_dataset` with a hub id or local folder), a bare hub id or folder, or a dataset object.
"""

from collections.abc import Mapping
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate

from fusion_bench.utils.errors import InputError, first_line
from fusion_bench.utils.instantiation import plain


def load_dataset_spec(name: str, spec: Any, split: str) -> Any:
    """The dataset `spec` describes; a bare id or folder loads its `split`."""
    spec = plain(spec)
    try:
        if isinstance(spec, Mapping) and "_target_" in spec:
            return instantiate(spec)
        if isinstance(spec, str):
            import datasets

            return datasets.load_dataset(spec, split=split)
    except (InstantiationException, OSError, ValueError) as error:
        cause = error.__cause__ or error
        raise InputError(
            f"dataset {name!r} cannot be loaded ({type(cause).__name__}: {first_line(cause)}); "
            "check its path or hub id, your network, or the cache (HF_DATASETS_OFFLINE=1)"
        ) from error
    if isinstance(spec, Mapping):
        raise InputError(f"dataset {name!r} is a config without `_target_`; e.g. _target_: datasets.load_dataset")
    return spec
