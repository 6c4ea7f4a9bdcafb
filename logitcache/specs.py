"""How users name things on the command line: datasets, augmentations, models and teachers.

A spec is a built-in name, ``pkg.module:callable``, ``path/to/file.py:callable``, or (for teachers) a run directory
written by ``logitcache train``. Everything resolves to plain objects that the Python API takes directly.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

import logitcache.augment.presets as aug
from logitcache import distributed
from logitcache.datasets import BUILTIN, Head, image_folder
from logitcache.errors import LogitcacheError
from logitcache.store.meta import CacheMeta
from logitcache.models import Ensemble, small_resnet

MODEL_FILE, MODEL_SPEC_FILE = "model.safetensors", "model.json"


_USER_MODULE = "_logitcache_file_"  # + the file's resolved path, hex-encoded: the same name in every process


def _importable(folder: Path) -> None:
    """Puts ``folder`` first on ``sys.path`` (where Python puts a script's own folder) unless it is there, so that a
    spec file imports its neighbours (``import presets`` beside it) as it does when run as a script. The folder stays:
    a function that imports lazily, and objects of a neighbour's classes unpickled in DataLoader workers (which inherit
    ``sys.path`` when started by spawn or forkserver), find their modules too."""
    entry = str(folder)
    if entry not in sys.path:
        sys.path.insert(0, entry)


class _UserFiles(importlib.abc.MetaPathFinder):
    """Imports ``path/file.py`` specs under a name that encodes the file's path, so that any process can import the
    module again by name: objects defined in the file pickle by reference and reach DataLoader workers started by
    spawn or forkserver, which import ``logitcache`` (and with it this finder) before they unpickle the dataset. The
    file's folder is importable while it loads, in whichever process imports it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if not name.startswith(_USER_MODULE) or "." in name:
            return None
        try:
            file = bytes.fromhex(name[len(_USER_MODULE) :]).decode()
        except ValueError:
            return None
        _importable(Path(file).parent)
        return importlib.util.spec_from_file_location(name, file)


if not any(isinstance(f, _UserFiles) for f in sys.meta_path):
    sys.meta_path.append(_UserFiles())


def load_callable(spec: str) -> Callable[..., Any]:
    """``pkg.module:name`` or ``path/to/file.py:name`` -> the object."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise LogitcacheError(f"{spec!r} is not a callable spec; write pkg.module:function or path/file.py:function")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise LogitcacheError(f"{spec}: file {path} does not exist")
        mod_name = _USER_MODULE + str(path.resolve()).encode().hex()
        try:
            module = importlib.import_module(mod_name)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise LogitcacheError(f"{spec}: importing {path} failed: {type(e).__name__}: {e}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise LogitcacheError(f"{spec}: cannot import module {target!r} ({e})") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise LogitcacheError(f"{spec}: {target} has no callable named {attr!r}")
    return fn


def _call(spec: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except LogitcacheError:
        raise
    except Exception as e:
        raise LogitcacheError(f"{spec}: calling it failed: {type(e).__name__}: {e}") from None


def resolve_dataset(spec: str, train: bool = True, limit: int | None = None) -> Dataset:
    """A map-style dataset of ``(image, int label)`` without random transforms; its first ``limit`` samples if set."""
    if spec in BUILTIN:
        ds = BUILTIN[spec](train=train)
    elif spec.startswith("imagefolder:"):
        ds = image_folder(spec.split(":", 1)[1], train=train)
    elif ":" in spec:
        ds = _call(spec, load_callable(spec), train=train)
    else:
        raise LogitcacheError(
            f"unknown dataset {spec!r}; use one of {', '.join(BUILTIN)}, imagefolder:PATH, or pkg.module:function"
        )
    if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
        raise LogitcacheError(f"dataset {spec!r} returned {type(ds).__name__}, not a map-style dataset")
    if len(ds) == 0:
        raise LogitcacheError(f"dataset {spec!r} is empty")
    sample = ds[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2 and isinstance(sample[1], int)):
        raise LogitcacheError(
            f"dataset {spec!r} must return (image, int label) pairs; sample 0 is {type(sample).__name__}"
            + (
                f" with label type {type(sample[1]).__name__}"
                if isinstance(sample, (tuple, list)) and len(sample) == 2
                else ""
            )
        )
    return Head(ds, limit) if limit else ds


def image_shape(dataset: Dataset) -> tuple[int, int]:
    """``(channels, smaller side)`` of the dataset's first image (PIL, NumPy HWC or CHW tensor)."""
    from torchvision.transforms import v2

    image = v2.ToImage()(dataset[0][0])
    return int(image.shape[0]), min(image.shape[-2:])


