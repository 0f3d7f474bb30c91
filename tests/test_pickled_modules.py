"""Reading the weights of pickled whole modules (task_vectors' checkpoints) without running them."""

import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fusion_bench.modelpool import pickled_modules
from fusion_bench.modelpool.pickled_modules import convert_to_safetensors, read_state_dict
from fusion_bench.utils.errors import InputError

# The saving code, as task_vectors' src/modeling.py: written to disk, imported, saved with, removed.
MODELING = '''
import enum
import pathlib
from collections import OrderedDict

import torch
from torch import nn


class Interpolation(enum.Enum):  # pickled as a call of the class, as torchvision's InterpolationMode
    BICUBIC = "bicubic"


def convert_to_rgb(image):
    return image


def touch(path):
    pathlib.Path(path).touch()


class RunsOnLoad:
    """Unpickling this calls touch(path): code of the saving module that a plain torch.load runs."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (touch, (self.path,))


class Preprocess:  # a plain object, as torchvision's Compose
    def __init__(self):
        self.steps = [convert_to_rgb, 224]
        self.interpolation = Interpolation.BICUBIC


class Config(dict):
    pass


class Names(list):
    pass


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 2 * width)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(2 * width, width))]))


class ImageEncoder(nn.Module):
    def __init__(self, marker):
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.unembed = nn.Linear(8, 10, bias=False)
        self.unembed.weight = self.embed.weight  # tied
        self.register_buffer("scale", torch.randn(3).to(torch.bfloat16))
        self.register_buffer("attn_mask", torch.ones(4, 4), persistent=False)
        self.register_buffer("absent", None)
        self.train_preprocess = Preprocess()
        self.config = Config(width=8, device=torch.device("cpu"), dtype=torch.float16)
        self.names = Names(["a", "b"])
        self.on_load = RunsOnLoad(marker)


class ClassificationHead(nn.Linear):
    def __init__(self, normalize, weights):
        output_size, input_size = weights.shape
        super().__init__(input_size, output_size)
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.classnames = ["cat", "dog"]
'''


@pytest.fixture(params=[2, 1, 4], ids=lambda protocol: f"protocol{protocol}")
def task_vectors_files(request, tmp_path):
    """An ImageEncoder and a ClassificationHead saved whole, the way task_vectors saves them (pickle
    protocol 2 is torch.save's; 1 pickles objects with copyreg._reconstructor, 4 with STACK_GLOBAL),
    after which their module is gone: {name: (path, expected state dict)}, and the marker that
    RunsOnLoad would create."""
    source = tmp_path / "source"
    (source / "src").mkdir(parents=True)
    (source / "src" / "__init__.py").write_text("")
    (source / "src" / "modeling.py").write_text(textwrap.dedent(MODELING))
    marker = tmp_path / "marker"
    sys.path.insert(0, str(source))
    try:
        import src.modeling as modeling

        torch.manual_seed(0)
        models = {"encoder": modeling.ImageEncoder(str(marker)), "head": modeling.ClassificationHead(True, torch.randn(2, 10))}
        files = {}
        for name, model in models.items():
            path = tmp_path / f"{name}.pt"
            torch.save(model, path, pickle_protocol=request.param)
            files[name] = (path, {key: value.clone() for key, value in model.state_dict().items()})
        torch.load(files["encoder"][0], weights_only=False)  # while the module is importable, a plain load runs it
        assert marker.exists()
        marker.unlink()
    finally:
        sys.path.remove(str(source))
        for module in ("src.modeling", "src"):
            sys.modules.pop(module, None)
        shutil.rmtree(source)
    with pytest.raises(ModuleNotFoundError):  # the classes cannot be imported any more
        torch.load(files["head"][0], weights_only=False)
    return files, marker


