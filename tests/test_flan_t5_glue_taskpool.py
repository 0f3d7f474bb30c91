"""The Flan-T5 GLUE task pool: prompts, batched greedy generation, scores and the counts of answers
that make no sense, checked by hand; tokenized prompts cached on disk."""

import math

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn
from transformers import AutoTokenizer

from fusion_bench.taskpool import FlanT5GLUETextGenerationTaskPool
from fusion_bench.taskpool.text_metrics import exact_match, spearman_of_scores
from fusion_bench.taskpool.tokenized_cache import tokenize_cached, tokenizer_fingerprint
from fusion_bench.tasks.glue import GLUE_TASKS
from fusion_bench.utils.errors import InputError
from tests.flan_t5_fixtures import glue_dir, t5_pool_dir, write_tokenizer


def test_exact_match_by_hand():
    # correct, wrong label word, no label word, correct
    assert exact_match(["yes", "no", "maybe", "yes"], ["yes", "yes", "no", "yes"], ["no", "yes"]) == {"accuracy": 0.5, "unparseable": 1}


def test_spearman_by_hand_counts_unparseable_answers_and_scores_them_zero():
    # parsed (1.5, 0.0, 2.5, 4.0) rank (2, 1, 3, 4) against (1, 2, 3, 4): ρ = 1 − 6·(1 + 1)/(4·(16 − 1)) = 0.8
    result = spearman_of_scores(["1.5", "similar", "2.5", "4.0"], ["1.0", "2.0", "3.0", "4.0"])
    assert result["unparseable"] == 1 and math.isclose(result["spearman_rho"], 0.8)
    assert spearman_of_scores(["nan", "inf", "3.0"], ["1.0", "2.0", "3.0"])["unparseable"] == 2
    assert math.isnan(spearman_of_scores(["x", "y", "z"], ["1.0", "2.0", "3.0"])["spearman_rho"])


class ScriptedModel(nn.Module):
    """Answers each prompt from a script, as generate() would: decoder start, answer, </s>, padding.
    Records the batches it is given."""

    def __init__(self, tokenizer, script: dict[tuple[int, ...], str]):
        super().__init__()
        self.tokenizer, self.script, self.batches = tokenizer, script, []
        self.anchor = nn.Parameter(torch.zeros(1))  # so the model has a device

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample, num_beams):
        assert not do_sample and num_beams == 1 and max_new_tokens == 9
        self.batches.append((input_ids.clone(), attention_mask.clone()))
        answers = [self.script[tuple(ids[mask.bool()].tolist())] for ids, mask in zip(input_ids, attention_mask)]
        encoded = [[0] + self.tokenizer(answer)["input_ids"] for answer in answers]
        output = torch.zeros(len(encoded), max(map(len, encoded)), dtype=torch.long)
        for row, ids in enumerate(encoded):
            output[row, : len(ids)] = torch.tensor(ids)
        return output


def scripted_answer(task: str, row: dict) -> str:
    """idx % 3 == 0: right; 1: wrong (another label word; for STS-B no number); 2: no label word
    (for STS-B the number 2.5)."""
    words = GLUE_TASKS[task].label_words
    if words is None:
        return [f"{row['label']:.1f}", "cat", "2.5"][row["idx"] % 3]
    return [words[row["label"]], words[(row["label"] + 1) % len(words)], "cat"][row["idx"] % 3]


@pytest.fixture(scope="module")
def tokenizer_path():
    return t5_pool_dir() / "pretrained"


def scripted_pool(tokenizer_path, tasks, max_samples=None, cache_dir=None):
    """A task pool and a model that answers its prompts by the script above."""
    from datasets import load_dataset

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    script = {}
    for task in tasks:
        for row in load_dataset(str(glue_dir()), task, split=GLUE_TASKS[task].split):
            prompt = tuple(tokenizer(GLUE_TASKS[task].render(row))["input_ids"])
            script[prompt] = scripted_answer(task, row)
    pool = FlanT5GLUETextGenerationTaskPool(
        tasks, tokenizer=str(tokenizer_path), dataset_path=str(glue_dir()), batch_size=3, max_samples=max_samples, cache_dir=cache_dir
    )
    return pool, ScriptedModel(tokenizer, script)