def resolve_augment(spec: str, dataset: Dataset) -> tuple[Callable[[Any], torch.Tensor], Callable[[Any], torch.Tensor]]:
    """``(training transform, evaluation transform)``.

    A user callable ``fn()`` returns either the training transform (evaluation then uses the ``none`` preset) or a
    ``(training, evaluation)`` pair.
    """
    if spec in aug.PRESETS:
        train_fn, eval_fn = aug.PRESETS[spec]
        channels, size = image_shape(dataset)
        return train_fn(size, channels), eval_fn(size, channels)
    if spec.startswith("timm:"):
        _timm()
        return timm_augment(spec[len("timm:") :], *image_shape(dataset))
    if ":" not in spec:
        raise LogitcacheError(
            f"unknown augmentation {spec!r}; use one of {', '.join(aug.PRESETS)} or pkg.module:function"
        )
    transform = _call(spec, load_callable(spec))
    evaluation = aug.plain()
    if isinstance(transform, tuple) and len(transform) == 2:
        transform, evaluation = transform
    if not callable(transform) or not callable(evaluation):
        raise LogitcacheError(f"augmentation {spec!r} returned {type(transform).__name__}, not a transform")
    out = transform(dataset[0][0])
    if not isinstance(out, torch.Tensor):
        raise LogitcacheError(f"augmentation {spec!r} must map an image to a tensor; it returned {type(out).__name__}")
    return transform, evaluation


def _timm():
    try:
        import timm
    except ImportError:
        raise LogitcacheError("timm: specs need timm: pip install 'logitcache[timm]'") from None
    return timm


def _timm_model(name: str, **kwargs: Any) -> nn.Module:
    timm = _timm()
    if not timm.is_model(name):
        raise LogitcacheError(f"unknown timm model {name!r} (timm.list_models() lists them)")
    return timm.create_model(name, pretrained=False, **kwargs)  # weights come from a run or --teacher-weights


def timm_augment(policy: str, channels: int, size: int) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """``timm:POLICY``: timm's training transform with that auto-augment policy (e.g. ``rand-m9-mstd0.5-inc1``),
    random-resized crop and flip at the dataset's size, normalised to mean 0.5 / sd 0.5; and timm's evaluation
    transform. timm draws from Python's ``random`` and torch, both seeded by the replay, so it replays exactly."""
    from timm.data import create_transform

    common: dict[str, Any] = dict(input_size=(channels, size, size), mean=(0.5,) * channels, std=(0.5,) * channels)
    try:
        train = create_transform(is_training=True, auto_augment=policy or None, **common)
        evaluation = create_transform(is_training=False, crop_pct=1.0, **common)
    except (AssertionError, ValueError, KeyError) as e:  # timm asserts on an unknown policy name
        raise LogitcacheError(f"timm cannot make the augmentation {policy!r}: {e}") from None
    if channels == 1:  # timm's PIL ops work on RGB; a grayscale image goes in as RGB and comes out as one channel
        return _Gray(train), _Gray(evaluation)
    return train, evaluation


class _Gray:
    def __init__(self, transform: Callable[[Any], Any]):
        self.transform = transform

    def __call__(self, image: Any) -> torch.Tensor:
        return self.transform(image.convert("RGB"))[:1]

    def __repr__(self) -> str:
        return f"Gray({self.transform!r})"


