"""Model pools: lazy safetensors reads equal eager loading, for checkpoints of either layout."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModel

from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import AutoModelPool, BaseModelPool
from fusion_bench.modelpool.lazy_state_dict import SafetensorsStateDict
from fusion_bench.modelpool.safetensors_file import SafetensorsFile
from fusion_bench.utils.errors import InputError
from tests.conftest import TASKS


def tiny_clip_vision(seed: int) -> CLIPVisionModel:
    torch.manual_seed(seed)
    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    return CLIPVisionModel(config)


def save_legacy_layout(model: CLIPVisionModel, folder) -> None:
    """As transformers 4.x (and the hub's tanganke/* models) name the tensors: vision_model.*"""
    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    save_file({f"vision_model.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))


def test_safetensors_file_reads_every_dtype(tmp_path):
    tensors = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).bfloat16(),
        "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).view(2, 3),
        "empty": torch.zeros(0, 3),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    file = SafetensorsFile(tmp_path / "t.safetensors")
    for key, value in tensors.items():
        read = file.read(key)
        assert read.dtype == value.dtype and read.shape == value.shape and torch.equal(read, value)


def resident_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def test_a_merge_walking_mapped_tensors_reads_chunks_from_the_files(tmp_path):
    """Streaming two 64 MiB tensors chunk by chunk keeps a chunk of each resident, not both whole,
    and reads the same values as the tensors hold."""
    from fusion_bench.merging.streaming import aligned_chunks

    tensors = {"a": torch.randn(16 << 20), "b": torch.randn(16 << 20)}
    for name, tensor in tensors.items():
        save_file({"w": tensor}, str(tmp_path / f"{name}.safetensors"))
    models = {name: SafetensorsStateDict([SafetensorsFile(tmp_path / f"{name}.safetensors")]) for name in tensors}
    baseline, peak, total = resident_mib(), 0.0, torch.zeros(2, dtype=torch.float64)
    for _, stack in aligned_chunks(models, "w", task_vectors=False, check_finite=False):
        total += stack.double().sum(dim=1)
        peak = max(peak, resident_mib() - baseline)
    assert peak < 32  # read through the mappings: 128 MiB
    assert torch.allclose(total, torch.stack([t.double().sum() for t in tensors.values()]))
    mapped = models["a"]["w"]
    torch.save({"w": mapped}, tmp_path / "saved.pt")  # nothing of ours travels with the tensor
    assert torch.equal(torch.load(tmp_path / "saved.pt", weights_only=True)["w"], tensors["a"])


def test_chunks_of_a_narrower_checkpoint_are_read_in_the_merge_dtype(tmp_path):
    """A bf16 checkpoint streamed in float32 reads through a bf16 staging buffer: the same values
    as converting the whole tensor, from any start."""
    from fusion_bench.utils.file_backed import read_chunk

    weights = torch.randn(1000).bfloat16()
    save_file({"w": weights}, str(tmp_path / "w.safetensors"))
    mapped = SafetensorsFile(tmp_path / "w.safetensors").read("w")
    out = torch.empty(300)
    read_chunk(mapped, mapped.reshape(-1), slice(517, 817), out)
    assert torch.equal(out, weights[517:817].float())


def test_truncated_and_garbage_files_are_named(tmp_path):
    save_file({"w": torch.randn(100)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(InputError, match="cut.safetensors is truncated: tensor 'w' is incomplete"):
        SafetensorsFile(tmp_path / "cut.safetensors").read("w")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="cannot read safetensors file .*junk.safetensors"):
        SafetensorsFile(tmp_path / "junk.safetensors")


def test_legacy_checkpoints_are_read_lazily_under_the_modules_names(tmp_path):
    model = tiny_clip_vision(0)
    save_legacy_layout(model, tmp_path / "legacy")
    pool = AutoModelPool({"_pretrained_": str(tmp_path / "legacy")}, model_class="transformers.CLIPVisionModel")
    lazy = pool.state_dict("_pretrained_")
    assert isinstance(lazy, SafetensorsStateDict)
    assert set(lazy) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(lazy[key], value) and lazy.shape(key) == value.shape


def test_sharded_checkpoints_and_auto_model(tmp_path):
    model = tiny_clip_vision(1)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    pool = AutoModelPool({"_pretrained_": str(tmp_path / "sharded")})  # AutoModel reads the config
    lazy = pool.state_dict("_pretrained_")
    assert isinstance(lazy, SafetensorsStateDict)
    for key, value in model.state_dict().items():
        assert torch.equal(lazy[key], value)


def test_lazy_merge_equals_merge_of_loaded_models(tmp_path):
    models = {"_pretrained_": tiny_clip_vision(0), **{task: tiny_clip_vision(i + 1) for i, task in enumerate(TASKS)}}
    for name, model in models.items():
        save_legacy_layout(model, tmp_path / name)
    pool = AutoModelPool({name: str(tmp_path / name) for name in models}, model_class="transformers.CLIPVisionModel")
    from_files = TaskArithmeticAlgorithm(scaling_factor=0.4).run(pool)
    from_memory = TaskArithmeticAlgorithm(scaling_factor=0.4).run(models)
    assert isinstance(from_files, CLIPVisionModel)
    for key, value in from_memory.state_dict().items():
        assert torch.allclose(from_files.state_dict()[key], value, atol=1e-6), key


def test_a_bare_state_dict_takes_the_pretrained_architecture(tmp_path):
    pretrained, tuned = tiny_clip_vision(0), tiny_clip_vision(5)
    pretrained.save_pretrained(tmp_path / "base")
    save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp_path / "tuned.safetensors"))
    pool = AutoModelPool({"_pretrained_": str(tmp_path / "base"), "tuned": str(tmp_path / "tuned.safetensors")}, model_class="transformers.CLIPVisionModel")
    loaded = pool.load_model("tuned")
    for key, value in tuned.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    assert torch.equal(pool.state_dict("tuned")["post_layernorm.weight"], tuned.post_layernorm.weight)


def test_missing_paths_and_unreachable_hub_ids_are_named(tmp_path):
    pool = AutoModelPool({"_pretrained_": str(tmp_path / "nowhere"), "hub": "someone/not-cached-anywhere"})
    with pytest.raises(InputError, match="model '_pretrained_': .*nowhere does not exist; check the path"):
        pool.load_model("_pretrained_")
    with pytest.raises(InputError, match="model 'hub': 'someone/not-cached-anywhere' is not a local path, and the Hugging Face hub cannot provide it"):
        pool.state_dict("hub")
    with pytest.raises(InputError, match="model 'other' is not in the pool; it has _pretrained_, hub"):
        pool.load_model("other")


def test_base_pool_names():
    pool = BaseModelPool({"_pretrained_": torch.nn.Linear(2, 2), "a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    assert pool.model_names == ["a", "b"] and pool.has_pretrained and len(pool) == 2 and "a" in pool
    with pytest.raises(InputError, match="has no models"):
        BaseModelPool({})
    with pytest.raises(InputError, match="is given as 'some/path', which BaseModelPool cannot load"):
        BaseModelPool({"a": "some/path"}).load_model("a")


def test_model_folder_without_config_is_named(tmp_path):
    (tmp_path / "weights").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights" / "model.safetensors"))
    pool = AutoModelPool({"_pretrained_": str(tmp_path / "weights")})
    with pytest.raises(InputError, match="has no config.json; is it a Hugging Face model folder?"):
        pool.state_dict("_pretrained_")
