"""Flan-T5's GLUE examples for the methods that learn from data: a Seq2SeqLMPool serves the task
pool's prompts, the decoder's start token and the logits of the first answer token; Fisher merging,
RegMean and AdaMerging merge Flan-T5 models with them, from Python and from the command line."""

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from fusion_bench.merging.adamerging import entropy_loss
from fusion_bench.method import FisherMergingAlgorithm, RegMeanAlgorithm, RegMeanAlgorithmPlusPlus, TaskWiseAdaMergingAlgorithm
from fusion_bench.method.data_settings import DataloaderSettings
from fusion_bench.method.fisher_merging import fisher_diagonal
from fusion_bench.modelpool import Seq2SeqLMPool
from fusion_bench.modelpool.glue_task_data import FUSIONBENCH_GLUE_LOADER
from fusion_bench.taskpool import FlanT5GLUETextGenerationTaskPool
from fusion_bench.taskpool.tokenized_cache import tokenize_cached
from fusion_bench.tasks.glue import GLUE_TASKS, prompt_max_length
from fusion_bench.utils.errors import InputError
from tests.conftest import assert_one_line_error, run_cli
from tests.flan_t5_fixtures import LORA_TASKS, glue_dir, t5_pool_dir

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
MODELS = [f"glue-{task}" for task in LORA_TASKS]  # cola, rte (classes) and stsb (scores)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path / "cache"))


def glue_pool(**keys) -> Seq2SeqLMPool:
    root = t5_pool_dir()
    datasets = {name: name.removeprefix("glue-") for name in MODELS}
    given = {"train_datasets": datasets, "test_datasets": datasets, **keys}
    models = {"_pretrained_": str(root / "pretrained"), **{name: str(root / name) for name in MODELS}}
    return Seq2SeqLMPool(models, tokenizer=str(root / "pretrained"), dataset_path=str(glue_dir()), **given)


def test_batches_hold_the_task_pools_prompts_and_the_first_generated_tokens_logits():
    pool, model = glue_pool(), AutoModelForSeq2SeqLM.from_pretrained(t5_pool_dir() / "glue-rte").eval()
    tokenizer = AutoTokenizer.from_pretrained(t5_pool_dir() / "pretrained")
    taskpool = FlanT5GLUETextGenerationTaskPool(["rte"], tokenizer=str(t5_pool_dir() / "pretrained"), dataset_path=str(glue_dir()))
    prompts, _ = taskpool._examples("rte", GLUE_TASKS["rte"], "validation")
    scored = tokenize_cached(tokenizer, prompts, max_length=prompt_max_length(tokenizer))
    data = pool.task_data("glue-rte", split="test", num_examples=7, batch_size=3, seed=1)
    seen = []
    for start, batch in zip(range(0, 7, 3), data.batches):
        drawn = data.batches.indices[start : start + 3]
        assert batch.labels is None and batch.inputs["decoder_input_ids"].tolist() == [[0]] * len(drawn)
        for row, index in enumerate(drawn):  # the task pool's tokens, then padding
            length = len(scored[index])
            assert batch.inputs["input_ids"][row, :length].tolist() == scored[index].tolist()
            assert batch.inputs["attention_mask"][row].sum() == length
        with torch.no_grad():
            generated = model.generate(
                input_ids=batch.inputs["input_ids"], attention_mask=batch.inputs["attention_mask"], max_new_tokens=1,
                do_sample=False, output_logits=True, return_dict_in_generate=True,
            )  # fmt: skip
            logits = data.logits(model, batch)
        yes, no = (tokenizer.convert_tokens_to_ids(word) for word in GLUE_TASKS["rte"].label_words)
        torch.testing.assert_close(logits, generated.logits[0][:, [yes, no]], rtol=1e-5, atol=1e-5)
        seen += drawn
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 7


def test_train_examples_carry_class_ids_and_scores_their_first_token():
    pool = glue_pool()
    tokenizer = AutoTokenizer.from_pretrained(t5_pool_dir() / "pretrained")
    from datasets import load_dataset

    for name, task in (("glue-cola", "cola"), ("glue-stsb", "stsb")):
        rows = load_dataset(str(glue_dir()), task, split="train").to_list()
        data = pool.task_data(name, split="train", num_examples=None, batch_size=4, seed=0)
        labels = torch.cat([batch.labels for batch in data.batches]).tolist()
        if task == "cola":
            assert labels == [rows[i]["label"] for i in data.batches.indices]
            assert data.head.class_tokens.tolist() == tokenizer.convert_tokens_to_ids(["unacceptable", "acceptable"])
        else:  # no label words: the whole vocabulary, and the score's first token ("3.8" is one word here)
            assert labels == tokenizer.convert_tokens_to_ids([f"{rows[i]['label']:.1f}" for i in data.batches.indices])
            assert data.head.class_tokens is None
            batch = data.batches[0]
            logits = data.logits(AutoModelForSeq2SeqLM.from_pretrained(t5_pool_dir() / name), batch)
            assert logits.shape == (len(batch), len(tokenizer))


