"""torchvision importable beside a torch its compiled ops do not fit (fusion_bench.utils.torchvision_compat),
and nothing done where they fit or torchvision is absent. Needs neither open_clip nor torchvision."""

import os
import subprocess
import sys


def test_torchvision_imports_beside_a_torch_its_compiled_ops_do_not_fit(tmp_path):
    """A stand-in torchvision whose import registers fake kernels for nms/qnms, as torchvision's does
    whether or not its compiled library loaded: without the compat it fails as a mismatched CUDA
    build fails here; after ensure_torchvision_importable it imports, and transformers beside it."""
    package = tmp_path / "torchvision"
    package.mkdir()
    (package / "__init__.py").write_text(
        "import torch\n"
        "for op in ('nms', 'qnms'):\n"
        "    torch.library.register_fake(f'torchvision::{op}')(lambda dets, scores, iou_threshold: dets.new_empty(0, dtype=torch.long))\n"
        "__version__ = 'stand-in'\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], env=env, capture_output=True, text=True)
    assert plain.returncode != 0 and "operator torchvision::nms does not exist" in plain.stderr
    fixed = subprocess.run(
        [sys.executable, "-c", "import fusion_bench.utils.torchvision_compat as c, torchvision; print(c._library is not None, torchvision.__version__)"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert fixed.returncode == 0 and fixed.stdout.split() == ["True", "stand-in"], fixed.stderr


def test_the_compat_does_nothing_where_torchvision_s_library_loads_or_torchvision_is_absent(monkeypatch):
    from fusion_bench.utils import torchvision_compat

    monkeypatch.setattr(torchvision_compat, "_library", None)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    monkeypatch.setattr(torchvision_compat, "_compiled_ops_load", lambda package_dir, torch: True)
    assert torchvision_compat.ensure_torchvision_importable() is False and torchvision_compat._library is None
    monkeypatch.setattr(torchvision_compat.importlib.util, "find_spec", lambda name: None)
    assert torchvision_compat.ensure_torchvision_importable() is False
