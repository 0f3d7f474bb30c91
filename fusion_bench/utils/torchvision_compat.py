"""torchvision importable beside a torch whose build its compiled ops do not fit.

open_clip (and transformers, timm, lightning, where torchvision is installed) import torchvision.
torchvision's Python code registers fake (meta) kernels for its compiled ops `nms` and `qnms` at
import time; when its compiled library (`torchvision/_C.so`) cannot load, as a CUDA build of
torchvision cannot beside the CPU build of the same torch, those ops were never defined and the
import fails with "operator torchvision::nms does not exist". Then every later import of
transformers' models fails too, since transformers imports torchvision whenever it is installed.

`ensure_torchvision_importable()` first loads torchvision's compiled library itself, as
torchvision would: where it loads (a matching torchvision), the ops are torchvision's own and
nothing else is done. Only where it cannot load are the two ops' schemas defined, with no kernels,
so that torchvision's import goes through. What fusion_bench uses of torchvision (image transforms
on PIL images and tensors) is pure Python and works; calling nms, roi_align & co. still raises
(torchvision says its C++ ops could not be loaded, or that the op has no kernel), as it would on
that machine anyway.

It runs when `fusion_bench` is imported, before anything imports torchvision; it costs nothing
where torchvision is not installed (torch is not even imported then).
"""

import importlib.machinery
import importlib.util
import os
import sys

# The ops torchvision's Python code touches at import whether or not its library loaded
# (torchvision/_meta_registrations.py registers fake kernels for them unconditionally); the
# schemas are those torchvision's C++ code defines (csrc/ops/nms.cpp, quantized/cpu/qnms_kernel.cpp).
_IMPORT_TIME_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # the torch.library.Library holding the schemas: its registrations live as long as it does


def ensure_torchvision_importable() -> bool:
    """Make `import torchvision` work; True if its op schemas had to be defined here."""
    global _library
    if _library is not None or "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    import torch

    if _compiled_ops_load(os.path.dirname(spec.origin), torch):
        return False
    missing = {name: schema for name, schema in _IMPORT_TIME_OPS.items() if not _op_exists(torch, name)}
    if not missing:
        return False
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing.values():
        library.define(schema)
    _library = library
    return True


def _compiled_ops_load(package_dir: str, torch) -> bool:
    """Whether torchvision's compiled library loads (it then defines the ops itself); loading it
    again, as torchvision's import does next, is a no-op."""
    finder = importlib.machinery.FileFinder(package_dir, (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES))
    library = finder.find_spec("_C")
    if library is None or library.origin is None:
        return False
    try:
        torch.ops.load_library(library.origin)
    except (OSError, RuntimeError):
        return False
    return True


def _op_exists(torch, name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True
