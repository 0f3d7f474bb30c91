"""The docs site (mkdocs.yml): it builds with --strict (a broken link, a missing snippet or a page
outside the nav fails), lists every page, documents every module of the API reference's packages,
and shows every shipped config from its file, on configs.md and on the page of its method or pool."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE_PACKAGES = ("method", "modelpool", "taskpool", "merging", "utils")
CONFIG_GROUPS = ("method", "modelpool", "taskpool", "fabric", "hydra/launcher")
PAGE_FOLDERS = {"method": "methods", "modelpool": "modelpools", "taskpool": "taskpools"}
CONFIGS_WITHOUT_A_PAGE = {"config/taskpool/dummy.yaml"}  # no evaluation: nothing for a task pool page to say
# one documented object per package of the API reference, by the anchor mkdocstrings gives it
REFERENCE_OBJECTS = {
    "merging": "fusion_bench.merging.ties.ties_merge",
    "method": "fusion_bench.method.ties_merging.TiesMergingAlgorithm",
    "modelpool": "fusion_bench.modelpool.base.BaseModelPool",
    "taskpool": "fusion_bench.taskpool.base.BaseTaskPool",
    "utils": "fusion_bench.utils.errors.InputError",
}

pytest.importorskip("mkdocstrings", reason="pip install -e .[docs]")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return out


def nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += nav_pages(value) if isinstance(value, list) else [value]
    return pages


def test_every_page_is_in_the_nav_once():
    nav = nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    assert sorted(nav) == sorted(path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md"))
    assert len(nav) == len(set(nav))


def test_the_api_reference_documents_every_module(site):
    for package in REFERENCE_PACKAGES:
        page = (DOCS / "reference" / f"{package}.md").read_text()
        modules = sorted(
            "fusion_bench." + ".".join(path.relative_to(ROOT / "fusion_bench").with_suffix("").parts)
            for path in (ROOT / "fusion_bench" / package).rglob("*.py")
            if path.name != "__init__.py"
        )
        assert [line.removeprefix("::: ") for line in page.splitlines() if line.startswith("::: ")] == modules, package
    for package, anchor in REFERENCE_OBJECTS.items():
        assert f'id="{anchor}"' in (site / "reference" / package / "index.html").read_text(), anchor
    html = (site / "reference" / "merging" / "index.html").read_text()
    assert "streamed chunk by chunk with the exact global trim" in html  # the docstrings rendered, not just names


def test_every_shipped_config_is_shown_from_its_file(site):
    page = (DOCS / "configs.md").read_text()
    for group in CONFIG_GROUPS:
        for config in (ROOT / "config" / group).rglob("*.yaml"):
            assert f'--8<-- "{config.relative_to(ROOT).as_posix()}"' in page, config
    html = (site / "configs" / "index.html").read_text()
    assert "Keep the top" in html and "--8&lt;--" not in html  # the file's own comment, inlined


def test_each_method_and_pool_page_shows_its_configs_from_their_files(site):
    for group, folder in PAGE_FOLDERS.items():
        pages = "".join(page.read_text() for page in (DOCS / folder).glob("*.md"))
        for config in (ROOT / "config" / group).rglob("*.yaml"):
            name = config.relative_to(ROOT).as_posix()
            assert name in CONFIGS_WITHOUT_A_PAGE or f'--8<-- "{name}"' in pages, name
    assert "Keep the top" in (site / "methods" / "ties_merging" / "index.html").read_text()  # config/method/ties_merging.yaml's comment
    assert [page for page in site.rglob("*.html") if "--8&lt;--" in page.read_text()] == []  # every snippet inlined
