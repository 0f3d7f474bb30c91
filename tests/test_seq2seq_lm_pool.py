"""Seq2SeqLMPool: Flan-T5-like full models and LoRA adapters, dense and delta merge spaces, tied
embeddings merged once and kept tied."""

import json

import pytest
import torch
from transformers import AutoModelForSeq2SeqLM

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.modelpool import Seq2SeqLMPool
from fusion_bench.modelpool.lazy_state_dict import SafetensorsStateDict
from fusion_bench.modelpool.lora import LoraStateDict
from fusion_bench.utils.errors import InputError
from tests import oracles
from tests.flan_t5_fixtures import LORA_TASKS, t5_pool_dir, write_lora_adapter

EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
METHODS = [
    TiesMergingAlgorithm(scaling_factor=0.7, threshold=20),
    TiesMergingAlgorithm(scaling_factor=0.5, threshold=3, merge_func="mean"),
    TiesMergingAlgorithm(scaling_factor=0.5, threshold=60, merge_func="max"),
    TaskArithmeticAlgorithm(scaling_factor=0.4),
    SimpleAverageAlgorithm(),
]


def lora_pool(merge_space: str, **kwargs) -> Seq2SeqLMPool:
    root = t5_pool_dir()
    models = {f"glue-{task}": str(root / f"lora-{task}") for task in LORA_TASKS}
    return Seq2SeqLMPool(models, base_model=str(root / "pretrained"), merge_space=merge_space, **kwargs)


def full_pool() -> Seq2SeqLMPool:
    root = t5_pool_dir()
    return Seq2SeqLMPool({"_pretrained_": str(root / "pretrained"), **{f"glue-{t}": str(root / f"glue-{t}") for t in LORA_TASKS}})


def assert_tied_like_flan_t5(model):
    assert model.shared.weight is model.encoder.embed_tokens.weight is model.decoder.embed_tokens.weight
    assert model.lm_head.weight is not model.shared.weight


@pytest.mark.parametrize("method", METHODS, ids=lambda m: f"{type(m).__name__}{getattr(m, 'threshold', '')}")
def test_delta_space_merges_exactly_as_dense(method):
    """The adapters' task vectors, taken straight from their factors with the untouched weights
    left out (TIES counting them as zeros), give the merged model that merge_and_unload() gives:
    bit for bit, but for the simple average, whose dense sum of n equal weights divided by n may
    round away from the weight itself (delta space keeps it exact)."""
    dense = method.run(lora_pool("dense")).state_dict()
    delta_model = method.run(lora_pool("delta"))
    assert_tied_like_flan_t5(delta_model)
    tolerance = 1e-6 if isinstance(method, SimpleAverageAlgorithm) else 0
    for key, value in delta_model.state_dict().items():
        assert (value - dense[key]).abs().max() <= tolerance, key


def test_delta_space_reads_what_merge_and_unload_holds_and_knows_the_untouched_weights():
    dense, delta = lora_pool("dense"), lora_pool("delta")
    adapted = set()
    for task in LORA_TASKS:
        lazy = delta.state_dict(f"glue-{task}")
        assert isinstance(lazy, LoraStateDict) and lazy.aliases("shared.weight") == EMBEDDINGS
        merged = dense.load_model(f"glue-{task}").state_dict()
        for key in lazy:
            assert torch.equal(lazy[key], merged[key]), key
        adapted |= lazy.changed_keys
    assert any(key.endswith("DenseReluDense.wo.weight") for key in adapted)  # the third adapter targets wo too
    assert delta.untouched_keys() == set(delta.state_dict("_pretrained_")) - adapted
    assert "shared.weight" in delta.untouched_keys() and dense.untouched_keys() == set()


def test_full_models_are_read_lazily_with_flan_t5s_ties():
    """A checkpoint with its own lm_head keeps it untied (transformers 5 ties T5's by default);
    the three embedding names read as one tensor."""
    pool = full_pool()
    lazy = pool.state_dict("glue-cola")
    assert isinstance(lazy, SafetensorsStateDict)
    assert lazy.aliases("shared.weight") == EMBEDDINGS and lazy.aliases("lm_head.weight") == ("lm_head.weight",)
    loaded = pool.load_model("glue-cola")
    assert_tied_like_flan_t5(loaded)
    assert set(lazy) == {key for key in loaded.state_dict() if key not in EMBEDDINGS[1:]}
    for key in lazy:
        assert torch.equal(lazy[key], loaded.state_dict()[key]), key


@pytest.mark.parametrize("threshold", [5, 20, 60])
def test_ties_counts_the_tied_embeddings_three_times(threshold):
    """As FusionBench flattens state_dict(): the global cut and the majority sign see the
    embeddings under all three names; the result is read from memory or from files alike."""
    pool = full_pool()
    modules = {name: pool.load_model(name) for name in pool.all_model_names}
    params = dict(scaling_factor=0.7, threshold=threshold, merge_func="sum")
    from_files = TiesMergingAlgorithm(**params).run(pool)
    from_memory = TiesMergingAlgorithm(**params).run(modules)
    states = {name: model.state_dict() for name, model in modules.items()}
    keys = [key for key in states["_pretrained_"] if key not in EMBEDDINGS[1:]]
    expected = oracles.ties(
        states["_pretrained_"], [states[n] for n in pool.model_names], keys, multiplicity={"shared.weight": 3}, **params
    )
    for merged in (from_files, from_memory):
        assert_tied_like_flan_t5(merged)
        for key in keys:
            assert (merged.state_dict()[key] - expected[key]).abs().max() <= 1e-6, key


