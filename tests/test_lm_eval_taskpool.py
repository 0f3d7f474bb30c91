"""LMEvalHarnessTaskPool: lm-eval run in process on a tiny Llama, on a multiple-choice task whose
data and YAML are written locally; its accuracy must be the one computed by hand from the model's
log-likelihoods of each choice."""

import json
import random
from pathlib import Path

import pytest
import torch

from fusion_bench.utils.errors import InputError
from tests.conftest import run_cli
from tests.llm_fixtures import WORDS, write_causal_lm_pool

pytest.importorskip("lm_eval", reason="pip install -e .[lmeval]")

TASK = "tiny_choice"


def write_task(folder: Path, documents: list[dict]) -> Path:
    """A local multiple-choice task: lm-eval's json loader over a .jsonl file."""
    folder.mkdir(parents=True)
    (folder / "docs.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in documents))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'docs.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return folder


def random_documents(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"question": " ".join(rng.choices(WORDS, k=rng.randint(2, 5))),
         "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(rng.randint(2, 4))],
         "label": 0}
        for _ in range(count)
    ]  # fmt: skip


def choice_log_likelihoods(model, tokenizer, context: str, choices: list[str]) -> list[float]:
    """Σ log p(continuation token) for each choice, tokenized as lm-eval does: context + " " +
    choice encoded whole, the continuation being the tokens after the context's own."""
    context_ids = tokenizer(context)["input_ids"]
    scores = []
    for choice in choices:
        ids = tokenizer(context + " " + choice)["input_ids"]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
        scores.append(sum(float(log_probs[i - 1, ids[i]]) for i in range(len(context_ids), len(ids))))
    return scores


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    pool = write_causal_lm_pool(root / "pool", tasks=("task_a", "task_b"), dtype=torch.float32)  # fp32: no ties between choices
    documents = random_documents(12)
    return {"root": root, "pool": pool, "documents": documents, "tasks": write_task(root / "tasks", documents)}


@pytest.fixture(scope="module")
def evaluated(world):
    """One lm-eval run of the base model, with its samples written: the pool, the report, the model."""
    from transformers import AutoModelForCausalLM

    from fusion_bench.taskpool import LMEvalHarnessTaskPool

    taskpool = LMEvalHarnessTaskPool(
        tasks=[TASK], include_path=str(world["tasks"]), include_defaults=False, tokenizer=str(world["pool"] / "tokenizer"),
        batch_size=5, output_path=str(world["root"] / "lm_eval_out"), log_samples=True,
    )  # fmt: skip
    taskpool.prepare()
    model = AutoModelForCausalLM.from_pretrained(world["pool"] / "base")
    return taskpool, taskpool.evaluate(model), model


