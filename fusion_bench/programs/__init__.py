"""Programs: what a command runs. The fusion program (model pool → method → task pool → report),
under FusionBench's name too, and the offline pool's fine-tuning program."""

from fusion_bench.utils.lazy_exports import lazy_exports

_MODULES = {
    "FabricModelFusionProgram": "fusion_program",
    "FinetuneProgram": "finetune_program",
    "FusionProgram": "fusion_program",
}
__all__ = list(_MODULES)

__getattr__ = lazy_exports(__name__, _MODULES)
