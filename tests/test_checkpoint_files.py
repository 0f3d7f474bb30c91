"""Bare PyTorch state dicts (.bin/.pt/.pth) in an AutoModelPool, and the one-line errors for
checkpoints and model folders that cannot be used."""

import pathlib
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from transformers import BertModel

from fusion_bench.method import TaskArithmeticAlgorithm
from fusion_bench.modelpool import AutoModelPool
from fusion_bench.modelpool.lazy_state_dict import SafetensorsStateDict
from fusion_bench.modelpool.torch_file import TorchStateDictFile
from fusion_bench.utils.errors import InputError
from fusion_bench.utils.instantiation import instantiate_checked
from tests.conftest import TASKS, assert_one_line_error, run_cli

# alpha and beta in torch.save's zip format (memory-mapped), gamma in the legacy format (read whole)
STATE_DICT_FILES = {"alpha": ("alpha.bin", True), "beta": ("beta.pt", True), "gamma": ("gamma.pth", False)}


class CreatesMarker:
    """Unpickling this creates `marker`: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def state_dict_dir(tmp_path_factory, bert_pool_dir) -> pathlib.Path:
    """The task models of bert_pool_dir as bare state dicts saved with torch.save."""
    root = tmp_path_factory.mktemp("state_dicts")
    for task, (file_name, zip_format) in STATE_DICT_FILES.items():
        state_dict = BertModel.from_pretrained(bert_pool_dir / task).state_dict()
        torch.save(state_dict, root / file_name, _use_new_zipfile_serialization=zip_format)
    return root


def pool_with(bert_pool_dir, **task_paths) -> AutoModelPool:
    """The BERT pool, with the given task models replaced by other paths."""
    paths = {task: bert_pool_dir / task for task in TASKS} | task_paths
    return AutoModelPool({"_pretrained_": str(bert_pool_dir / "pretrained"), **{task: str(path) for task, path in paths.items()}})


def config_folder(bert_pool_dir, folder: pathlib.Path) -> pathlib.Path:
    """A model folder holding the pretrained model's config.json and nothing else."""
    folder.mkdir()
    shutil.copy(bert_pool_dir / "pretrained" / "config.json", folder)
    return folder


def assert_one_line_naming(error: pytest.ExceptionInfo, path: pathlib.Path, fragment: str) -> None:
    message = str(error.value)
    assert "\n" not in message and str(path) in message and fragment in message, message


def test_state_dict_files_merge_like_their_folders(bert_pool_dir, state_dict_dir):
    from_files = pool_with(bert_pool_dir, **{task: state_dict_dir / name for task, (name, _) in STATE_DICT_FILES.items()})
    assert all(isinstance(from_files.state_dict(task), SafetensorsStateDict) for task in TASKS)  # read lazily
    merged = TaskArithmeticAlgorithm(scaling_factor=0.4).run(from_files).state_dict()
    expected = TaskArithmeticAlgorithm(scaling_factor=0.4).run(pool_with(bert_pool_dir)).state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert torch.equal(merged[key], value), key


def test_lazy_state_dict_reads_the_files_tensors(bert_pool_dir, state_dict_dir, tmp_path):
    saved = torch.load(state_dict_dir / "alpha.bin", weights_only=True)
    torch.save({"state_dict": saved}, tmp_path / "wrapped.pt")  # as training scripts save it: unwrapped
    torch.save({f"bert.{key}": value for key, value in saved.items()}, tmp_path / "prefixed.bin")  # from BertFor*: renamed
    for path in (state_dict_dir / "alpha.bin", tmp_path / "wrapped.pt", tmp_path / "prefixed.bin"):
        lazy = pool_with(bert_pool_dir, alpha=path).state_dict("alpha")
        assert set(lazy) == set(saved)
        for key, value in saved.items():
            assert lazy.shape(key) == value.shape and lazy.dtype(key) == value.dtype and torch.equal(lazy[key], value), key
    loaded = pool_with(bert_pool_dir, alpha=state_dict_dir / "alpha.bin").load_model("alpha")
    assert isinstance(loaded, BertModel)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in saved.items())


def file_mappings(path: pathlib.Path) -> list[range]:
    """The address ranges at which this process maps `path` (Linux)."""
    lines = pathlib.Path("/proc/self/maps").read_text().splitlines()
    bounds = [line.split()[0].split("-") for line in lines if line.endswith(" " + str(path))]
    return [range(int(start, 16), int(end, 16)) for start, end in bounds]


@pytest.mark.skipif(not pathlib.Path("/proc/self/maps").exists(), reason="reads the process's mappings from /proc")
def test_zip_checkpoints_are_memory_mapped(state_dict_dir):
    key = "embeddings.word_embeddings.weight"
    mapped = TorchStateDictFile(state_dict_dir / "alpha.bin").read(key)
    assert any(mapped.data_ptr() in mapping for mapping in file_mappings(state_dict_dir / "alpha.bin"))
    legacy = TorchStateDictFile(state_dict_dir / "gamma.pth").read(key)  # cannot be mapped: read whole
    assert not file_mappings(state_dict_dir / "gamma.pth") and legacy.shape == mapped.shape and not legacy.requires_grad


