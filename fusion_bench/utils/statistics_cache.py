"""Statistics of a model on data that do not depend on the merge (Fisher diagonals, Gram
matrices), kept on disk so that a sweep over a method's other keys computes them once.

One safetensors file per (kind, key) under <cache>/statistics/<kind>/, written atomically; the key
must hash everything the statistics are computed from (model_fingerprint, TaskData.fingerprint,
the method's settings). Files are read back lazily, tensor by tensor.
"""

import logging
from collections.abc import Callable

from safetensors.torch import save_file
from torch import Tensor

from fusion_bench.modelpool.lazy_state_dict import LazyStateDict, SafetensorsStateDict
from fusion_bench.modelpool.safetensors_file import SafetensorsFile
from fusion_bench.utils.cache import cache_dir, fingerprint, write_atomically

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when a stored layout changes, so old files are not read


def cached_statistics(kind: str, key_parts: tuple, compute: Callable[[], dict[str, Tensor]], description: str = "") -> LazyStateDict:
    """The tensors `compute()` returns, from the cache when the same key was computed before.

    kind: a folder name ("fisher", "regmean_gram"); key_parts: JSON-able parts of the key.
    """
    path = cache_dir("statistics", kind) / f"{fingerprint(_FORMAT, *key_parts)}.safetensors"
    if path.is_file():
        log.info("%s: cached %s statistics (%s)", description or kind, kind, path)
    else:
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in compute().items()}
        write_atomically(path, lambda temporary: save_file(tensors, str(temporary)))
        del tensors
    return SafetensorsStateDict([SafetensorsFile(path)])
