"""fusion_bench: a Hydra-configured benchmark for model merging.

The base classes are importable from the top, as in FusionBench
(`from fusion_bench import BaseAlgorithm, BaseModelPool, BaseTaskPool`); each is imported on first
use, so `import fusion_bench` stays light.
"""

from importlib.metadata import version

from fusion_bench.utils.lazy_exports import lazy_exports
from fusion_bench.utils.torchvision_compat import ensure_torchvision_importable

ensure_torchvision_importable()  # before anything imports torchvision (transformers, open_clip do)

__version__ = version("fusion_bench")

_MODULES = {
    "BaseAlgorithm": "method.base",
    "BaseModelPool": "modelpool.base",
    "BaseTaskPool": "taskpool.base",
    "FabricModelFusionProgram": "programs.fusion_program",
}
__all__ = ["__version__", *_MODULES]

__getattr__ = lazy_exports(__name__, _MODULES)
