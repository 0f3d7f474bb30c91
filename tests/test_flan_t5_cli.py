"""`fusion_bench` end to end on Flan-T5-like LoRA adapters and GLUE: merge, evaluate, report."""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.modelpool import Seq2SeqLMPool
from fusion_bench.reporting.report import task_metrics
from fusion_bench.tasks.glue import GLUE_TASKS
from tests.conftest import run_cli
from tests.flan_t5_fixtures import LORA_TASKS, glue_dir, t5_pool_dir

METHODS = {"ties_merging": TiesMergingAlgorithm(), "task_arithmetic": TaskArithmeticAlgorithm(), "simple_average": SimpleAverageAlgorithm()}


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path / "cache"))
    # a tiny model's matrix products gain nothing from threads, which on a busy machine spin
    # for milliseconds waiting for each other
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root = t5_pool_dir()
    models = "\n".join(f"  glue-{task}: {root / f'lora-{task}'}" for task in LORA_TASKS)
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    (tmp_path / "config" / "modelpool" / "tiny_t5_lora.yaml").write_text(
        f"_target_: fusion_bench.modelpool.Seq2SeqLMPool\nbase_model: {root / 'pretrained'}\n"
        f"models:\n  _pretrained_: ${{..base_model}}\n{models}\nmerge_space: dense\n"
    )
    return tmp_path


@pytest.mark.parametrize(
    "method, merge_space, tasks",
    [("ties_merging", "delta", list(GLUE_TASKS)), ("task_arithmetic", "dense", ["rte", "stsb"]), ("simple_average", "delta", ["cola", "stsb"])],
)
def test_merge_and_evaluate_on_glue(workdir, method, merge_space, tasks):
    root = t5_pool_dir()
    saved = workdir / "merged"
    result = run_cli(
        "--config-dir", str(workdir / "config"),
        f"method={method}", "modelpool=tiny_t5_lora", f"modelpool.merge_space={merge_space}",
        "taskpool=flan-t5_glue_text_generation", f"taskpool.tasks=[{','.join(tasks)}]", f"taskpool.tokenizer={root / 'pretrained'}",
        f"taskpool.dataset_path={glue_dir()}", "taskpool.max_samples=6", "fabric.accelerator=cpu",
        f"merged_model_save_path={saved}", f"hydra.run.dir={workdir / 'run'}",
        cwd=workdir,
    )  # fmt: skip
    report = json.loads((workdir / "run" / "report.json").read_text())
    assert list(task_metrics(report)) == tasks
    for task, metrics in task_metrics(report).items():
        headline = "spearman_rho" if task == "stsb" else "accuracy"
        assert set(metrics) == {"score", headline, "unparseable"}
        assert metrics["score"] == metrics[headline] or (math_nan(metrics["score"]) and math_nan(metrics[headline]))
        assert 0 <= metrics["unparseable"] <= 6
        if headline == "accuracy":
            assert 0 <= metrics["accuracy"] <= 1
    assert set(report["average"]) == {"score", "accuracy", "unparseable", "spearman_rho"}
    assert "stsb" in result.stdout and "unparseable" in result.stdout
    assert len(list((workdir / "cache" / "tokenized").iterdir())) == len(tasks)
    # the model evaluated and saved is the one the Python API merges, with Flan-T5's ties
    pool = Seq2SeqLMPool(
        {"_pretrained_": str(root / "pretrained"), **{f"glue-{t}": str(root / f"lora-{t}") for t in LORA_TASKS}}, merge_space=merge_space
    )
    expected = METHODS[method].run(pool).state_dict()
    loaded = AutoModelForSeq2SeqLM.from_pretrained(saved)
    assert loaded.shared.weight is loaded.encoder.embed_tokens.weight and loaded.lm_head.weight is not loaded.shared.weight
    for key, value in expected.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def math_nan(value) -> bool:
    return value != value
