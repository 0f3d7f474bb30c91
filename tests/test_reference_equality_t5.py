"""fusion_bench reproduces the reference FusionBench 0.2.33 on Flan-T5-like pools, tied embeddings
included, from checkpoints as transformers 4.x writes them.

tests/data/reference_t5_merges.safetensors holds a tiny T5 built in transformers 4.x (the embeddings
under three names, an lm_head of its own), three full fine-tunes, three LoRA adapters, and the
reference's merges of both pools; scripts/make_reference_t5_fixtures.py records it in the
reference's own venv. Where the reference refuses a case, fusion_bench's answer is checked
against the dense oracle instead.
"""

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import T5Config

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.modelpool import Seq2SeqLMPool
from fusion_bench.tasks.glue import GLUE_TASKS
from tests import oracles

FIXTURES = Path(__file__).parent / "data" / "reference_t5_merges.safetensors"
METHODS = {"ties_merging": TiesMergingAlgorithm, "task_arithmetic": TaskArithmeticAlgorithm, "simple_average": SimpleAverageAlgorithm}
EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")

with safe_open(FIXTURES, "pt") as _file:
    METADATA = _file.metadata()
    TENSORS = {key: _file.get_tensor(key) for key in _file.keys()}
CASES = json.loads(METADATA["cases"])


def prefixed(prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in TENSORS.items() if key.startswith(prefix)}


@functools.cache
def pool_folders(root: Path) -> dict:
    """The fixture's models as a hub user has them: Hugging Face folders in the 4.x layout, and
    peft adapter folders."""
    T5Config(**json.loads(METADATA["t5_config"])).save_pretrained(root / "config")
    folders = {"root": root, "full": {}, "lora": {}}
    for name in ("_pretrained_", "task0", "task1", "task2"):
        folder = root / "full" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text((root / "config" / "config.json").read_text())
        save_file(prefixed(f"input/full/{name}/"), str(folder / "model.safetensors"))
        folders["full"][name] = folder
    folders["lora"]["_pretrained_"] = folders["full"]["_pretrained_"]
    for name in ("task0", "task1", "task2"):
        folder = root / "lora" / name
        folder.mkdir(parents=True)
        (folder / "adapter_config.json").write_text(METADATA["adapter_config"])
        save_file(prefixed(f"adapter/{name}/"), str(folder / "adapter_model.safetensors"))
        folders["lora"][name] = folder
    return folders


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return pool_folders(tmp_path_factory.mktemp("reference_t5"))


def merge_spaces(case):
    return ["dense", "delta"] if case["pool"] == "lora" else ["dense"]


@functools.cache
def loaded_lora_pool(root: Path) -> dict:
    """The LoRA pool as the dense space loads it (peft, merge_and_unload), loaded once: the dense
    space reading it is tested in test_seq2seq_lm_pool.py, and loading is most of a case's time."""
    pool = Seq2SeqLMPool({name: str(path) for name, path in pool_folders(root)["lora"].items()})
    return {name: pool.load_model(name) for name in pool.all_model_names}


@pytest.mark.parametrize("case", [c for c in CASES if "error" not in c], ids=lambda c: c["case"])
def test_matches_reference(case, folders):
    expected = prefixed(f"output/{case['case']}/")
    for merge_space in merge_spaces(case):
        if case["pool"] == "lora" and merge_space == "dense":
            pool = loaded_lora_pool(folders["root"])
        else:
            pool = Seq2SeqLMPool({name: str(path) for name, path in folders[case["pool"]].items()}, merge_space=merge_space)
        merged = METHODS[case["method"]](**case["params"]).run(pool)
        assert merged.shared.weight is merged.encoder.embed_tokens.weight is merged.decoder.embed_tokens.weight
        assert merged.lm_head.weight is not merged.shared.weight
        state = merged.state_dict()
        assert set(expected) == {key for key in state if key not in EMBEDDINGS[1:]}
        for key, value in expected.items():
            assert (state[key] - value).abs().max().item() <= 1e-6, (merge_space, key)


@pytest.mark.parametrize("case", [c for c in CASES if "error" in c], ids=lambda c: c["case"])
def test_where_the_reference_refuses_tied_remove_keys_the_embeddings_count_once(case, folders):
    """The reference cannot load its result when remove_keys names two of the embeddings' names
    (it re-ties them only for its older `transformer.`-prefixed T5 wrapper); fusion_bench merges
    the embeddings once, counted once, as that wrapper's configs meant."""
    assert "Missing key(s)" in case["error"] and set(case["params"]["remove_keys"]) == set(EMBEDDINGS[1:])
    pool = Seq2SeqLMPool({name: str(path) for name, path in folders[case["pool"]].items()})
    states = {name: pool.load_model(name).state_dict() for name in pool.all_model_names}
    keys = [key for key in states["_pretrained_"] if key not in EMBEDDINGS[1:]]
    params = {k: v for k, v in case["params"].items() if k != "remove_keys"}
    expected = oracles.ties(states["_pretrained_"], [states[n] for n in pool.model_names], keys, **params)
    for merge_space in merge_spaces(case):
        pool = Seq2SeqLMPool({name: str(path) for name, path in folders[case["pool"]].items()}, merge_space=merge_space)
        merged = TiesMergingAlgorithm(**case["params"]).run(pool).state_dict()
        for key in keys:
            assert (merged[key] - expected[key]).abs().max().item() <= 1e-6, key


def test_fixtures_exercise_the_ties_and_the_prompts():
    assert len(CASES) == 16 and sum("error" in c for c in CASES) == 2
    pretrained, task = prefixed("input/full/_pretrained_/"), prefixed("input/full/task0/")
    assert "lm_head.weight" in pretrained and not set(EMBEDDINGS[1:]) & set(pretrained)  # the 4.x layout
    # the embeddings move most, so how many times they count decides the cut
    assert (task["shared.weight"] - pretrained["shared.weight"]).abs().mean() > 3 * (task["lm_head.weight"] - pretrained["lm_head.weight"]).abs().mean()
    for name, template in json.loads(METADATA["glue_prompt_templates"]).items():
        ours = GLUE_TASKS[name]
        assert ours.prompt == template["input_text"]
        labels = template["target_text"]
        assert ours.label_words == (None if isinstance(labels, str) else tuple(labels[str(i)] for i in range(len(labels))))
