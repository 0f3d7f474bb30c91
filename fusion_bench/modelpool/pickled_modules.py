"""The weights inside a pickled whole module (torch.save(model), as task_vectors saves its
ImageEncoder and ClassificationHead files), read without running the pickle.

torch.load(weights_only=True) refuses such files: they name the classes of the code that saved
them (src.modeling.ImageEncoder, open_clip.model.CLIP, ...). A plain torch.load would import those
classes, and would run whatever else the pickle names. Here the pickle is replayed by a restricted
unpickler that imports nothing and calls only what rebuilds tensors.

The rule, for every global (class or function) the pickle names:
- Allow-listed: the globals torch.load(weights_only=True) allows (the torch._utils tensor rebuild
  functions, storages, dtypes, torch.Size, torch.device, nn.Parameter, OrderedDict, set, ...) and
  copyreg._reconstructor, replaced by a stand-in that only allocates a record. These are the only
  callables that ever run.
- Everything else becomes an inert stand-in class that records its name; nothing is imported.
  - Creating an instance (NEWOBJ, copyreg._reconstructor: how pickle makes every nn.Module and
    every plain object, without running the class's code) makes a record; BUILD, SETITEM and
    APPEND on a record store the state, items and list items in it.
  - Calling a stand-in (REDUCE: how an enum member, or anything with a custom __reduce__, is
    rebuilt) records the call if the global is the saving code's own (open_clip, torchvision's
    InterpolationMode, src.modeling). If it lives in the standard library or in torch (os.system,
    builtins.eval/exec/getattr/__import__, subprocess.Popen, pickle.loads, torch.load,
    torch.storage._load_from_bytes, ...), where a payload finds what it runs, the file is refused.
  - Calling a record (the result of a recorded call) is refused.
  Safety does not depend on the refusals (a recorded call runs nothing either); they say early
  that a file is an exploit rather than a checkpoint. Their cost: a checkpoint that holds, say, a
  datetime or a functools.partial is refused too.
- BUILD (setting an object's state) on anything but a record or an instance of an allow-listed
  class (a tensor, an OrderedDict) is refused, so a pickle cannot change the allowed functions and
  classes themselves.
Why nothing else can run: a pickle reaches a callable only through a global (find_class, here the
allow-list or a stand-in; pickle takes no attribute of a global), and its other operations call
only __new__ of a class so named, and __setstate__, __setitem__, append, extend or add of what it
built: on a record, the record's own. The allow-listed functions are torch's weights-only set, which may receive records
as arguments: those have no attributes or protocols to offer, so misuse ends in a TypeError.

The state dict is then taken from the records: a module is a record whose state holds
_parameters, _buffers and _modules; its keys are those nn.Module.state_dict() gives (parameters,
then persistent buffers, then submodules, None entries skipped), without state-dict hooks or
get_extra_state, which are the saving code's own and are not run. A plain dict of tensors is taken
as it is.

Only torch.save's zip format (torch >= 1.6) is read, not TorchScript archives; its tensors are
memory-mapped. The zip reading and storage handling are torch's own (torch.serialization._load,
given this unpickler: pickle's pure-Python one, fast enough since tensors are not in the pickle).
"""

import _compat_pickle
import functools
import pickle
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file
from torch import Tensor
from torch._weights_only_unpickler import _get_allowed_globals

from fusion_bench.utils.cache import file_digest, write_atomically
from fusion_bench.utils.errors import InputError, first_line

_MODULE_STATE = ("_parameters", "_buffers", "_modules")
# what unpickling a damaged or hostile file raises from pickle's and torch's code
_READ_ERRORS = (pickle.UnpicklingError, EOFError, OSError, RuntimeError, LookupError, ValueError, TypeError, AttributeError, AssertionError)
_TRUST_ADVICE = "if you trust it, load it with the code that saved it and save model.state_dict() as safetensors"


class _Refused(Exception):
    """The pickle asked for something fusion_bench does not do; the message says what."""


class _StandIn(type):
    """The class of every stand-in. Calling one (REDUCE) records the call, or refuses it."""

    def __call__(cls, *args, **kwargs):
        if cls.refused:
            raise _Refused(f"calls {cls.global_name}, which fusion_bench does not run")
        return cls.__new__(cls, *args, **kwargs)

    def __repr__(cls):
        return f"<stand-in for {cls.global_name}>"