def test_accuracy_is_the_argmax_of_the_choices_log_likelihoods(world, evaluated):
    from transformers import AutoTokenizer

    _, report, model = evaluated
    tokenizer = AutoTokenizer.from_pretrained(world["pool"] / "tokenizer")
    hits, norm_hits = [], []
    for doc in world["documents"]:
        scores = choice_log_likelihoods(model, tokenizer, doc["question"], doc["choices"])
        hits.append(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
        normalized = [score / len(choice) for score, choice in zip(scores, doc["choices"])]  # lm-eval: per character
        norm_hits.append(max(range(len(normalized)), key=normalized.__getitem__) == doc["label"])
    accuracy = sum(hits) / len(hits)
    assert 0 < accuracy < 1  # a test that can tell right from wrong
    metrics = report[TASK]
    assert metrics["acc"] == pytest.approx(accuracy, abs=1e-12)
    assert metrics["acc_norm"] == pytest.approx(sum(norm_hits) / len(norm_hits), abs=1e-12)
    assert metrics["acc_stderr"] > 0 and "alias" not in metrics
    assert report["average"]["acc"] == metrics["acc"] and report["model_info"]["all_params"] > 0


def test_written_samples_hold_the_same_log_likelihoods(world, evaluated):
    from transformers import AutoTokenizer

    _, _, model = evaluated
    tokenizer = AutoTokenizer.from_pretrained(world["pool"] / "tokenizer")
    out = world["root"] / "lm_eval_out"
    [results] = out.glob("results_*.json")
    assert json.loads(results.read_text())["results"][TASK]["acc,none"] >= 0
    [samples] = out.glob(f"samples_{TASK}_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == len(world["documents"])
    for row in rows:
        doc = world["documents"][row["doc_id"]]
        logged = [response[0][0] for response in row["resps"]]
        assert logged == pytest.approx(choice_log_likelihoods(model, tokenizer, doc["question"], doc["choices"]), abs=1e-4)


def test_a_second_run_writes_new_files_beside_the_first(world, evaluated):
    taskpool, _, model = evaluated
    out = world["root"] / "lm_eval_out"
    before = {path: path.read_bytes() for path in out.iterdir()}
    taskpool.limit = 2  # quick
    taskpool.evaluate(model)
    assert {path: path.read_bytes() for path in before} == before  # untouched
    assert len(list(out.glob("results_*.json"))) == 2


def test_unknown_task_is_refused_before_merging(world):
    from fusion_bench.taskpool import LMEvalHarnessTaskPool

    taskpool = LMEvalHarnessTaskPool(tasks=[TASK + "s"], include_path=str(world["tasks"]), include_defaults=False)
    with pytest.raises(InputError, match=rf"no task '{TASK}s' \(did you mean {TASK}\b.*lm-eval ls tasks.*include_path") as error:
        taskpool.prepare()
    assert "\n" not in str(error.value)


def test_bad_keys_are_refused_in_one_line(world):
    from fusion_bench.taskpool import LMEvalHarnessTaskPool

    for kwargs, fragment in (
        ({"include_path": str(world["root"] / "missing")}, "include_path"),
        ({"batch_size": 0}, "batch_size"),
        ({"log_samples": True}, "needs output_path"),
        ({"device": "cuda"}, "device"),
        ({"include_defaults": False}, "include_defaults"),
    ):
        with pytest.raises(InputError, match=fragment):
            LMEvalHarnessTaskPool(tasks=[TASK], **kwargs)
    (world["root"] / "a_file").write_text("mine")
    with pytest.raises(InputError, match="is a file"):
        LMEvalHarnessTaskPool(tasks=[TASK], include_path=str(world["tasks"]), output_path=str(world["root"] / "a_file")).prepare()


def test_cli_merges_and_scores_with_the_model_pools_tokenizer(world, tmp_path):
    """End to end: simple average of a CausalLMPool, scored by lm-eval with the pool's tokenizer
    (no taskpool.tokenizer); lm-eval's results land in the run's folder."""
    pool = world["pool"]
    config = tmp_path / "config" / "modelpool"
    config.mkdir(parents=True)
    (config / "tiny_llama.yaml").write_text(
        f"_target_: fusion_bench.modelpool.CausalLMPool\ntokenizer: {pool / 'tokenizer'}\n"
        f"models:\n  _pretrained_: {pool / 'base'}\n  task_a: {pool / 'task_a'}\n  task_b: {pool / 'task_b'}\n"
    )
    run = tmp_path / "run"
    run_cli("--config-dir", str(tmp_path / "config"), "method=simple_average", "modelpool=tiny_llama", "taskpool=LMEvalHarnessTaskPool/lm_eval",
            f"taskpool.tasks=[{TASK}]", f"taskpool.include_path={world['tasks']}", "taskpool.include_defaults=false", "taskpool.limit=4", "fabric.accelerator=cpu", f"hydra.run.dir={run}", cwd=tmp_path)  # fmt: skip
    report = json.loads((run / "report.json").read_text())
    assert 0 <= report[TASK]["acc"] <= 1 and report["_fusion_bench_"]["status"] == "completed"
    [results] = (run / "lm_eval_results").glob("results_*.json")
    assert json.loads(results.read_text())["results"][TASK]["acc,none"] == report[TASK]["acc"]