def build_model(spec: str, num_classes: int, in_channels: int) -> nn.Module:
    """A fresh model: ``small-resnet...``, ``timm:NAME``, a torchvision model name, or ``fn(num_classes=,
    in_channels=)``."""
    model: object = small_resnet(spec, num_classes, in_channels)  # a user's callable may return anything: checked below
    if model is None and spec.startswith("timm:"):
        model = _timm_model(spec[len("timm:") :], num_classes=num_classes, in_chans=in_channels)
    elif model is None and ":" in spec:
        model = _call(spec, load_callable(spec), num_classes=num_classes, in_channels=in_channels)
    elif model is None:
        model = _torchvision_model(spec, num_classes, what="model", in_channels=in_channels)
    if not isinstance(model, nn.Module):
        raise LogitcacheError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _torchvision_model(spec: str, num_classes: int | None, what: str, in_channels: int = 3) -> nn.Module:
    """torchvision's model ``spec`` without pretrained weights, with ``num_classes`` outputs (None: its default)."""
    import torchvision.models as tvm

    if spec not in tvm.list_models():
        raise LogitcacheError(
            f"unknown {what} {spec!r}; use "
            + (
                "a run directory, timm:NAME, pkg.module:function, path/file.py:function or a torchvision model name"
                if what == "teacher"
                else "small-resnet8/14/20[-wW], a torchvision model name, or pkg.module:function"
            )
        )
    if in_channels != 3:  # every torchvision classifier's first layer takes RGB
        raise LogitcacheError(
            f"torchvision's {spec} takes 3-channel images and these have {in_channels}; use a timm:NAME model "
            "(timm adapts the first layer), small-resnet8/14/20[-wW] or pkg.module:function"
        )
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    try:
        return tvm.get_model(spec, weights=None, **kwargs)
    except Exception as e:  # e.g. a detection model's num_classes
        raise LogitcacheError(f"torchvision cannot make {spec}: {type(e).__name__}: {e}") from None


# Checkpoints ------------------------------------------------------------------------------------------------------
#
# A weights file is read with torch.load(weights_only=True): torch's restricted unpickler, which builds tensors and
# containers and calls only the functions it is given. It is given these, the plain data that training scripts'
# checkpoints hold beside the weights; each builds a value from the file's data and runs no other code:
#   argparse.Namespace  the arguments torchvision's and timm's training scripts store under "args";
#   pathlib paths       output folders in those arguments, built as pure paths (valid on any OS, never touching disk),
#                       under Python 3.13's name (pathlib._local) too;
#   datetime values     timestamps; frozenset, slice and range: containers of plain values;
#   numpy scalars, dtypes and arrays  metrics a script computed with NumPy (numpy 2's and numpy 1's names).
# Every other class or function the file names becomes a stand-in (_StandIn) that records the arguments and state the
# file gives it: the named object is never imported and no code of its runs. A file that names a function that runs
# code or touches the system (os.system, subprocess, eval, ...) is refused before anything is loaded.


def _plain_globals() -> list[Any]:
    import argparse
    import datetime
    import pathlib

    import numpy as np

    plain: list[Any] = [argparse.Namespace, frozenset, slice, range]
    plain += [datetime.date, datetime.datetime, datetime.time, datetime.timedelta, datetime.timezone]
    for module in ("pathlib", "pathlib._local"):
        for name, pure in (("PosixPath", pathlib.PurePosixPath), ("WindowsPath", pathlib.PureWindowsPath)):
            plain += [(pure, f"{module}.{name}"), (pure, f"{module}.Pure{name}")]
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        plain += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    plain += [(np.dtype, "numpy.dtype"), (np.ndarray, "numpy.ndarray")]
    # a dtype's state is set on an object of its class: numbers, strings, bytes, objects, datetimes
    plain += sorted({type(np.dtype(code)) for code in "?bhilqBHILQefdgFDGSUVOMm"}, key=str)
    return plain


# Functions and modules whose presence in a weights file means it runs code when unpickled by pickle itself.
_RUNS_CODE_MODULES = {
    "os", "posix", "nt", "sys", "subprocess", "shutil", "importlib", "runpy", "pty", "socket", "ctypes", "pickle",
    "_pickle", "marshal", "code", "codeop", "types", "webbrowser", "multiprocessing", "pdb", "timeit", "__builtin__",
}  # fmt: skip
_RUNS_CODE_BUILTINS = {
    "eval", "exec", "compile", "__import__", "open", "breakpoint", "input", "getattr", "setattr", "delattr",
    "globals", "locals", "vars",
}  # fmt: skip