def test_a_pickled_module_gives_its_state_dict_without_its_code(task_vectors_files):
    files, marker = task_vectors_files
    for name, (path, expected) in files.items():
        loaded = read_state_dict(path)
        assert list(loaded) == list(expected), name  # same keys, same order
        for key, value in expected.items():
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
            assert type(loaded[key]) is torch.Tensor and not loaded[key].requires_grad, key
    encoder = read_state_dict(files["encoder"][0])
    assert "attn_mask" not in encoder and "absent" not in encoder and encoder["scale"].dtype == torch.bfloat16
    assert "blocks.0.attn.in_proj_weight" in encoder and "blocks.1.mlp.c_proj.bias" in encoder
    assert encoder["embed.weight"].data_ptr() == encoder["unembed.weight"].data_ptr()  # still tied
    assert not marker.exists() and "src" not in sys.modules  # the saving module's code never ran, nor was imported


def test_a_plain_state_dict_loads_as_torch_loads_it(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.BatchNorm1d(3)).to(torch.bfloat16)
    path = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), path)
    expected = torch.load(path, weights_only=True)
    loaded = read_state_dict(path)
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


class Payload:
    """Unpickling this calls reduce[0](*reduce[1]), as a malicious checkpoint would."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce

    def __call__(self):  # pickle insists that what __reduce__ names be callable; unpickled, it is what it rebuilds
        raise AssertionError("never called")


def touch_code(marker) -> str:
    return f"__import__('pathlib').Path({str(marker)!r}).touch()"


def torch_saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


PAYLOADS = {
    f"{os.system.__module__}.system": lambda marker: Payload(os.system, (f"touch {marker}",)),
    "builtins.eval": lambda marker: Payload(eval, (touch_code(marker),)),
    "builtins.exec": lambda marker: Payload(exec, (touch_code(marker),)),
    "subprocess.Popen": lambda marker: Payload(subprocess.Popen, (["touch", str(marker)],)),
    # exec fetched with getattr: getattr(getattr(__import__, "__self__"), "exec")(code)
    "builtins.getattr": lambda marker: Payload(Payload(getattr, (Payload(getattr, (__import__, "__self__")), "exec")), (touch_code(marker),)),
    # pickles inside the pickle
    "pickle.loads": lambda marker: Payload(pickle.loads, (pickle.dumps(Payload(os.system, (f"touch {marker}",))),)),
    "torch.storage._load_from_bytes": lambda marker: Payload(torch.storage._load_from_bytes, (torch_saved(Payload(os.system, (f"touch {marker}",))),)),
}


@pytest.mark.parametrize("called", PAYLOADS)
def test_a_malicious_pickle_is_refused_and_never_run(tmp_path, called):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"weight": PAYLOADS[called](marker)}, path)  # in data.pkl, as torch.save writes it
    cache = tmp_path / "cache"
    for read in (read_state_dict, lambda path: convert_to_safetensors(path, cache)):
        with pytest.raises(InputError) as error:
            read(path)
        message = str(error.value)
        assert "\n" not in message and message.startswith(f"{path} is a pickle that calls {called}, which fusion_bench does not run; "), message
    assert not marker.exists() and not any(cache.glob("*.safetensors"))
    unsafe = torch.load(path, weights_only=False)  # the payload is real: loading it unsafely runs it
    if called == "subprocess.Popen":
        unsafe["weight"].wait()
    assert marker.exists()


def write_torch_zip(path, data_pkl: bytes) -> None:
    """A torch.save zip whose data.pkl is the given bytes."""
    writer = torch._C.PyTorchFileWriter(str(path))
    writer.write_record("data.pkl", data_pkl, len(data_pkl))
    writer.write_end_of_file()


HAND_WRITTEN = {
    # BUILD on an allowed function itself: setattr(_rebuild_parameter, "__doc__", "changed")
    "sets the state of torch._utils._rebuild_parameter, which fusion_bench does not allow": (
        b"\x80\x02ctorch._utils\n_rebuild_parameter\nN}X\x07\x00\x00\x00__doc__X\x07\x00\x00\x00changeds\x86b."
    ),
    # make() is recorded, not run; calling what it returned would need running it
    "calls a src.evil.make object it built, which fusion_bench does not run": b"\x80\x02csrc.evil\nmake\n)R)R.",
    # copyreg._reconstructor(OrderedDict, object, None) would construct a real object
    "calls copyreg._reconstructor on collections.OrderedDict, which fusion_bench does not run": (
        b"\x80\x02ccopyreg\n_reconstructor\nccollections\nOrderedDict\nc__builtin__\nobject\nN\x87R."
    ),
    # protocol 4 names a nested attribute in one global: a stand-in named "Path.touch", refused when called
    "calls pathlib.Path.touch, which fusion_bench does not run": b"\x80\x04\x8c\x07pathlib\x8c\nPath.touch\x93)R.",
}


@pytest.mark.parametrize("refusal", HAND_WRITTEN)
def test_hand_written_pickles_are_refused(tmp_path, refusal):
    path = tmp_path / "evil.pt"
    write_torch_zip(path, HAND_WRITTEN[refusal])
    documented = torch._utils._rebuild_parameter.__doc__
    with pytest.raises(InputError) as error:
        read_state_dict(path)
    assert str(error.value).startswith(f"{path} is a pickle that {refusal}; "), str(error.value)
    assert torch._utils._rebuild_parameter.__doc__ == documented


def legacy_format(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"weight": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    return path, "is not in torch.save's zip format (torch >= 1.6)"


def torchscript(tmp_path):
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():  # torch.jit.script is deprecated, and still writes these archives
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(nn.Linear(2, 2)).save(str(path))
    return path, "is a TorchScript archive, whose code fusion_bench does not run"


def truncated(tmp_path):
    torch.save({"weight": torch.ones(1000)}, tmp_path / "whole.pt")
    path = tmp_path / "cut.pt"
    path.write_bytes((tmp_path / "whole.pt").read_bytes()[:2000])
    return path, "cannot read"


def not_a_module(tmp_path):
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": {"weight": torch.ones(2)}, "epoch": 3}, path)
    return path, "holds a dict, neither a module nor a state dict of tensors"


@pytest.mark.parametrize("make", [legacy_format, torchscript, truncated, not_a_module])
def test_files_it_cannot_read_are_refused_in_one_line(tmp_path, make):
    path, fragment = make(tmp_path)
    with pytest.raises(InputError) as error:
        read_state_dict(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value) and fragment in str(error.value), str(error.value)


def test_conversion_to_safetensors_is_cached_by_the_files_bytes(task_vectors_files, tmp_path, monkeypatch):
    files, _ = task_vectors_files
    cache = tmp_path / "cache"
    path, expected = files["encoder"]
    converted = convert_to_safetensors(path, cache)
    stored = load_file(converted)
    assert set(stored) == set(expected)  # tied weights stored under both names (safetensors sorts the keys)
    for key, value in expected.items():
        assert stored[key].dtype == value.dtype and torch.equal(stored[key], value), key
    written = converted.stat().st_mtime_ns

    def never(path):
        raise AssertionError(f"{path} converted twice")

    monkeypatch.setattr(pickled_modules, "read_state_dict", never)
    assert convert_to_safetensors(path, cache) == converted and converted.stat().st_mtime_ns == written
    monkeypatch.undo()

    head_path, head = files["head"]
    copy = tmp_path / "copy.pt"
    shutil.copy(head_path, copy)
    first = convert_to_safetensors(copy, cache)
    torch.save({key: value + 1 for key, value in head.items()}, copy)  # the same name, new bytes: a new entry
    second = convert_to_safetensors(copy, cache)
    assert second != first and first.exists()
    assert torch.equal(load_file(second)["weight"], head["weight"] + 1) and torch.equal(load_file(first)["weight"], head["weight"])
    assert sorted(entry.name for entry in cache.iterdir()) == sorted(p.name for p in (converted, first, second))  # nothing half-written left
    with pytest.raises(InputError, match="^" + re.escape(f"cannot read {tmp_path / 'missing.pt'} (FileNotFoundError: ")):
        convert_to_safetensors(tmp_path / "missing.pt", cache)