@pytest.mark.parametrize("where", ["bare file", "model folder"])
def test_a_malicious_pickle_is_refused_and_never_run(bert_pool_dir, tmp_path, where):
    marker = tmp_path / "marker"
    if where == "bare file":
        path = weights = tmp_path / "evil.bin"
        expected = f"{path} is not a plain state dict: torch.load(weights_only=True) refuses it ("
    else:
        path = config_folder(bert_pool_dir, tmp_path / "evil")
        weights = path / "pytorch_model.bin"
        expected = f"model 'alpha': the weights in {path} are not a plain state dict: torch.load(weights_only=True) refuses them ("
    torch.save({"weight": CreatesMarker(marker)}, weights)
    pool = pool_with(bert_pool_dir, alpha=path)
    for read in (pool.state_dict, pool.load_model):
        with pytest.raises(InputError) as error:
            read("alpha")
        assert_one_line_naming(error, path, "); fusion_bench never runs a checkpoint's pickled code; save ")
        assert str(error.value).startswith(expected) and "GLOBAL" in str(error.value)
    assert not marker.exists()
    torch.load(weights, weights_only=False)  # the payload is real: loading it unsafely runs it
    assert marker.exists()


def make_nested_dict(bert_pool_dir, tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": BertModel.from_pretrained(bert_pool_dir / "alpha").state_dict(), "epoch": 3}, path)
    return path, "is not a flat state dict: its 'state_dict' is a dict, not a tensor"


def make_whole_module(bert_pool_dir, tmp_path):
    path = tmp_path / "model.pth"
    torch.save(BertModel.from_pretrained(bert_pool_dir / "alpha"), path)
    return path, "GLOBAL transformers.models.bert.modeling_bert.BertModel"


def make_unknown_suffix(bert_pool_dir, tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\0" * 16)
    return path, "give a Hugging Face model folder or hub id, a .safetensors file, or a .bin/.pt/.pth state dict"


def make_truncated_file(bert_pool_dir, tmp_path):
    torch.save(BertModel.from_pretrained(bert_pool_dir / "alpha").state_dict(), tmp_path / "whole.bin")
    path = tmp_path / "cut.bin"  # as an interrupted download leaves it
    path.write_bytes((tmp_path / "whole.bin").read_bytes()[:5000])
    return path, "cannot read PyTorch state dict"


def make_invalid_config(bert_pool_dir, tmp_path):
    path = tmp_path / "bad_config"
    shutil.copytree(bert_pool_dir / "alpha", path)
    (path / "config.json").write_text('{"model_type": "bert",')
    return path, "is not a valid JSON file"


def make_empty_folder(bert_pool_dir, tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path, "has no config.json; is it a Hugging Face model folder?"


def make_folder_without_weights(bert_pool_dir, tmp_path):
    path = config_folder(bert_pool_dir, tmp_path / "config_only")
    return path, "no file named model.safetensors, or pytorch_model.bin"


@pytest.mark.parametrize(
    "make",
    [make_nested_dict, make_whole_module, make_unknown_suffix, make_truncated_file, make_invalid_config, make_empty_folder, make_folder_without_weights],
)
def test_unusable_models_are_named_on_one_line(bert_pool_dir, tmp_path, make):
    path, fragment = make(bert_pool_dir, tmp_path)
    pool = pool_with(bert_pool_dir, alpha=path)
    for read in (pool.state_dict, pool.load_model):
        with pytest.raises(InputError) as error:
            read("alpha")
        assert_one_line_naming(error, path, fragment)


def test_a_bare_state_dict_needs_a_pretrained_folder(state_dict_dir):
    alpha = str(state_dict_dir / "alpha.bin")
    with pytest.raises(InputError, match="takes the architecture of _pretrained_; add the model it was fine-tuned from"):
        AutoModelPool({"alpha": alpha}).load_model("alpha")
    with pytest.raises(InputError, match="model '_pretrained_' is a bare state dict .*, which has no architecture"):
        AutoModelPool({"_pretrained_": alpha, "alpha": alpha}).load_model("alpha")


def test_bugs_keep_their_traceback(bert_pool_dir):
    class Broken:
        @staticmethod
        def from_pretrained(path):
            raise TypeError("a bug, not bad input")

    pool = pool_with(bert_pool_dir)
    pool.model_class = Broken  # replaces the cached_property's value
    with pytest.raises(TypeError, match="a bug, not bad input"):
        pool.load_model("alpha")


def test_pool_keys_are_checked(bert_pool_dir):
    config = OmegaConf.create({"_target_": "fusion_bench.modelpool.AutoModelPool", "modles": {"_pretrained_": str(bert_pool_dir / "pretrained")}})
    with pytest.raises(InputError, match="unknown key 'modles' for fusion_bench.modelpool.AutoModelPool; its keys are: models, model_class, train_datasets"):
        instantiate_checked(config, "modelpool")
    pool = AutoModelPool({"_pretrained_": str(bert_pool_dir / "pretrained")}, train_datasets={"alpha": "some/dataset"}, test_datasets={"beta": "x"})
    assert pool.train_dataset_names == ["alpha"] and pool.test_dataset_names == ["beta"] and pool.val_dataset_names == []


# The command line: each kind of bad model is one line on stderr, exit status 2, and no output.


def write_pool(config_dir: pathlib.Path, bert_pool_dir, body: str | None = None, **task_paths) -> None:
    (config_dir / "modelpool").mkdir(parents=True)
    paths = {"_pretrained_": bert_pool_dir / "pretrained", **{task: bert_pool_dir / task for task in TASKS}, **task_paths}
    models = "".join(f"  {name}: {path}\n" for name, path in paths.items())
    text = body if body is not None else f"_target_: fusion_bench.modelpool.AutoModelPool\nmodels:\n{models}"
    (config_dir / "modelpool" / "pool.yaml").write_text(text)


def run_pool(tmp_path, *overrides, check=False):
    args = ["--config-dir", str(tmp_path / "config"), "modelpool=pool", "taskpool=dummy", "method=task_arithmetic", f"hydra.run.dir={tmp_path / 'run'}"]
    return run_cli(*args, *overrides, cwd=tmp_path, check=check)


def test_cli_merges_state_dict_files(bert_pool_dir, state_dict_dir, tmp_path):
    write_pool(tmp_path / "config", bert_pool_dir, **{task: state_dict_dir / name for task, (name, _) in STATE_DICT_FILES.items()})
    run_pool(tmp_path, f"merged_model_save_path={tmp_path / 'merged'}", check=True)
    assert (tmp_path / "run" / "report.json").is_file()
    expected = TaskArithmeticAlgorithm().run(pool_with(bert_pool_dir)).state_dict()  # the config's scaling factor
    merged = BertModel.from_pretrained(tmp_path / "merged").state_dict()
    assert all(torch.equal(merged[key], value) for key, value in expected.items())


def malicious_state_dict(bert_pool_dir, tmp_path):
    torch.save({"weight": CreatesMarker(tmp_path / "marker")}, tmp_path / "evil.bin")
    return {"alpha": tmp_path / "evil.bin"}, "evil.bin is not a plain state dict: torch.load(weights_only=True) refuses it"


def unknown_suffix(bert_pool_dir, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"\0" * 16)
    return {"alpha": tmp_path / "model.onnx"}, "model.onnx is not a model file fusion_bench reads; give a Hugging Face model folder"


def invalid_config(bert_pool_dir, tmp_path):
    shutil.copytree(bert_pool_dir / "alpha", tmp_path / "bad_config")
    (tmp_path / "bad_config" / "config.json").write_text("{not json")
    return {"beta": tmp_path / "bad_config"}, "model 'beta' cannot be loaded from"


def malicious_folder(bert_pool_dir, tmp_path):
    folder = config_folder(bert_pool_dir, tmp_path / "evil")
    torch.save({"weight": CreatesMarker(tmp_path / "marker")}, folder / "pytorch_model.bin")
    return {"gamma": folder}, "model 'gamma': the weights in"


@pytest.mark.parametrize("make", [malicious_state_dict, unknown_suffix, invalid_config, malicious_folder])
def test_cli_bad_models_are_one_line(bert_pool_dir, tmp_path, make):
    task_paths, fragment = make(bert_pool_dir, tmp_path)
    write_pool(tmp_path / "config", bert_pool_dir, **task_paths)
    assert_cli_error(run_pool(tmp_path, f"merged_model_save_path={tmp_path / 'merged'}"), tmp_path, fragment)
    assert not (tmp_path / "marker").exists()


def test_cli_misspelt_pool_key(bert_pool_dir, tmp_path):
    write_pool(tmp_path / "config", bert_pool_dir, body=f"_target_: fusion_bench.modelpool.AutoModelPool\nmodles:\n  _pretrained_: {bert_pool_dir / 'pretrained'}\n")
    assert_cli_error(run_pool(tmp_path), tmp_path, "unknown key 'modles' for fusion_bench.modelpool.AutoModelPool; its keys are: models,")


def assert_cli_error(result, tmp_path: pathlib.Path, fragment: str) -> None:
    assert_one_line_error(result, fragment)
    written = [path for path in (tmp_path / "run").iterdir() if path.name != ".hydra"]
    assert all(path.suffix == ".log" for path in written), written  # Hydra's log, no report.json
    assert not (tmp_path / "merged").exists()