class _Record(metaclass=_StandIn):
    """An object of a class fusion_bench did not import: what the pickle gave it, never run."""

    global_name = "?"
    refused = False

    def __new__(cls, *args, **kwargs):  # NEWOBJ: allocation, which runs no code of the class
        record = object.__new__(cls)
        record.args, record.kwargs, record.state, record.items, record.list_items = args, kwargs, None, {}, []
        return record

    def __setstate__(self, state):  # BUILD
        self.state = state

    def __setitem__(self, key, value):  # SETITEM(S) of a dict subclass
        self.items[key] = value

    def append(self, item):  # APPEND(S) of a list subclass
        self.list_items.append(item)

    def extend(self, items):
        self.list_items.extend(items)

    def __call__(self, *args, **kwargs):
        raise _Refused(f"calls a {self.global_name} object it built, which fusion_bench does not run")

    def __repr__(self):
        return f"<record of {self.global_name}>"


def _stand_in(module: str, name: str) -> _StandIn:
    package = module.partition(".")[0]
    refused = package in sys.stdlib_module_names or package == "torch"
    return _StandIn(name, (_Record,), {"global_name": f"{module}.{name}", "refused": refused})


def _reconstructor(cls, base, state):
    """copyreg._reconstructor, how pickle protocols 0 and 1 make an instance: here a record,
    without calling cls or base."""
    if not isinstance(cls, _StandIn):
        raise _Refused(f"calls copyreg._reconstructor on {_allowed_name(cls)}, which fusion_bench does not run")
    return cls.__new__(cls) if state is None else cls.__new__(cls, state)


@functools.cache
def _allowed_globals() -> dict[str, object]:
    return {**_get_allowed_globals(), "copyreg._reconstructor": _reconstructor}


@functools.cache
def _allowed_classes() -> frozenset[type]:
    """The allow-listed classes, whose instances (tensors, OrderedDicts) a pickle may set the state of."""
    return frozenset(value for value in _allowed_globals().values() if isinstance(value, type))


def _allowed_name(value: object) -> str:
    """The global name of an allow-listed object, or what kind of object it is."""
    names = [name for name, allowed in _allowed_globals().items() if allowed is value]
    return names[0] if names else f"a {type(value).__name__} object"


class _RestrictedUnpickler(pickle._Unpickler):
    """pickle's own Python unpickler, with globals resolved as the module docstring says."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._stand_ins: dict[tuple[str, str], _StandIn] = {}  # per file: a hostile one cannot grow a process-wide cache

    def find_class(self, module: str, name: str) -> object:
        if self.proto < 3 and self.fix_imports:  # Python 2 names, which protocols 0-2 write (subprocess as commands), mapped as pickle maps them
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        allowed = _allowed_globals()
        if f"{module}.{name}" in allowed:
            return allowed[f"{module}.{name}"]
        if (module, name) not in self._stand_ins:
            self._stand_ins[module, name] = _stand_in(module, name)
        return self._stand_ins[module, name]

    def load_build(self):
        target = self.stack[-2]  # under the state
        if not isinstance(target, _Record) and type(target) not in _allowed_classes():
            raise _Refused(f"sets the state of {_allowed_name(target)}, which fusion_bench does not allow")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


_RESTRICTED_PICKLE = SimpleNamespace(Unpickler=_RestrictedUnpickler)  # what torch.serialization._load uses of a pickle module


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The state dict of the module (or the plain state dict) pickled in `path`; tensors are
    memory-mapped from the file. Nothing the pickle names is imported or run."""
    return read_module(path).state_dict


@dataclass(frozen=True)
class PickledModule:
    """What a pickled module (or a plain state dict) holds, read without running it.

    state_dict: what nn.Module.state_dict() gives, as the module docstring says; tensors are
        memory-mapped from the file.
    classes: {submodule name ("" for the module itself): the global name of its class}, e.g.
        "open_clip.transformer.QuickGELU": how the saving code built it, known without importing
        it; empty for a plain state dict.
    attributes: the module's own plain attributes (bool, int, float, str or None, names not
        starting with "_"), e.g. a ClassificationHead's `normalize`; empty for a plain state dict.
    """

    state_dict: dict[str, Tensor]
    classes: dict[str, str]
    attributes: dict[str, bool | int | float | str | None]


def read_module(path: str | Path) -> PickledModule:
    """The module (or the plain state dict) pickled in `path`: its tensors, the classes of its
    submodules and its plain attributes. Nothing the pickle names is imported or run."""
    path = Path(path)
    loaded = _unpickle(path)
    if _is_module(loaded):
        state_dict = _module_state_dict(path, loaded, prefix="", ancestors=())  # first: it refuses cycles
        plain = (bool, int, float, str, type(None))
        attributes = {name: value for name, value in loaded.state.items() if isinstance(name, str) and not name.startswith("_") and type(value) in plain}
        module = PickledModule(state_dict, _module_classes(loaded, ""), attributes)
    elif isinstance(loaded, Mapping) and all(isinstance(key, str) and isinstance(value, Tensor) for key, value in loaded.items()):
        module = PickledModule({key: value.detach() for key, value in loaded.items()}, {}, {})
    else:
        raise InputError(f"{path} holds {_describe(loaded)}, neither a module nor a state dict of tensors")
    if not module.state_dict:
        raise InputError(f"{path} holds no tensors")
    return module