def test_remove_keys_may_name_any_of_the_tied_names():
    """Removing two of the three names counts the embeddings once (FusionBench's habit for its
    older T5 wrapper); removing all three keeps them pretrained."""
    pool = full_pool()
    states = {name: pool.load_model(name).state_dict() for name in pool.all_model_names}
    keys = [key for key in states["_pretrained_"] if key not in EMBEDDINGS[1:]]
    params = dict(scaling_factor=0.7, threshold=20, merge_func="sum")
    once = TiesMergingAlgorithm(remove_keys=list(EMBEDDINGS[1:]), **params).run(pool)
    expected = oracles.ties(states["_pretrained_"], [states[n] for n in pool.model_names], keys, **params)
    for key in keys:
        assert (once.state_dict()[key] - expected[key]).abs().max() <= 1e-6, key
    assert_tied_like_flan_t5(once)
    kept = TiesMergingAlgorithm(remove_keys=list(EMBEDDINGS), **params).run(pool)
    assert torch.equal(kept.shared.weight, states["_pretrained_"]["shared.weight"])
    assert not torch.equal(kept.lm_head.weight, states["_pretrained_"]["lm_head.weight"])


def test_merged_model_saves_and_reloads_with_its_ties(tmp_path):
    merged = TiesMergingAlgorithm(threshold=20).run(lora_pool("delta"))
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "merged")
    assert_tied_like_flan_t5(reloaded)
    for key, value in merged.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key


def test_fusionbench_entries_and_tokenizer():
    root = t5_pool_dir()
    base = str(root / "pretrained")
    pool = Seq2SeqLMPool(
        {
            "_pretrained_": {"_target_": "transformers.AutoModelForSeq2SeqLM.from_pretrained", "pretrained_model_name_or_path": base},
            "glue-cola": {
                "_target_": "fusion_bench.modelpool.seq2seq_lm.modelpool.load_lora_model",
                "base_model_path": base,
                "peft_model_path": str(root / "lora-cola"),
            },
        },
        base_model=base,
        tokenizer={"_target_": "transformers.AutoTokenizer.from_pretrained", "pretrained_model_name_or_path": base},
        merge_space="delta",
    )
    assert pool.model_spec("glue-cola") == str(root / "lora-cola") and pool.is_adapter("glue-cola")
    assert isinstance(pool.state_dict("glue-cola"), LoraStateDict)
    assert pool.load_tokenizer()("acceptable")["input_ids"] == lora_pool("dense").load_tokenizer()("acceptable")["input_ids"]


def test_bad_input_is_named(tmp_path):
    root = t5_pool_dir()
    with pytest.raises(InputError, match="merge_space='sparse' is unknown; use one of dense, delta"):
        lora_pool("sparse")
    with pytest.raises(InputError, match="base_model is .* but models._pretrained_ is"):
        Seq2SeqLMPool({"_pretrained_": str(root / "glue-cola"), "a": str(root / "lora-cola")}, base_model=str(root / "pretrained"))
    with pytest.raises(InputError, match="model 'a' is a LoRA adapter: add its base model as `_pretrained_: <model>`"):
        Seq2SeqLMPool({"a": str(root / "lora-cola")}).load_model("a")
    dora = write_lora_adapter(root / "pretrained", tmp_path / "dora", seed=9)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    pool = Seq2SeqLMPool({"_pretrained_": str(root / "pretrained"), "d": str(dora)}, merge_space="delta")
    with pytest.raises(InputError, match="adapter 'd' .* cannot be merged in delta space: .*; use merge_space: dense"):
        pool.state_dict("d")


@pytest.mark.parametrize(
    "config, base, model",
    [
        ("flan-t5-base_glue_lora16", "google/flan-t5-base", "tanganke/flan-t5-base_glue-{}_lora-16"),
        ("flan-t5-large_glue_lora16", "google/flan-t5-large", "tanganke/flan-t5-large_glue-{}_lora-16"),
        ("flan-t5-base_glue", "google/flan-t5-base", "tanganke/flan-t5-base_glue-{}"),
    ],
)
def test_shipped_configs_name_fusionbenchs_models(config, base, model):
    from hydra import compose, initialize_config_module

    from fusion_bench.tasks.glue import GLUE_TASKS
    from fusion_bench.utils.instantiation import instantiate_checked

    with initialize_config_module("fusion_bench_config", version_base=None):
        composed = compose("fusion_bench", overrides=[f"modelpool=Seq2SeqLMPool/{config}"]).modelpool
    pool = instantiate_checked(composed, "modelpool")  # nothing is fetched yet
    tasks = ["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"]
    assert pool.model_names == [f"glue-{task}" for task in tasks] and pool.model_spec("_pretrained_") == base
    assert [pool.model_spec(name) for name in pool.model_names] == [model.format(task) for task in tasks]
    assert pool.merge_space == "dense" and pool.dataset_path == "glue"
    # each model's GLUE examples for methods that learn from data: train, and the split scored
    assert pool._glue == {
        "train": {f"glue-{task}": (GLUE_TASKS[task], "train") for task in tasks},
        "test": {f"glue-{task}": (GLUE_TASKS[task], GLUE_TASKS[task].split) for task in tasks},
    }