def _runs_code(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    return module.split(".")[0] in _RUNS_CODE_MODULES or (module == "builtins" and attr in _RUNS_CODE_BUILTINS)


class _StandIn:
    """An object of a class (or a function's result) that a checkpoint names and that is not loaded: it keeps the
    arguments and the state the file gives it, so that the weights of a whole pickled module (``torch.save(model)``)
    can still be read from its ``_parameters`` and ``_buffers``; nothing else about it is trusted or called."""

    name = "?"  # the dotted name in the file
    args: tuple[Any, ...]
    state: Any

    def __new__(cls, *args: Any, **kwargs: Any) -> "_StandIn":
        self = super().__new__(cls)
        self.args, self.state = args, None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"{self.name} (not loaded)"


def _stand_in(name: str) -> tuple[type, str]:
    return type(name.rpartition(".")[2] or name, (_StandIn,), {"name": name}), name


def read_checkpoint(path: str | Path) -> Any:
    """What a ``torch.save`` file holds, read without running any code the file names (see the notes above): plain
    data as itself, objects of other classes as stand-ins. A ``.safetensors`` file gives its flat dict of tensors."""
    path = Path(path)
    if not path.is_file():
        raise LogitcacheError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:
            raise LogitcacheError(f"cannot read weights {path}: {type(e).__name__}: {_first_line(e)}") from None
    plain = _plain_globals()
    with torch.serialization.safe_globals(plain):
        try:
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # not a zip checkpoint (legacy format, TorchScript, another file): torch.load says what
            unknown = []
    refused = [name for name in unknown if _runs_code(name)]
    if refused:
        raise LogitcacheError(
            f"refused {path}: unpickling it calls {', '.join(refused[:3])}, which runs code, not a weights file's "
            "data; nothing in it was run"
        )
    with torch.serialization.safe_globals(plain + [_stand_in(name) for name in unknown]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            text = str(e)
            if "WeightsUnpickler error:" in text:  # torch's reason, between its advice to load unsafely and a link
                text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
            why = " ".join(text.split()) or type(e).__name__
            raise LogitcacheError(
                f"cannot read weights {path} without running code from it: {why}; save its state dict alone "
                "(torch.save(model.state_dict(), ...) or safetensors)"
            ) from None


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# Where a checkpoint keeps the weights, in the order they are looked for when the caller names no key: the trained
# weights first, under each name common scripts give them (Lightning and timm: "state_dict"; torchvision's and DeiT's
# scripts: "model"; some DDP scripts: "module"), then the exponential moving averages (timm: "state_dict_ema";
# torchvision: "model_ema"), which are a different model and used only when a file holds no other weights.
WEIGHT_KEYS = ("state_dict", "model", "module", "state_dict_ema", "model_ema")
# Prefixes a wrapper adds to every name: DDP and DataParallel ("module."), a LightningModule's attribute ("model."),
# torch.compile ("_orig_mod."); removed, in any combination, when the model's own names lack them.
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")


def _as_state_dict(value: Any) -> dict[str, torch.Tensor] | None:
    """``value`` as a state dict (names -> tensors) if it is one or a pickled module that holds one, else None."""
    if isinstance(value, _StandIn):
        return _module_state(value)
    if isinstance(value, dict) and value and all(isinstance(k, str) for k in value):
        if all(isinstance(v, torch.Tensor) for v in value.values()):
            return dict(value)
    return None


def _module_state(module: _StandIn, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """The state dict of a module pickled whole, from the attributes ``nn.Module`` keeps its tensors in."""
    state = module.state
    if not (isinstance(state, dict) and isinstance(state.get("_parameters"), dict)):
        return None
    out = {prefix + k: v for k, v in state["_parameters"].items() if isinstance(v, torch.Tensor)}
    transient = state.get("_non_persistent_buffers_set") or set()
    buffers = state.get("_buffers") or {}
    out.update({prefix + k: v for k, v in buffers.items() if isinstance(v, torch.Tensor) and k not in transient})
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, _StandIn):
            out.update(_module_state(child, f"{prefix}{name}.") or {})
    return out


def _kind(value: Any) -> str:
    if isinstance(value, _StandIn):
        return value.name.rpartition(".")[2]
    if isinstance(value, dict) and _as_state_dict(value) is not None:
        return f"state dict of {len(value)} tensors"
    return type(value).__name__


def _a(kind: str) -> str:
    return ("an " if kind[:1].lower() in "aeiou" else "a ") + kind


def _listing(obj: Any, limit: int = 8) -> str:
    """``obj``'s top level for a message: its keys and what each holds, or what it is."""
    if not isinstance(obj, dict):
        return f"it holds {_a(_kind(obj))}, not a dict"
    if not obj:
        return "it holds an empty dict"
    keys = list(obj)
    shown = ", ".join(f"{k!s} ({_kind(obj[k])})" for k in keys[:limit])
    return f"its top-level keys: {shown}" + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def find_weights(checkpoint: Any, path: str | Path, key: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ``checkpoint`` (read from ``path``) and the key it came from (``""``: the top level).

    ``key`` names the top-level entry that holds the weights; without it the file's top level is used when it is a
    state dict or a pickled module, else the first of ``WEIGHT_KEYS`` that holds one; when several do, a note names
    the one used and the others."""
    if key is not None:
        if _as_state_dict(checkpoint) is not None:
            raise LogitcacheError(f"weights {path} are a plain state dict with no key {key!r}: leave the key out")
        if not isinstance(checkpoint, dict) or key not in checkpoint:
            raise LogitcacheError(f"weights {path} have no key {key!r}; {_listing(checkpoint)}")
        state = _as_state_dict(checkpoint[key])
        if state is None:
            raise LogitcacheError(f"weights {path}: key {key!r} holds {_a(_kind(checkpoint[key]))}, not a state dict")
        return state, key
    state = _as_state_dict(checkpoint)
    if state is not None:
        return state, ""
    found: list[tuple[str, dict[str, torch.Tensor]]] = []
    if isinstance(checkpoint, dict):
        for k in WEIGHT_KEYS:
            candidate = _as_state_dict(checkpoint.get(k))
            if candidate is not None:
                found.append((k, candidate))
    if not found:
        raise LogitcacheError(
            f"no weights found in {path}: {_listing(checkpoint)}; name the key that holds them (--teacher-key)"
        )
    if len(found) > 1:
        from logitcache.progress import note

        used, others = found[0][0], ", ".join(k for k, _ in found[1:])
        note(f"weights: {path}[{used!r}]; it also holds {others} (--teacher-key picks one)", distributed.rank() == 0)
    return found[0][1], found[0][0]


def _fit_names(names: set[str], state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` without a wrapper's prefix that its names carry and ``names`` (the model's) lack, and that prefix.
    The state's names without the prefix (a LightningModule's loss buffers, the ``n_averaged`` counter of
    torchvision's EMA) are left out. The prefix removed is the first (fewest wrappers) that gives every name of the
    model; when none does, the one that gives the most, or none, so that the message names what still differs."""
    if names <= state.keys():
        return state, ""
    best, best_prefix, best_overlap = state, "", len(names & state.keys())
    frontier = [""]
    for _ in range(3):  # up to three wrappers deep: module._orig_mod.model.
        frontier = [p + w for p in frontier for w in _WRAPPER_PREFIXES if any(k.startswith(p + w) for k in state)]
        for prefix in frontier:
            if any(n.startswith(prefix) for n in names):
                continue  # the model itself carries it: not a wrapper's
            stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            overlap = len(names & stripped.keys())
            if overlap == len(names):
                return stripped, prefix
            if overlap > best_overlap:
                best, best_prefix, best_overlap = stripped, prefix, overlap
    return best, best_prefix


def _few(items: list[str], limit: int = 4) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def load_weights(model: nn.Module, path: str | Path, key: str | None = None) -> nn.Module:
    """``model`` with the weights in ``path``: a ``.safetensors`` file, or a ``torch.save`` file read without running
    code from it (``read_checkpoint``): a state dict, a whole pickled module, or a training checkpoint that holds
    one (torchvision's and timm's scripts, Lightning; ``find_weights`` says where it looks and ``key`` names the
    entry). Names carrying a wrapper's prefix (DDP ``module.``, Lightning ``model.``, torch.compile ``_orig_mod.``)
    fit a model without it. Every problem is one ``LogitcacheError`` line naming what the file holds."""
    path = Path(path)
    checkpoint = read_checkpoint(path)
    if key is not None and path.suffix == ".safetensors":
        raise LogitcacheError(f"weights {path}: a .safetensors file is one flat state dict; it has no key {key!r}")
    state, found_at = find_weights(checkpoint, path, key)
    expected = model.state_dict()
    state, prefix = _fit_names(set(expected), state)
    where = f"weights {path}" + (f"[{found_at!r}]" if found_at else "") + (f" (without {prefix!r})" if prefix else "")
    try:
        model.load_state_dict(state)
    except Exception as e:  # torch's own checks (and its modules' hooks) decide; the message says what differs
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        shapes = [
            f"{k} is {list(state[k].shape)} in the file, {list(v.shape)} in the model"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        problems = (
            ([f"missing {_few(missing)}"] if missing else [])
            + ([f"unexpected {_few(unexpected)}"] if unexpected else [])
            + ([f"shapes differ: {_few(shapes, 2)}"] if shapes else [])
        ) or [" ".join(str(e).split())[:300]]
        raise LogitcacheError(f"{where} do not fit the model: {'; '.join(problems)}") from None
    return model


def is_run_dir(spec: str) -> bool:
    return (Path(spec) / MODEL_SPEC_FILE).is_file()


def resolve_teacher(
    spec: str, weights: str | Path | None = None, *, key: str | None = None, num_classes: int | None = None
) -> nn.Module:
    """A teacher in eval mode: a run directory, ``timm:NAME``, ``fn()`` returning a module, or a torchvision model name.

    Several run directories separated by commas (``runs/a,runs/b``) make an ensemble of earlier runs. ``weights``
    (``load_weights``) replaces the teacher's weights, from the entry ``key`` of a training checkpoint when given.
    ``num_classes`` sizes a timm or torchvision teacher's classifier (their default: 1,000 ImageNet classes) and is
    passed to a callable as ``fn(num_classes=)``; a run directory records its own and must agree.
    """
    if key is not None and weights is None:
        raise LogitcacheError(f"a weights key ({key!r}) names an entry of a weights file; give the file too")
    if "," in spec:
        members = [s for s in spec.split(",") if s]
        not_runs = [s for s in members if not is_run_dir(s)]
        if not_runs or weights is not None:
            raise LogitcacheError(
                f"an ensemble teacher is a comma-separated list of run directories; not run directories: "
                f"{', '.join(not_runs) or '(none)'}" + ("; --teacher-weights does not apply to it" if weights else "")
            )
        return Ensemble([resolve_teacher(s, num_classes=num_classes) for s in members]).eval()
    if is_run_dir(spec):
        info = json.loads((Path(spec) / MODEL_SPEC_FILE).read_text())
        if num_classes is not None and num_classes != info["num_classes"]:
            raise LogitcacheError(
                f"teacher {spec} was trained on {info['num_classes']} classes, not the {num_classes} asked for"
            )
        model = build_model(info["model"], info["num_classes"], info["in_channels"])
        load_weights(model, Path(spec) / MODEL_FILE)
    elif Path(spec).is_dir():
        raise LogitcacheError(f"teacher {spec} is a folder without {MODEL_SPEC_FILE}: not a logitcache run directory")
    elif spec.startswith("timm:"):
        sized = {} if num_classes is None else {"num_classes": num_classes}
        model = _timm_model(spec[len("timm:") :], **sized)
    elif ":" in spec:
        model = _call(spec, load_callable(spec), **({} if num_classes is None else {"num_classes": num_classes}))
    else:
        model = _torchvision_model(spec, num_classes, what="teacher")
    if not isinstance(model, nn.Module):
        raise LogitcacheError(f"teacher {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights, key)
    return model.eval()


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when present. A bare ``cuda`` names one device: under torchrun (``LOCAL_RANK`` set) this
    process's own, ``cuda:LOCAL_RANK``, else the current one; so that DDP and pinned copies name one device
    explicitly. The same resolution ``distributed.init_from_env`` makes, from the CLI and the Python API alike."""
    return distributed.resolve_device(device)


def recorded_augment(meta: CacheMeta, base: Dataset) -> Callable[[Any], torch.Tensor]:
    """The training transform a cache was built with, from the spec its metadata records."""
    spec = meta.augment.spec
    if spec is None:
        raise LogitcacheError(
            "the cache was built from Python with a transform object; pass the same transform as "
            f"augment= (recorded: {meta.augment.repr})"
        )
    return resolve_augment(spec, base)[0]