def _module_classes(module: _Record, prefix: str) -> dict[str, str]:
    classes = {prefix.rstrip("."): module.global_name}
    for name, child in module.state["_modules"].items():
        if child is not None:
            classes |= _module_classes(child, f"{prefix}{name}.")
    return classes


def convert_to_safetensors(path: str | Path, cache_dir: str | Path) -> Path:
    """`path`'s state dict as a .safetensors file in `cache_dir`, named by the hash of `path`'s
    bytes: converted the first time, read from the cache after (a changed file is a new entry).
    Tensors that share memory (tied weights) are each stored whole: safetensors refuses shared
    storage, and a reader then needs no aliases."""
    path = Path(path)
    try:
        target = Path(cache_dir) / f"{file_digest(path)}.safetensors"
    except OSError as error:
        raise InputError(f"cannot read {path} ({type(error).__name__}: {first_line(error)})") from error
    if not target.exists():
        tensors = _unshared(read_state_dict(path))
        write_atomically(target, lambda temporary: save_file(tensors, str(temporary), metadata={"format": "pt"}))
    return target


def _unpickle(path: Path) -> object:
    try:
        with open(path, "rb") as file:
            if not torch.serialization._is_zipfile(file):
                raise InputError(
                    f"{path} is not in torch.save's zip format (torch >= 1.6), the only one fusion_bench reads without running it; {_TRUST_ADVICE}"
                )
            with torch.serialization._open_zipfile_reader(file) as archive:
                if torch.serialization._is_torchscript_zip(archive):
                    raise InputError(f"{path} is a TorchScript archive, whose code fusion_bench does not run; {_TRUST_ADVICE}")
                mapped = torch.UntypedStorage.from_file(str(path), False, path.stat().st_size)
                return torch.serialization._load(archive, "cpu", _RESTRICTED_PICKLE, overall_storage=mapped, encoding="utf-8")
    except _Refused as refusal:
        raise InputError(f"{path} is a pickle that {refusal}; {_TRUST_ADVICE}") from None
    except InputError:
        raise
    except _READ_ERRORS as error:
        raise InputError(
            f"cannot read {path} as a torch.save checkpoint ({type(error).__name__}: {first_line(error)}); is it complete?"
        ) from error


def _is_module(loaded: object) -> bool:
    return isinstance(loaded, _Record) and isinstance(loaded.state, dict) and all(isinstance(loaded.state.get(key), dict) for key in _MODULE_STATE)


def _module_state_dict(path: Path, module: _Record, prefix: str, ancestors: tuple[_Record, ...]) -> dict[str, Tensor]:
    """What nn.Module.state_dict() gives, taken from the record of a module."""
    if any(module is ancestor for ancestor in ancestors):
        raise InputError(f"{path}: module {prefix.rstrip('.')!r} contains itself")
    state = module.state
    non_persistent = state.get("_non_persistent_buffers_set", set())
    if not isinstance(non_persistent, set):
        raise InputError(f"{path}: module {prefix.rstrip('.') or module.global_name!r} has {_describe(non_persistent)} as its non-persistent buffer names")
    tensors = {**state["_parameters"], **{name: buffer for name, buffer in state["_buffers"].items() if name not in non_persistent}}
    state_dict = {}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(name, str) or not isinstance(tensor, Tensor):
            raise InputError(f"{path}: {prefix}{name} is {_describe(tensor)}, not a tensor")
        state_dict[prefix + name] = tensor.detach()
    for name, child in state["_modules"].items():
        if child is None:
            continue
        if not isinstance(name, str) or not _is_module(child):
            raise InputError(f"{path}: submodule {prefix}{name} is {_describe(child)}, not a module")
        state_dict |= _module_state_dict(path, child, f"{prefix}{name}.", (*ancestors, module))
    return state_dict


def _describe(value: object) -> str:
    return f"a {value.global_name} object" if isinstance(value, _Record) else f"a {type(value).__name__}"


def _unshared(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors, no two sharing memory: each tensor after the first on a storage is copied."""
    seen_storages = set()
    unshared = {}
    for key, tensor in state_dict.items():
        storage = tensor.untyped_storage().data_ptr()
        shared = storage in seen_storages
        seen_storages.add(storage)
        unshared[key] = tensor.clone(memory_format=torch.contiguous_format) if shared else tensor.contiguous()
    return unshared