def test_scores_and_unparseable_counts_equal_a_hand_count(tokenizer_path, tmp_path):
    from datasets import load_dataset

    pool, model = scripted_pool(tokenizer_path, list(GLUE_TASKS), cache_dir=tmp_path)
    results = pool.evaluate_tasks(model)
    assert list(results) == list(GLUE_TASKS)
    for task, spec in GLUE_TASKS.items():
        rows = load_dataset(str(glue_dir()), task, split=spec.split).to_list()
        if spec.is_regression:
            scores = [float(f"{row['label']:.1f}") for row in rows]
            parsed = [[score, 0.0, 2.5][row["idx"] % 3] for score, row in zip(scores, rows)]  # "cat" counts as 0.0
            rho = spearmanr(parsed, scores).statistic
            assert results[task] == pytest.approx({"score": rho, "spearman_rho": rho, "unparseable": 3}, abs=1e-12)  # idx 1, 4, 7
        else:  # right: idx 0, 3, 6, 9; no label word: idx 2, 5, 8
            assert results[task] == {"score": 0.4, "accuracy": 0.4, "unparseable": 3}


def test_batches_are_sorted_by_length_and_padded_to_their_longest(tokenizer_path, tmp_path):
    pool, model = scripted_pool(tokenizer_path, ["rte"], cache_dir=tmp_path)
    pool.evaluate(model)
    lengths = [mask.sum(dim=1).tolist() for _, mask in model.batches]
    assert [len(batch) for batch in lengths] == [3, 3, 3, 1]
    flat = [length for batch in lengths for length in batch]
    assert flat == sorted(flat, reverse=True)
    for (input_ids, mask), batch in zip(model.batches, lengths):
        assert input_ids.shape[1] == max(batch)  # no padding beyond the batch's longest prompt
        assert (input_ids[mask == 0] == 0).all()


def test_max_samples_and_fusionbench_task_entries(tokenizer_path, tmp_path):
    pool, model = scripted_pool(tokenizer_path, ["rte", "mnli"], max_samples=4, cache_dir=tmp_path)
    pool = FlanT5GLUETextGenerationTaskPool(
        [{"name": "glue-rte", "dataset": {"name": "rte", "split": "validation"}}, "mnli"],
        tokenizer=str(tokenizer_path), dataset_path=str(glue_dir()), max_samples=4, cache_dir=str(tmp_path),
    )  # fmt: skip
    results = pool.evaluate_tasks(model)
    assert list(results) == ["glue-rte", "mnli"]
    assert sum(len(ids) for ids, _ in model.batches) == 8
    assert results["mnli"]["accuracy"] == 0.5  # idx 0 and 3 of the first four


def test_tokenized_prompts_are_cached_under_tokenizer_and_texts(tokenizer_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    texts = ["the cat sat", "a dog ran on the mat", "why"]
    first = tokenize_cached(tokenizer, texts, max_length=40, cache_dir=tmp_path)
    assert [first[i].tolist() for i in range(3)] == tokenizer(texts)["input_ids"]
    assert len(list(tmp_path.iterdir())) == 1

    class Refusing:
        backend_tokenizer = tokenizer.backend_tokenizer

        def __call__(self, *args, **kwargs):
            raise AssertionError("tokenized again instead of read from the cache")

    again = tokenize_cached(Refusing(), texts, max_length=40, cache_dir=tmp_path)
    assert torch.equal(again.ids, first.ids) and torch.equal(again.offsets, first.offsets)
    tokenize_cached(tokenizer, texts[:2], max_length=40, cache_dir=tmp_path)  # other texts (a template, a split)
    tokenize_cached(tokenizer, texts, max_length=8, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 3
    other = AutoTokenizer.from_pretrained(write_tokenizer(tmp_path / "other_tokenizer"))
    other.backend_tokenizer.add_tokens(["zebra"])
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)


def test_evaluation_fills_the_cache_once(tokenizer_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path))
    pool, model = scripted_pool(tokenizer_path, ["cola", "stsb"])
    first = pool.evaluate(model)
    cached = sorted((tmp_path / "tokenized").iterdir())
    assert len(cached) == 2
    assert pool.evaluate(model) == first and sorted((tmp_path / "tokenized").iterdir()) == cached


def test_bad_input_is_named(tokenizer_path, tmp_path):
    with pytest.raises(InputError, match="task 'wnli' is not a GLUE task; use one of cola, mnli"):
        FlanT5GLUETextGenerationTaskPool(["wnli"], tokenizer="t")
    with pytest.raises(InputError, match="max_samples=0 must be a positive integer or null"):
        FlanT5GLUETextGenerationTaskPool(["rte"], tokenizer="t", max_samples=0)
    with pytest.raises(InputError, match="lists a task twice"):
        FlanT5GLUETextGenerationTaskPool(["rte", "rte"], tokenizer="t")
    pool = FlanT5GLUETextGenerationTaskPool(["rte"], tokenizer=str(tokenizer_path), dataset_path=str(tmp_path / "no_glue"))
    with pytest.raises(InputError, match="cannot load GLUE task 'rte' .* from dataset_path="):
        pool.evaluate(ScriptedModel(None, {}))
