"""The wheel carries the configs, so the CLI works from any directory once installed."""

import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_wheel_ships_every_config(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(REPO)],
        check=True,
    )
    (wheel,) = tmp_path.glob("fusion_bench-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {f"fusion_bench_config/{p.relative_to(REPO / 'config').as_posix()}" for p in (REPO / "config").rglob("*.yaml")}
    assert "fusion_bench_config/fusion_bench.yaml" in configs and configs <= names
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "fusion_bench").rglob("*.py")}
    assert modules <= names, f"missing from the wheel: {sorted(modules - names)[:3]} (list the package in pyproject.toml)"
    assert any(name.endswith("entry_points.txt") for name in names)


def test_pools_import_only_what_they_use():
    """Naming one pool imports that pool's module alone: a merge with the dummy task pool never
    pays for `datasets` and pandas (half a second to import, as long again at exit)."""
    code = (
        "import sys\n"
        "from fusion_bench.modelpool import AutoModelPool\n"
        "from fusion_bench.taskpool import DummyTaskPool\n"
        "print(sorted(m for m in ('datasets', 'pandas', 'fusion_bench.taskpool.text_classification') if m in sys.modules))\n"
        "import fusion_bench.taskpool as taskpool\n"
        "try:\n"
        "    taskpool.NoSuchPool\n"
        "except AttributeError as error:\n"
        "    print(error)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO).stdout.splitlines()
    assert output == ["[]", "module 'fusion_bench.taskpool' has no attribute 'NoSuchPool'"]