def test_fusion_bench_s_glue_loader_entries_serve_the_same_examples():
    tokenizer = {"_target_": "transformers.AutoTokenizer.from_pretrained", "pretrained_model_name_or_path": "google/flan-t5-base"}
    theirs = {name: {"_target_": FUSIONBENCH_GLUE_LOADER, "_recursive_": False, "name": name[5:], "tokenizer": tokenizer, "split": "validation"} for name in MODELS}
    ours = glue_pool().task_data("glue-cola", split="test", num_examples=5, batch_size=2)
    given = glue_pool(test_datasets=theirs).task_data("glue-cola", split="test", num_examples=5, batch_size=2)
    assert given.fingerprint == ours.fingerprint and given.batches[1].inputs["input_ids"].equal(ours.batches[1].inputs["input_ids"])
    assert glue_pool(test_datasets={name: {"name": name[5:], "split": "train"} for name in MODELS}).task_data(
        "glue-cola", split="test", num_examples=5, batch_size=2
    ).fingerprint != ours.fingerprint  # another split, other examples


@pytest.mark.parametrize(
    "entry, fragment",
    [
        ({"_target_": "datasets.load_dataset", "path": "x"}, "serves GLUE tasks only"),
        ({"name": "rte", "splt": "train"}, "unknown key 'splt'"),
        ("imdb", "'imdb' is not a GLUE task"),
        (3, "give a GLUE task name"),
    ],
)
def test_bad_dataset_entries_are_one_line_errors(entry, fragment):
    with pytest.raises(InputError, match=fragment) as error:
        glue_pool(train_datasets={"glue-cola": entry, "glue-rte": "rte", "glue-stsb": "stsb"})
    assert "train_datasets.glue-cola" in str(error.value) and "\n" not in str(error.value)


def test_methods_are_refused_before_any_work_without_every_tasks_examples():
    pool = glue_pool(train_datasets={"glue-cola": "cola"})
    for method in (RegMeanAlgorithm(num_regmean_examples=4), FisherMergingAlgorithm(num_fisher_examples=4)):
        with pytest.raises(InputError, match="train_datasets lacks 'glue-rte'"):
            method.check_modelpool(pool)
    glue_pool(train_datasets={}).check_task_data("test", "AdaMerging")  # test inputs are there
    with pytest.raises(InputError, match="asks for 11 train examples of task 'cola', which has 10"):
        glue_pool().task_data("glue-cola", split="train", num_examples=11, batch_size=4)


def test_regmean_plusplus_refuses_an_encoder_decoder():
    with pytest.raises(InputError, match="encoder-decoder"):
        RegMeanAlgorithmPlusPlus(num_regmean_examples=4).run(glue_pool())


def test_the_empirical_fisher_of_a_t5_is_the_mean_squared_gradient_of_the_answer_token():
    pool = glue_pool()
    model = pool.load_model("glue-rte")
    data = pool.task_data("glue-rte", split="train", num_examples=5, batch_size=2, seed=0)
    fisher = fisher_diagonal(model, data, "empirical", DataloaderSettings(batch_size=2), CPU)
    expected = 0
    for batch in data.batches:
        for i in range(len(batch)):
            model.zero_grad()
            one = {key: value[i : i + 1] for key, value in batch.inputs.items()}
            length = int(one["attention_mask"].sum())  # the example alone, without the batch's padding
            one["input_ids"], one["attention_mask"] = one["input_ids"][:, :length], one["attention_mask"][:, :length]
            log_p = torch.log_softmax(data.head(model(**one), None), dim=-1)[0, batch.labels[i]]
            log_p.backward()
            expected = expected + model.lm_head.weight.grad**2
    torch.testing.assert_close(fisher["lm_head.weight"], expected / 5, rtol=1e-4, atol=1e-9)
    assert fisher["lm_head.weight"].abs().sum() > 0


