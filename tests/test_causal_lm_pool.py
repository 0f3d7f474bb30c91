"""CausalLMPool: Llama / Mistral / Qwen2 checkpoints, sharded and bf16, read lazily, merged in
float32 per chunk into a model of the input dtype, saved sharded; tied embeddings stay tied."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm, TiesMergingAlgorithm
from fusion_bench.modelpool import CausalLMPool
from fusion_bench.modelpool.lazy_state_dict import SafetensorsStateDict
from fusion_bench.utils.errors import InputError
from tests.conftest import assert_one_line_error, run_cli
from tests.llm_fixtures import FAMILIES, VOCAB, tiny_causal_lm, write_causal_lm, write_causal_lm_pool

TASKS = ("task_a", "task_b", "task_c")


def pool_of(root, **kwargs) -> CausalLMPool:
    return CausalLMPool({"_pretrained_": str(root / "base"), **{task: str(root / task) for task in TASKS}}, **kwargs)


@pytest.fixture(scope="module")
def sharded_llama(tmp_path_factory):
    """A tied-embedding Llama pool in bf16, three shards per model."""
    return write_causal_lm_pool(tmp_path_factory.mktemp("llama"), "llama", TASKS, max_shard_size="4KB", tie_word_embeddings=True)


def test_sharded_checkpoints_are_read_tensor_by_tensor_in_their_dtype(sharded_llama):
    folder = sharded_llama / "task_a"
    assert len(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(folder.glob("model-*.safetensors"))) == 3
    state_dict = pool_of(sharded_llama).state_dict("task_a")
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(state_dict, SafetensorsStateDict)
    assert state_dict.aliases("model.embed_tokens.weight") == ("model.embed_tokens.weight", "lm_head.weight")
    for key, tensor in loaded.state_dict().items():
        if key != "lm_head.weight":
            assert state_dict.dtype(key) == torch.bfloat16 and torch.equal(state_dict[key], tensor), key


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", [TiesMergingAlgorithm(scaling_factor=0.4, threshold=20), TaskArithmeticAlgorithm(scaling_factor=0.3), SimpleAverageAlgorithm()])
def test_bf16_in_bf16_out_from_float32_arithmetic(tmp_path, family, method):
    """The bf16 merge is the float32 merge of the same (bf16) weights, rounded once to bf16."""
    root = write_causal_lm_pool(tmp_path, family, TASKS, max_shard_size="8KB", tie_word_embeddings=family != "qwen2")
    merged = method.run(pool_of(root))
    in_float32 = method.run(pool_of(root, model_kwargs={"torch_dtype": "float32"}))
    assert merged.dtype == torch.bfloat16 and in_float32.dtype == torch.float32
    assert (merged.lm_head.weight is merged.model.embed_tokens.weight) == (family != "qwen2")
    expected = in_float32.state_dict()
    for key, tensor in merged.state_dict().items():
        assert torch.equal(tensor, expected[key].to(torch.bfloat16)), key


def test_the_cli_merges_and_saves_sharded_bf16_with_the_tokenizer(sharded_llama, tmp_path):
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    models = "\n".join(f"  {task}: {sharded_llama / task}" for task in TASKS)
    # FusionBench's form: a pool-level base model, from_pretrained entries, a tokenizer config
    (tmp_path / "config" / "modelpool" / "tiny_llama.yaml").write_text(
        f"_target_: fusion_bench.modelpool.CausalLMPool\n_recursive_: false\nbase_model: {sharded_llama / 'base'}\n"
        "models:\n  _pretrained_:\n    _target_: transformers.LlamaForCausalLM.from_pretrained\n"
        f"    pretrained_model_name_or_path: ${{...base_model}}\n    torch_dtype: bfloat16\n{models}\n"
        f"tokenizer:\n  _target_: transformers.AutoTokenizer.from_pretrained\n  pretrained_model_name_or_path: {sharded_llama / 'tokenizer'}\n"
        "model_kwargs:\n  torch_dtype: bfloat16\n"
    )
    saved = tmp_path / "merged"
    run_cli(
        "--config-dir", str(tmp_path / "config"), "method=ties_merging", "modelpool=tiny_llama", "taskpool=dummy",
        f"merged_model_save_path={saved}", "+merged_model_save_kwargs.max_shard_size=4KB", "+merged_model_save_kwargs.save_tokenizer=true",
        f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path,
    )  # fmt: skip
    assert len(list(saved.glob("model-*.safetensors"))) == 3 and (saved / "model.safetensors.index.json").is_file()
    assert (saved / "tokenizer.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(saved)
    expected = TiesMergingAlgorithm().run(pool_of(sharded_llama))
    assert loaded.dtype == torch.bfloat16 and loaded.lm_head.weight is loaded.model.embed_tokens.weight
    for key, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_model_dtype_casts_the_saved_model(sharded_llama, tmp_path):
    pool = pool_of(sharded_llama)
    merged = SimpleAverageAlgorithm().run(pool)
    pool.save_model(merged, tmp_path / "fp32", model_dtype="float32")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fp32").dtype == torch.float32


def test_vocabularies_of_different_sizes_are_refused_before_any_work(tmp_path):
    root = write_causal_lm_pool(tmp_path, "llama", ("task_a",))
    write_causal_lm(tiny_causal_lm(5, "llama", vocab_size=len(VOCAB) + 8), tmp_path / "task_b")
    (tmp_path / "config" / "modelpool").mkdir(parents=True)
    (tmp_path / "config" / "modelpool" / "mixed.yaml").write_text(
        f"_target_: fusion_bench.modelpool.CausalLMPool\nmodels:\n  _pretrained_: {root / 'base'}\n  task_a: {root / 'task_a'}\n  task_b: {tmp_path / 'task_b'}\n"
    )
    saved = tmp_path / "merged"
    result = run_cli(
        "--config-dir", str(tmp_path / "config"), "method=ties_merging", "modelpool=mixed", "taskpool=dummy",
        f"merged_model_save_path={saved}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False,
    )  # fmt: skip
    assert_one_line_error(result, f"model 'task_b' has a vocabulary of {len(VOCAB) + 8} tokens, model '_pretrained_' of {len(VOCAB)}", "same tokenizer")
    assert not saved.exists()


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"model_kwargs": {"device_map": "auto"}}, "model_kwargs has an unknown key 'device_map'"),
        ({"model_kwargs": {"torch_dtype": "float8"}}, "model_kwargs.torch_dtype='float8' is not a dtype"),
        ({"base_model": "elsewhere"}, "base_model is 'elsewhere' but models._pretrained_ is"),
        ({"model_kwargs": {"torch_dtype": "float16", "dtype": "bfloat16"}}, "model_kwargs.dtype is torch.bfloat16 but model_kwargs.torch_dtype is torch.float16"),
    ],
)
def test_bad_pool_keys_are_one_line_errors(sharded_llama, kwargs, fragment):
    with pytest.raises(InputError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        pool_of(sharded_llama, **kwargs)


def test_models_asking_for_different_dtypes_are_refused(sharded_llama):
    entry = {"_target_": "transformers.AutoModelForCausalLM.from_pretrained", "pretrained_model_name_or_path": str(sharded_llama / "task_a"), "torch_dtype": "float16"}
    with pytest.raises(InputError, match=r"models\.task_a\.torch_dtype is torch\.float16 but model_kwargs\.torch_dtype is torch\.bfloat16"):
        CausalLMPool({"_pretrained_": str(sharded_llama / "base"), "task_a": entry}, model_kwargs={"torch_dtype": "bfloat16"})
