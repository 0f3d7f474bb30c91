"""Every data-free method through the `fusion_bench` command: one sweep over their configs on a
tiny BERT pool, each saved model equal to what the Python API merges with that config's keys."""

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModel

from fusion_bench.modelpool import AutoModelPool
from fusion_bench.reporting.report import meta
from fusion_bench.utils.instantiation import plain
from tests.conftest import TASKS, run_cli, write_pool_config

CONFIGS = "config/method"
# linear/weighted_average needs one weight per model; its own tests run it from the command line
METHODS = [
    "magmax/magmax",
    "task_singular_vector/TaskSingularVectorMerging",
    "isotropic_merging/iso_c",
    "isotropic_merging/iso_cts",
    "wudi/wudi",
    "dare/simple_average",
    "dare/task_arithmetic",
    "dare/ties_merging",
    "tall_mask/task_arithmetic",
    "consensus/task_arithmetic",
    "consensus/ties_merging",
    "breadcrumbs/task_arithmetic",
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, bert_pool_dir):
    workdir = tmp_path_factory.mktemp("data_free_cli")
    write_pool_config(workdir / "config", bert_pool_dir)
    run_cli(
        "--multirun", "--config-dir", str(workdir / "config"), "modelpool=tiny_bert", "taskpool=dummy", f"method={','.join(METHODS)}",
        "seed=7", "merged_model_save_path=${hydra:runtime.output_dir}/merged", f"hydra.sweep.dir={workdir / 'sweep'}", cwd=workdir,
    )  # fmt: skip
    runs = {}
    for path in (workdir / "sweep").glob("*/report.json"):
        report = json.loads(path.read_text())
        (method,) = [override.removeprefix("method=") for override in meta(report)["overrides"] if override.startswith("method=")]
        runs[method] = (report, path.parent)
    return runs


@pytest.mark.parametrize("method", METHODS)
def test_the_command_saves_what_the_python_api_merges(sweep, bert_pool_dir, method):
    report, job = sweep[method]
    config = OmegaConf.load(f"{CONFIGS}/{method}.yaml")
    assert plain(meta(report)["config"]["method"]) == plain(config)  # the file's keys, as run
    torch.manual_seed(7)  # the program's seed, which DARE's masks follow
    pool = AutoModelPool({"_pretrained_": str(bert_pool_dir / "pretrained"), **{t: str(bert_pool_dir / t) for t in TASKS}})
    merged = instantiate(config).run(pool)
    expected = {task: merged[task] for task in TASKS} if meta(report)["per_task_models"] else {"": merged}
    assert meta(report)["per_task_models"] in (None, list(TASKS))
    for name, model in expected.items():
        loaded = AutoModel.from_pretrained(job / "merged" / name).state_dict()
        for key, value in model.state_dict().items():
            assert torch.equal(loaded[key], value), (name, key)
