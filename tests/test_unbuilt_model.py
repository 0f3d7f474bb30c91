"""A merge that nothing runs (task pool dummy, or none) is made and saved without building the
model's class, and equals, value for value and dtype for dtype, the merge into the built model."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, CLIPVisionModel

from fusion_bench.method import SimpleAverageAlgorithm, TaskArithmeticAlgorithm
from fusion_bench.modelpool import AutoModelPool, CLIPVisionModelPool
from fusion_bench.models.per_task_models import PerTaskModels
from fusion_bench.models.unbuilt_model import UnbuiltModel
from fusion_bench.programs import FusionProgram
from fusion_bench.taskpool.dummy import DummyTaskPool
from fusion_bench.utils.cache import cache_dir
from fusion_bench.utils.parameters import model_summary
from tests.clip_fixtures import CLIP_TASKS
from tests.conftest import TASKS
from tests.llm_fixtures import write_causal_lm_pool

CONFIG = Path(__file__).resolve().parents[1] / "config"

METHODS = {  # config group name: its keys
    "simple_average": {},
    "task_arithmetic": {"scaling_factor": 0.3},
    "ties_merging": {"scaling_factor": 0.3, "threshold": 20},
    "linear/weighted_average": {"weights": [0.2, 0.3, 0.5]},
    "magmax/magmax": {},
    "task_singular_vector/TaskSingularVectorMerging": {},
    "isotropic_merging/iso_cts": {},
    "dare/task_arithmetic": {"sparsity_ratio": 0.5},
    "tall_mask/task_arithmetic": {},
}


def pool_models(bert_pool_dir) -> dict[str, str]:
    return {"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(bert_pool_dir / task) for task in TASKS}}


def method_config(name: str) -> dict:
    config = OmegaConf.to_container(OmegaConf.load(CONFIG / "method" / f"{name}.yaml"))
    return {**config, **METHODS[name]}


class RecordingDummyTaskPool(DummyTaskPool):
    """Scores nothing, and keeps the model it was given."""

    given = None

    def evaluate(self, model, fabric=None):
        RecordingDummyTaskPool.given = model
        return super().evaluate(model, fabric)


class RunningTaskPool(RecordingDummyTaskPool):
    """As a task pool that runs the model: it gets the built model."""

    runs_models = True


def run_program(bert_pool_dir, method: str, tmp_path, taskpool: type = RecordingDummyTaskPool) -> dict:
    return FusionProgram(
        method=OmegaConf.create(method_config(method)),
        modelpool=OmegaConf.create({"_target_": "fusion_bench.modelpool.AutoModelPool", "models": pool_models(bert_pool_dir)}),
        taskpool=OmegaConf.create({"_target_": f"{__name__}.{taskpool.__name__}"}),
        merged_model_save_path=str(tmp_path / "merged"),
        seed=0,
    ).run()


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.parametrize("method", METHODS)
def test_a_merge_only_run_saves_what_the_merge_into_the_built_model_saves(bert_pool_dir, tmp_path, method):
    report = run_program(bert_pool_dir, method, tmp_path)
    merged = RecordingDummyTaskPool.given
    per_task = isinstance(merged, PerTaskModels)
    assert isinstance(merged.any_model() if per_task else merged, UnbuiltModel)

    built = run_program(bert_pool_dir, method, tmp_path / "built", taskpool=RunningTaskPool)
    models = RecordingDummyTaskPool.given
    assert type(models.any_model() if per_task else models).__name__ == "BertModel"
    for name in TASKS if per_task else [None]:
        folder = tmp_path / "merged" / name if name else tmp_path / "merged"
        expected = models[name] if name else models
        assert_same_tensors(AutoModel.from_pretrained(folder).state_dict(), expected.state_dict())
        assert (folder / "config.json").read_text() == (bert_pool_dir / "pretrained" / "config.json").read_text()
    assert report["model_info"] == built["model_info"]
    assert model_summary(models.any_model() if per_task else models).items() <= report["model_info"].items()


def test_the_python_api_and_task_pools_that_run_models_get_the_model_class(bert_pool_dir, tmp_path):
    pool = AutoModelPool(pool_models(bert_pool_dir))
    assert type(TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)).__name__ == "BertModel"
    run_program(bert_pool_dir, "task_arithmetic", tmp_path, taskpool=RunningTaskPool)
    assert type(RecordingDummyTaskPool.given).__name__ == "BertModel"


def test_an_unbuilt_copy_has_the_loaded_model_s_entries_parameters_and_buffers(bert_pool_dir):
    pool = AutoModelPool(pool_models(bert_pool_dir))
    unbuilt, loaded = pool.unbuilt_copy("alpha"), pool.load_model("alpha")
    assert_same_tensors(unbuilt.state_dict(), loaded.state_dict())
    assert [name for name, _ in unbuilt.named_parameters()] == [name for name, _ in loaded.named_parameters()]
    assert sorted(name for name, _ in unbuilt.named_buffers()) == sorted(name for name in loaded.state_dict() if name not in dict(loaded.named_parameters()))
    assert model_summary(unbuilt) == model_summary(loaded)


def test_tied_sharded_bfloat16_checkpoints_stay_tied_and_in_their_dtype(tmp_path):
    root = write_causal_lm_pool(tmp_path / "pool", tie_word_embeddings=True, max_shard_size="4KB")
    assert len(list((root / "base").glob("model-*.safetensors"))) > 1
    models = {"_pretrained_": str(root / "base"), **{task: str(root / task) for task in ("task_a", "task_b", "task_c")}}
    pool = AutoModelPool(models, model_class="transformers.AutoModelForCausalLM")
    pool.merged_model_runs = False
    merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
    assert isinstance(merged, UnbuiltModel)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight and merged.lm_head.weight.dtype == torch.bfloat16

    pool.merged_model_runs = True
    built = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
    (tmp_path / "saved").mkdir()
    merged.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert_same_tensors(reloaded.state_dict(), built.state_dict())
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def write_variant(source, folder, *, config_changes=None, tensors=None):
    """A copy of the checkpoint folder `source`, with config.json keys or the tensors changed."""
    shutil.copytree(source, folder)
    if config_changes is not None:  # a change to None drops the key
        config = {**json.loads((folder / "config.json").read_text()), **config_changes}
        (folder / "config.json").write_text(json.dumps({key: value for key, value in config.items() if value is not None}))
    if tensors is not None:
        save_file(tensors(load_file(folder / "model.safetensors")), folder / "model.safetensors", metadata={"format": "pt"})
    return folder


VARIANTS = {  # name: (how the checkpoint is changed, whether an unbuilt copy equals the loaded model)
    "as saved": ({}, True),
    "config without dtype": ({"config_changes": {"dtype": None}}, True),
    "bfloat16 tensors, no dtype in config": ({"config_changes": {"dtype": None}, "tensors": lambda t: {k: v.bfloat16() for k, v in t.items()}}, True),
    "config dtype unlike the tensors": ({"config_changes": {"dtype": "bfloat16"}}, False),
    "tensors of two dtypes": ({"tensors": lambda t: {k: v.half() if "pooler" in k else v for k, v in t.items()}}, False),
    "a tensor the architecture lacks": ({"tensors": lambda t: {**t, "extra.weight": torch.zeros(2)}}, False),
    "a tensor missing": ({"tensors": lambda t: {k: v for k, v in t.items() if "pooler.dense.bias" not in k}}, False),
    "quantised": ({"config_changes": {"quantization_config": {"quant_method": "bitsandbytes"}}}, False),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_an_unbuilt_copy_is_made_only_where_it_equals_the_loaded_model(bert_pool_dir, tmp_path, variant):
    changes, eligible = VARIANTS[variant]
    folder = write_variant(bert_pool_dir / "pretrained", tmp_path / "model", **changes)
    pool = AutoModelPool({"_pretrained_": str(folder), "alpha": str(bert_pool_dir / "alpha")})
    unbuilt = pool.unbuilt_copy("_pretrained_")
    assert (unbuilt is not None) == eligible
    if unbuilt is not None:
        assert_same_tensors(unbuilt.state_dict(), pool.load_model("_pretrained_").state_dict())


def test_a_clip_model_read_as_its_vision_tower_is_built(clip_world):
    """Its checkpoint holds the text tower too: saved as it is, it would not be a vision model."""
    pool = CLIPVisionModelPool({"_pretrained_": str(clip_world / "clip"), **{task: str(clip_world / "towers" / task) for task in CLIP_TASKS}})
    assert pool.unbuilt_copy("_pretrained_") is None
    tower = pool.unbuilt_copy(CLIP_TASKS[0])
    assert_same_tensors(tower.state_dict(), CLIPVisionModel.from_pretrained(clip_world / "towers" / CLIP_TASKS[0]).state_dict())


def test_the_checkpoint_layout_is_learnt_once_and_relearnt_when_unreadable(bert_pool_dir, monkeypatch, tmp_path):
    monkeypatch.setenv("FUSION_BENCH_CACHE", str(tmp_path / "cache"))
    built = []
    original = AutoModelPool._meta_model
    monkeypatch.setattr(AutoModelPool, "_meta_model", lambda self, *args: built.append(args) or original(self, *args))
    SimpleAverageAlgorithm().run(AutoModelPool(pool_models(bert_pool_dir)))
    assert len(built) == 1  # the four checkpoints share config.json and names
    [cached] = cache_dir("checkpoint_layouts").iterdir()

    SimpleAverageAlgorithm().run(AutoModelPool(pool_models(bert_pool_dir)))
    assert len(built) == 1
    cached.write_text("{not json")
    SimpleAverageAlgorithm().run(AutoModelPool(pool_models(bert_pool_dir)))
    assert len(built) == 2 and json.loads(cached.read_text())["exact"] is True


def test_a_merge_only_run_imports_no_modeling_code(bert_pool_dir, tmp_path):
    """Where the layout is cached, the run reads the checkpoints without transformers' models:
    seconds of imports and hundreds of MB for a model class the merge never runs."""
    script = textwrap.dedent(f"""
        import sys
        from omegaconf import OmegaConf
        from fusion_bench.programs import FusionProgram
        FusionProgram(
            method=OmegaConf.create({{"_target_": "fusion_bench.method.TiesMergingAlgorithm", "scaling_factor": 0.3, "threshold": 20}}),
            modelpool=OmegaConf.create({{"_target_": "fusion_bench.modelpool.AutoModelPool", "models": {pool_models(bert_pool_dir)!r}}}),
            taskpool=OmegaConf.create({{"_target_": "fusion_bench.taskpool.DummyTaskPool"}}),
            merged_model_save_path=sys.argv[1],
        ).run()
        print(sorted(name for name in sys.modules if name.startswith("transformers.models")))
    """)
    env = {**os.environ, "FUSION_BENCH_CACHE": str(tmp_path / "cache")}  # nothing learnt yet
    first = subprocess.run([sys.executable, "-c", script, str(tmp_path / "first")], capture_output=True, text=True, check=True, env=env)
    second = subprocess.run([sys.executable, "-c", script, str(tmp_path / "second")], capture_output=True, text=True, check=True, env=env)
    assert "transformers.models.bert.modeling_bert" in first.stdout  # learning the layout builds the class
    assert second.stdout.strip().splitlines()[-1] == "[]"
    assert_same_tensors(load_file(tmp_path / "second" / "model.safetensors"), load_file(tmp_path / "first" / "model.safetensors"))
