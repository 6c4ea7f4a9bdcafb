"""Fingerprints recorded in a cache so that a mismatched teacher, dataset or library is detected, not trusted."""

from __future__ import annotations

import difflib
import enum
import functools
import hashlib
import inspect
import json
import math
import platform
import re
import sys
import types
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from logitcache.datasets import dataset_len, labels_of
from logitcache.version import __version__

SAMPLE_POINTS = 8


def teacher_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _image_bytes(image) -> bytes:
    if hasattr(image, "tobytes"):
        return image.tobytes()
    return np.ascontiguousarray(torch.as_tensor(image).numpy()).tobytes()


def dataset_fingerprint(dataset: Dataset, labels: np.ndarray | None = None) -> dict:
    """Length, a hash of all labels, and a hash of a few raw samples spread over the dataset (catches reordering)."""
    labels = labels_of(dataset) if labels is None else labels
    n = dataset_len(dataset)
    samples = hashlib.sha256()
    for j in range(min(SAMPLE_POINTS, n)):
        i = j * (n - 1) // max(SAMPLE_POINTS - 1, 1)
        samples.update(_image_bytes(dataset[i][0]))
    return {
        "length": n,
        "labels_sha256": hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest(),
        "samples_sha256": samples.hexdigest(),
    }


def versions() -> dict:
    import numcodecs
    import torchvision
    import zarr

    return {
        "logitcache": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "zarr": zarr.__version__,
        "numcodecs": numcodecs.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------------------------------
# The augmentation as plain data: what the pipeline is, compared by structure when a cache is opened.
#
# A transform is described as a node {"class", "module", "params"}: its class's qualified name, the public module it
# is reached from (torchvision.transforms.v2, not torchvision.transforms.v2._color), and its public instance
# attributes as JSON values. Containers (Compose, RandomApply, RandomChoice, timm's RandAugment, ...) need no special
# case: their transforms are a public attribute like any other, described in turn. Functions and classes are named,
# never addressed; nothing recorded holds a memory address, so the same pipeline built twice describes the same.

STRUCTURE_DEPTH = 8  # nesting below which an object is named, not described
STRUCTURE_LIST = 64  # longer sequences are recorded by their length alone (a dataset's file list, say)
STRUCTURE_VALUES = 4096  # at most this many values per description: a transform holding a large object stays cheap
# Packages whose classes are compared by module and name; any other class (a user's) by its name alone, as a user
# file may be imported under another module name (a `path/file.py:fn` spec is imported under a name encoding its path).
LIBRARIES = frozenset(
    {"torchvision", "timm", "torch", "PIL", "numpy", "logitcache", "kornia", "albumentations", "functools", "builtins"}
)
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def augment_structure(transform: Any) -> Any:
    """``transform`` as plain JSON data (the ``augment.structure`` a cache records): nested nodes
    ``{"class", "module", "params"}`` for objects, ``{"ref", "module"}`` for functions and classes, ``{"mapping"}``
    for dicts, ``{"array"}`` for tensors and arrays, numbers, strings and lists for the rest. Only public instance
    attributes are read: state a transform changes as it runs belongs in a ``_private`` attribute, or the structure
    of the same transform would differ after a call."""
    budget = [STRUCTURE_VALUES]
    return json.loads(json.dumps(_describe(transform, 0, set(), budget), allow_nan=False))


def public_module(obj: Any) -> str:
    """The shortest module path that exposes ``obj`` (a class or function) under its name: the import users write
    (``torchvision.transforms.v2``), stable where a library moves it between private modules."""
    module, name = getattr(obj, "__module__", None) or "", getattr(obj, "__qualname__", "")
    parts = module.split(".")
    for end in range(1, len(parts)):
        prefix = ".".join(parts[:end])
        mod = sys.modules.get(prefix)
        if mod is not None and "." not in name and getattr(mod, name, None) is obj:
            return prefix
    return module


def _name(obj: Any) -> dict[str, str]:
    return {"module": public_module(obj), "qualname": getattr(obj, "__qualname__", type(obj).__qualname__)}


def _describe(value: Any, depth: int, seen: set[int], budget: list[int]) -> Any:
    budget[0] -= 1
    if value is None or isinstance(value, (bool, int, str)) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, enum.Enum):
        return f"{type(value).__qualname__}.{value.name}"
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return _array(value)
    if isinstance(value, (np.generic,)):
        return _describe(value.item(), depth, seen, budget)
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)):
        name = _name(getattr(value, "__func__", value))
        return {"ref": name["qualname"], "module": name["module"]}
    if depth >= STRUCTURE_DEPTH or budget[0] <= 0 or id(value) in seen:
        return _opaque(value)
    seen = seen | {id(value)}
    if isinstance(value, (list, tuple)):
        if len(value) > STRUCTURE_LIST:
            return {"sequence": type(value).__qualname__, "length": len(value)}
        return [_describe(v, depth + 1, seen, budget) for v in value]
    if isinstance(value, (set, frozenset)):
        items = [_describe(v, depth + 1, seen, budget) for v in list(value)[:STRUCTURE_LIST]]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(value, dict):
        return {"mapping": {str(k): _describe(v, depth + 1, seen, budget) for k, v in list(value.items())[:256]}}
    params: dict[str, Any] | None
    if isinstance(value, functools.partial):
        params = {"func": value.func, "args": list(value.args), "keywords": dict(value.keywords)}
    else:
        params = _public_attributes(value)
        if params is None:
            return _opaque(value)
    name = _name(type(value))
    return {
        "class": name["qualname"],
        "module": name["module"],
        "params": {k: _describe(v, depth + 1, seen, budget) for k, v in sorted(params.items())},
    }


