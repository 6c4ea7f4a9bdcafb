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

from . import augment as aug
from .datasets import BUILTIN, Head, image_folder
from .errors import LogitcacheError
from .meta import CacheMeta
from .models import Ensemble, small_resnet

MODEL_FILE, MODEL_SPEC_FILE = "model.safetensors", "model.json"


_USER_MODULE = "_logitcache_file_"  # + the file's resolved path, hex-encoded: the same name in every process


class _UserFiles(importlib.abc.MetaPathFinder):
    """Imports ``path/file.py`` specs under a name that encodes the file's path, so that any process can import the
    module again by name: objects defined in the file pickle by reference and reach DataLoader workers started by
    spawn or forkserver, which import ``logitcache`` (and with it this finder) before they unpickle the dataset."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if not name.startswith(_USER_MODULE) or "." in name:
            return None
        try:
            file = bytes.fromhex(name[len(_USER_MODULE) :]).decode()
        except ValueError:
            return None
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
        import torchvision.models as tvm

        if spec not in tvm.list_models():
            raise LogitcacheError(
                f"unknown model {spec!r}; use small-resnet8/14/20[-wW], a torchvision model name, "
                "or pkg.module:function"
            )
        model = tvm.get_model(spec, weights=None, num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise LogitcacheError(f"model {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state dict from ``.safetensors`` or a weights-only ``torch.save`` file: never pickle."""
    path = Path(path)
    if not path.is_file():
        raise LogitcacheError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LogitcacheError(f"cannot read weights {path}: {type(e).__name__}: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except Exception as e:
        first = str(e).strip().splitlines()[:3]
        raise LogitcacheError(f"weights {path} do not fit the model: {' '.join(first)}") from None
    return model


def is_run_dir(spec: str) -> bool:
    return (Path(spec) / MODEL_SPEC_FILE).is_file()


def resolve_teacher(spec: str, weights: str | Path | None = None) -> nn.Module:
    """A teacher in eval mode: a run directory, ``fn()`` returning a module, or a torchvision model name.

    Several run directories separated by commas (``runs/a,runs/b``) make an ensemble of earlier runs.
    """
    if "," in spec:
        members = [s for s in spec.split(",") if s]
        not_runs = [s for s in members if not is_run_dir(s)]
        if not_runs or weights is not None:
            raise LogitcacheError(
                f"an ensemble teacher is a comma-separated list of run directories; not run directories: "
                f"{', '.join(not_runs) or '(none)'}" + ("; --teacher-weights does not apply to it" if weights else "")
            )
        return Ensemble([resolve_teacher(s) for s in members]).eval()
    if is_run_dir(spec):
        info = json.loads((Path(spec) / MODEL_SPEC_FILE).read_text())
        model = build_model(info["model"], info["num_classes"], info["in_channels"])
        load_weights(model, Path(spec) / MODEL_FILE)
    elif Path(spec).is_dir():
        raise LogitcacheError(f"teacher {spec} is a folder without {MODEL_SPEC_FILE}: not a logitcache run directory")
    elif spec.startswith("timm:"):
        model = _timm_model(spec[len("timm:") :])
    elif ":" in spec:
        model = _call(spec, load_callable(spec))
    else:
        import torchvision.models as tvm

        if spec not in tvm.list_models():
            raise LogitcacheError(
                f"unknown teacher {spec!r}; use a run directory, timm:NAME, pkg.module:function, "
                "path/file.py:function or a torchvision model name"
            )
        model = tvm.get_model(spec, weights=None)
    if not isinstance(model, nn.Module):
        raise LogitcacheError(f"teacher {spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def resolve_device(device: str) -> torch.device:
    """``auto`` -> CUDA when present. A bare ``cuda`` gets the current device's index (under torchrun: LOCAL_RANK),
    so that DDP and pinned copies name one device explicitly."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LogitcacheError("--device cuda was asked for but CUDA is not available on this machine")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise LogitcacheError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def recorded_augment(meta: CacheMeta, base: Dataset) -> Callable[[Any], torch.Tensor]:
    """The training transform a cache was built with, from the spec its metadata records."""
    spec = meta.augment.spec
    if spec is None:
        raise LogitcacheError(
            "the cache was built from Python with a transform object; pass the same transform as "
            f"augment= (recorded: {meta.augment.repr})"
        )
    return resolve_augment(spec, base)[0]