def test_regmean_on_t5_solves_the_normal_equations_of_encoder_and_decoder_layers():
    pool = glue_pool()
    method = RegMeanAlgorithm(num_regmean_examples=6, reduce_non_diagonal_ratio=0.5, dataloader_kwargs={"batch_size": 3})
    merged = method.run(pool).state_dict()
    for layer in ("encoder.block.0.layer.0.SelfAttention.q", "decoder.block.1.layer.1.EncDecAttention.k", "lm_head"):
        a = b = 0
        for name in MODELS:
            model, rows = pool.load_model(name), []
            handle = model.get_submodule(layer).register_forward_hook(lambda module, args, output: rows.append(args[0]))
            for batch in pool.task_data(name, split="train", num_examples=6, batch_size=3).batches:
                model(**batch.inputs)
                mask = batch.inputs["attention_mask"].bool()
                rows[-1] = rows[-1][mask] if rows[-1].shape[1] == mask.shape[1] else rows[-1].flatten(0, 1)
            handle.remove()
            x = torch.cat(rows).double().detach()
            gram = x.T @ x / len(x)
            reduced = 0.5 * gram + 0.5 * torch.diag(gram.diagonal())
            a, b = a + reduced, b + reduced @ model.get_submodule(layer).weight.double().T
        torch.testing.assert_close(merged[f"{layer}.weight"].double(), torch.linalg.solve(a, b).T, rtol=1e-4, atol=1e-5)


def test_adamerging_lowers_the_entropy_of_the_answers_on_glue_test_inputs():
    pool = glue_pool()
    method = TaskWiseAdaMergingAlgorithm(max_steps=8, lr=0.05, batch_size=10, init_values=0.3, num_workers=0)
    merged = method.run(pool)
    assert method.losses[-1] < method.losses[0]
    after = 0
    for name in MODELS:
        batch = pool.task_data(name, split="test", num_examples=None, batch_size=10).batches[0]
        with torch.no_grad():
            after += float(entropy_loss(pool.task_data(name, split="test", num_examples=None, batch_size=10).logits(merged, batch)))
    assert after < method.losses[0]


def write_t5_glue_config(folder: Path, with_train_examples: bool) -> Path:
    """config/modelpool/t5_glue.yaml under `folder`: the tiny Flan-T5 pool over the local GLUE."""
    root = t5_pool_dir()
    models = "".join(f"  {name}: {root / name}\n" for name in MODELS)
    entries = "train_datasets:\n" + "".join(f"  {name}: {{name: {name[5:]}, split: train}}\n" for name in MODELS)
    (folder / "config" / "modelpool").mkdir(parents=True)
    (folder / "config" / "modelpool" / "t5_glue.yaml").write_text(
        f"_target_: fusion_bench.modelpool.Seq2SeqLMPool\nmodels:\n  _pretrained_: {root / 'pretrained'}\n{models}"
        f"tokenizer: {root / 'pretrained'}\ndataset_path: {glue_dir()}\n" + (entries if with_train_examples else "")
    )
    return folder / "config"


def test_the_command_merges_flan_t5_with_regmean_and_scores_it(tmp_path):
    run, tokenizer = tmp_path / "run", t5_pool_dir() / "pretrained"
    run_cli(
        "--config-dir", str(write_t5_glue_config(tmp_path, True)), "modelpool=t5_glue", "method=regmean/regmean", "method.num_regmean_examples=6",
        "taskpool=flan-t5_glue_text_generation", "taskpool.tasks=[cola,rte]", f"taskpool.tokenizer={tokenizer}",
        f"taskpool.dataset_path={glue_dir()}", "fabric.accelerator=cpu", f"merged_model_save_path={run / 'merged'}", f"hydra.run.dir={run}", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads((run / "report.json").read_text())
    assert all(0 <= report[task]["score"] <= 1 for task in ("cola", "rte"))
    config = OmegaConf.merge(OmegaConf.load(ROOT / "config" / "method" / "regmean" / "regmean.yaml"), {"num_regmean_examples": 6})
    expected = instantiate(config).run(glue_pool()).state_dict()
    saved = AutoModelForSeq2SeqLM.from_pretrained(run / "merged").state_dict()
    assert all(torch.equal(saved[key], value) for key, value in expected.items())


def test_a_pool_without_train_examples_is_refused_in_one_line(tmp_path):
    result = run_cli(
        "--config-dir", str(write_t5_glue_config(tmp_path, False)), "modelpool=t5_glue", "method=fisher_merging/fisher_merging",
        "taskpool=dummy", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert_one_line_error(result, "train_datasets lacks 'glue-cola'")
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").glob("report*.json"))