def _public_attributes(obj: Any) -> dict[str, Any] | None:
    """An object's public instance attributes (an ``nn.Module``'s submodules included, its ``training`` flag left
    out); None for an object without any instance state to read."""
    state = getattr(obj, "__dict__", None)
    if state is None:
        return None
    out = {k: v for k, v in state.items() if not k.startswith("_")}
    if isinstance(obj, torch.nn.Module):
        out.pop("training", None)
        out.update((k, v) for k, v in obj._modules.items() if not k.startswith("_"))
    return out


def _array(value: torch.Tensor | np.ndarray) -> dict[str, Any]:
    t = torch.as_tensor(value).detach().cpu()
    out: dict[str, Any] = {"array": str(t.dtype), "shape": list(t.shape)}
    if t.numel() <= 16 and not t.is_complex():
        out["values"] = [v if math.isfinite(v) else repr(v) for v in t.double().flatten().tolist()]
    else:
        out["sha256"] = hashlib.sha256(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
    return out


def _opaque(value: Any) -> dict[str, Any]:
    """An object named, not described: its class, and its ``repr`` (addresses removed) when it has no attributes to
    describe (a C object such as a generator); a container or an object past the depth or budget is named alone."""
    name = _name(type(value))
    text = ""
    if not hasattr(value, "__dict__") and not isinstance(value, (list, tuple, dict, set, frozenset)):
        try:
            text = _ADDRESS.sub("", repr(value))[:200]
        except Exception:
            text = ""
    return {"object": name["qualname"], "module": name["module"], "repr": text}


def structure_differences(recorded: Any, fresh: Any) -> list[str]:
    """What differs between two ``augment_structure`` descriptions, each as a short phrase naming the transform and
    where it sits (``transforms[4]`` is the fifth of a ``Compose``): ``RandomErasing(p=0.1) added at
    transforms[4]``, ``ColorJitter.brightness [0.6, 1.4] -> [0.8, 1.2] at transforms[3]``. Empty when they agree.
    Classes of known libraries compare by module and name, a user's classes by name alone."""
    out: list[str] = []
    _diff(_normal(recorded), _normal(fresh), "", "", "", out)
    return out


def _normal(v: Any) -> Any:
    """A description with the modules of user code left out: a user's file may be imported under another module
    name (a ``path/file.py:fn`` spec is imported under a name encoding its path), so its classes and functions are
    compared by name."""
    if isinstance(v, list):
        return [_normal(x) for x in v]
    if not isinstance(v, dict):
        return v
    out = {k: _normal(x) for k, x in v.items()}
    if "module" in out and not _library(out["module"]):
        out["module"] = ""
    return out


def _is_node(v: Any) -> bool:
    return isinstance(v, dict) and "class" in v and "params" in v


def _is_mapping(v: Any) -> bool:
    return isinstance(v, dict) and "mapping" in v


def _library(module: Any) -> bool:
    return isinstance(module, str) and module.split(".")[0] in LIBRARIES


def _key(v: Any) -> str:
    """What identifies an element of a sequence when two sequences are aligned: a node's class, else the value."""
    if _is_node(v):
        return f"{v['class']}@{v['module']}"
    return json.dumps(v, sort_keys=True)


def _at(path: str) -> str:
    return f" at {path}" if path else ""


def _diff(a: Any, b: Any, owner: str, where: str, path: str, out: list[str]) -> None:
    """Differences between ``a`` (recorded) and ``b`` (given). ``owner`` names the attribute holding them
    (``ColorJitter.brightness``), ``where`` the transform that has it and ``path`` the value itself, as paths from
    the pipeline's root (``transforms[3]``, ``transforms[3].brightness``)."""
    if a == b:
        return
    if _is_node(a) and _is_node(b) and _key(a) == _key(b):
        pa, pb = a["params"], b["params"]
        for name in sorted(set(pa) | set(pb)):
            va, vb = pa.get(name, _ABSENT), pb.get(name, _ABSENT)
            _diff(va, vb, f"{a['class']}.{name}", path, f"{path}.{name}" if path else name, out)
    elif _is_node(a) and _is_node(b):
        out.append(f"{summary(b)} instead of {summary(a)}{_at(path)}")
    elif isinstance(a, list) and isinstance(b, list) and (_has_nodes(a) or _has_nodes(b)):
        matcher = difflib.SequenceMatcher(None, [_key(v) for v in a], [_key(v) for v in b], autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
                for i, j in zip(range(i1, i2), range(j1, j2)):
                    _diff(a[i], b[j], f"{owner}[{j}]", where, f"{path}[{j}]", out)
                continue
            out.extend(f"{summary(a[i])} removed from {path}[{i}]" for i in range(i1, i2))
            out.extend(f"{summary(b[j])} added at {path}[{j}]" for j in range(j1, j2))
    elif _is_mapping(a) and _is_mapping(b):
        ma, mb = a["mapping"], b["mapping"]
        for name in sorted(set(ma) | set(mb)):
            va, vb = ma.get(name, _ABSENT), mb.get(name, _ABSENT)
            _diff(va, vb, f"{owner}[{name!r}]", where, f"{path}[{name!r}]", out)
    else:
        out.append(f"{owner or 'the augmentation'} {show(a)} -> {show(b)}{_at(where)}")


def _has_nodes(v: Any) -> bool:
    if _is_node(v):
        return True
    if isinstance(v, list):
        return any(_has_nodes(x) for x in v)
    return isinstance(v, dict) and "mapping" in v and any(_has_nodes(x) for x in v["mapping"].values())


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT: Any = _Absent()


def show(v: Any, width: int = 60) -> str:
    """A described value as people read it: ``0.1``, ``[16, 16]``, ``RandomErasing(p=0.1)``, ``functools.partial``."""
    if _is_node(v):
        text = summary(v)
    elif isinstance(v, dict) and "ref" in v:
        text = v["ref"]
    elif isinstance(v, dict) and "mapping" in v:
        text = "{" + ", ".join(f"{k}: {show(x, width)}" for k, x in v["mapping"].items()) + "}"
    elif isinstance(v, dict) and "array" in v:
        text = f"{v['array']}{v['shape']}" + (f" {v['values']}" if "values" in v else "")
    elif isinstance(v, dict) and "object" in v:
        text = v["repr"] or v["object"]
    elif isinstance(v, dict) and "sequence" in v:
        text = f"{v['sequence']} of {v['length']}"
    elif isinstance(v, list):
        text = "[" + ", ".join(show(x, width) for x in v) + "]"
    elif isinstance(v, float):
        text = f"{v:.6g}"
    else:
        text = repr(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def summary(node: Any, most: int = 4) -> str:
    """A node as a short call: its class and the parameters that differ from the class's defaults, where the class
    can be found to read them (``RandomErasing(p=0.1)``)."""
    if not _is_node(node):
        return show(node)
    defaults = _defaults(node)
    shown = [
        f"{k}={show(v, 30)}"
        for k, v in node["params"].items()
        if not (k in defaults and _is_default(v, defaults[k])) and not _has_nodes(v)
    ]
    more = ", ..." if len(shown) > most else ""
    return f"{node['class']}({', '.join(shown[:most])}{more})"


def _defaults(node: dict) -> dict[str, Any]:
    cls: Any = sys.modules.get(node.get("module") or "")
    for part in str(node["class"]).split("."):
        cls = getattr(cls, part, None)
    if not isinstance(cls, type):
        return {}
    try:
        params = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params:
        if p.default is not inspect.Parameter.empty:
            try:
                out[p.name] = augment_structure(p.default)
            except (TypeError, ValueError):
                pass
    return out


def _is_default(value: Any, default: Any) -> bool:
    """Whether a stored attribute is its parameter's default as the class keeps it: the same value, the default made
    a sequence (``value=[0.0]`` for ``0.0``), or None for a default that turns the operation off (``0``)."""
    if value == default:
        return True
    if value is None and default in (0, 0.0, False):
        return True
    return isinstance(value, list) and len(value) in (1, 2, 4) and all(x == default for x in value)
