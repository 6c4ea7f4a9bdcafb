"""Every path a GPU runs, driven on a fake CUDA device on this CPU.

PyTorch's fake tensors (``FakeTensorMode``) give tensors on ``cuda:0`` without a GPU: an operation that mixes one
with a CPU tensor raises ``FakeTensorDeviceMismatchError``, and a host read of a device value (``.item()``, ``int()``,
``bool()``, ``.tolist()``: a synchronisation on a real GPU) raises ``DataDependentOutputException``. So a path that
runs here makes every tensor on its inputs' device and never waits for the device.

Driven on fake ``cuda``: each encoding's device-side encode; its decode (``to_probs``), ``KDLoss`` and
``kd_loss(..., cache=)`` (both tails) on batches collated from real stores at 10, 100 and 5,000 classes; ``verify``'s
batch scoring; the trainer's step up to ``backward()`` (``train.step_loss``: the student's forward pass in fp32,
bf16 and fp16 autocast with channels-last, cross-entropy plus cached or online KD, the fp16 scaler's scaling).
Not driven: ``backward()`` and the optimizer step (the autograd engine needs a real CUDA context), and
``pin_memory`` (not implemented for fake tensors: an identity here). ``torch.cuda.is_available`` (and bf16 support)
is patched to True where autocast and the gradient scaler would otherwise switch themselves off on a CPU-only torch;
with it, a constant tensor made from host numbers inside the step (a synchronous copy on a real GPU) fails too.
"""

from __future__ import annotations

from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils.data import DataLoader

import helpers
import logitcache as lc
from logitcache import specs
from logitcache.compute import Compute
from logitcache.config import TrainConfig
from logitcache.student.loop import step_loss
from logitcache.teacher.verify import score_batch

ENCODINGS = ("full", "topk", "quantized", "sampled", "topk8", "headtail")
CLASSES = (10, 100, 5000)
CUDA = torch.device("cuda")


class WideTeacher(torch.nn.Module):
    """A fixed random linear map from the tiny images to ``classes`` logits (a teacher of any width)."""

    def __init__(self, classes: int):
        super().__init__()
        self.proj = torch.nn.Linear(16 * 16, classes)
        torch.nn.init.normal_(self.proj.weight, std=0.3, generator=torch.Generator().manual_seed(classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1)) * 3


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One real store per (classes, encoding), built lazily: topk8 keeps its tail table where it can (up to 4,096
    classes) and a flat tail above, as ``auto`` would choose headtail there."""
    made: dict[tuple[int, str], object] = {}
    root = tmp_path_factory.mktemp("fakegpu")

    def get(classes: int, encoding: str):
        if (classes, encoding) not in made:
            out = root / f"{encoding}-{classes}"
            options = {"tail_shape": "flat"} if encoding == "topk8" and classes > 4096 else {}
            lc.build_cache(WideTeacher(classes), helpers.tiny_dataset(), out, augment=helpers.heavy_augment(),
                           views=1, chunk_rows=64, batch_size=64, workers=0, progress=False, encoding=encoding,
                           **options)  # fmt: skip
            made[(classes, encoding)] = out
        return made[(classes, encoding)]

    return get


def _batch(path):
    """A fresh dataset on the store and one batch its loader collates (real CPU tensors, as a loader yields)."""
    ds = lc.CachedKDDataset(helpers.tiny_dataset(), path, augment=helpers.heavy_augment())
    ds.set_epoch(0)
    return ds, next(iter(DataLoader(ds, batch_size=32, sampler=ds.sampler(), num_workers=0)))


def _fake_mode() -> FakeTensorMode:
    torch.__future__.set_swap_module_params_on_conversion(False)  # modules move to fake devices in place
    return FakeTensorMode(allow_non_fake_inputs=True)


@pytest.fixture
def no_pin(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_decode_and_kd_loss_on_a_fake_gpu(stores, encoding, classes):
    ds, (images, labels, targets) = _batch(stores(classes, encoding))
    with ds, _fake_mode():
        on_gpu = {k: v.to(CUDA, non_blocking=True) for k, v in targets.items()}
        student = torch.randn(len(labels), classes, device=CUDA)
        for tail in ("uniform", "bucket"):
            kd = lc.KDLoss(ds, temperature=1.0, tail=tail).to(CUDA)
            loss = kd(student, on_gpu)
            assert loss.device == student.device and loss.shape == ()
            assert lc.kd_loss(student, on_gpu, 1.0, tail, cache=ds).device == student.device
        assert lc.to_probs(on_gpu, 2.0 if encoding != "sampled" else 1.0, cache=ds).shape == (len(labels), classes)
        if encoding == "sampled":  # decoded alone it reads the draws' temperature on the host: KDLoss does not
            with pytest.raises(DataDependentOutputException):
                lc.kd_loss(student, on_gpu, 1.0)
        elif "tail_row" not in on_gpu:  # a batch that decodes alone does so on the device too
            assert lc.kd_loss(student, on_gpu, 1.0).device == student.device


@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_device_side_encode_and_verify_scoring_on_a_fake_gpu(stores, encoding, classes, no_pin):
    ds, (images, labels, targets) = _batch(stores(classes, encoding))
    cache = ds.cache
    teacher = WideTeacher(classes)
    with ds, _fake_mode():
        teacher = teacher.to(CUDA)
        logits = teacher(images.to(CUDA))
        table = cache.decode_table(CUDA)
        fields = cache.encoding.encode(logits, torch.Generator().manual_seed(0), **({"table": table} if
                                       cache.encoding.table_shape() else {}))  # fmt: skip
        assert all(t.device == logits.device for t in fields.values())
        fresh = cache.wire(fields)
        assert fresh.keys() == targets.keys() and all(t.device == logits.device for t in fresh.values())
        stored = {k: v.to(CUDA) for k, v in targets.items()}
        temperature = cache.encoding.stored_temperature
        scores = score_batch(cache.encoding, stored, fresh, logits, temperature, table)
        assert all(t.device == logits.device for t in scores.values())


def _run(ds, model, precision: str, teacher=None, kd: str = "cached", temperature: float = 2.0):
    """What ``step_loss`` reads of a run: its config, device, compute, model, scaler, dataset and KD schedule."""
    cfg = TrainConfig(kd=kd, cache="unused", teacher="unused", temperature=temperature, kd_weight=0.5,
                      precision=precision)  # fmt: skip
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    return SimpleNamespace(cfg=cfg, device=CUDA, compute=Compute(CUDA, precision, channels_last=True), model=model,
                           teacher=teacher, train_ds=ds, kd_steps=10, scaler=scaler)  # fmt: skip


@pytest.mark.parametrize("encoding", [*ENCODINGS, "online"])
def test_the_training_step_up_to_backward_on_a_fake_gpu(stores, encoding):
    ds, batch = _batch(stores(100, "full" if encoding == "online" else encoding))
    mode = _fake_mode()
    with ds, mode:
        with torch.device(CUDA):
            model = specs.build_model("small-resnet8-w8", 100, in_channels=1)
            teacher = specs.build_model("small-resnet8-w8", 100, in_channels=1) if encoding == "online" else None
        ds.cache.decode_table(torch.device("cuda", 0))  # the table goes to the device once, at the first step
        images, labels, targets = batch  # fake CPU tensors, as pinned batches arrive from a loader
        fake = mode.from_tensor
        batch = (fake(images), fake(labels), {k: fake(v) for k, v in targets.items()})
    cuda_present = mock.patch("torch.cuda.is_available", return_value=True)
    with ds, cuda_present, mock.patch("torch.cuda.is_bf16_supported", return_value=True), mode:
        for precision in ("fp32", "bf16", "fp16"):
            temperature = 1.0 if encoding == "sampled" else 2.0  # sampled trains at its draws' temperature
            run = _run(ds, model, precision, teacher, "online" if encoding == "online" else "cached", temperature)
            loss, scaled, forwards = step_loss(run, batch, step=0)
            assert loss.device.type == scaled.device.type == "cuda" and loss.dtype == torch.float32
            assert forwards == (len(batch[0]) if encoding == "online" else 0)
            if precision == "fp16":
                assert run.scaler.is_enabled() and scaled is not loss  # the scaler multiplied it, on the device


def test_a_decoder_that_makes_a_cpu_tensor_fails_here(stores, monkeypatch):
    """The proof can fail: a decode that makes one tensor without its inputs' device raises on the fake GPU."""
    from logitcache.encoding import topk8

    ds, (_, labels, targets) = _batch(stores(100, "topk8"))
    real = topk8.CompactTopKEncoding.q_values
    monkeypatch.setattr(topk8.CompactTopKEncoding, "q_values", staticmethod(lambda t: real(t).cpu()))
    with ds, _fake_mode():
        on_gpu = {k: v.to(CUDA) for k, v in targets.items()}
        with pytest.raises(Exception, match="cpu"):
            lc.KDLoss(ds).to(CUDA)(torch.randn(len(labels), 100, device=CUDA), on_gpu)


def test_a_host_read_inside_the_loss_fails_here(stores, monkeypatch):
    """The proof can fail: a decode that reads a device value on the host (a per-sample constant, say) raises."""
    from logitcache.encoding import topk

    ds, (_, labels, targets) = _batch(stores(100, "topk"))
    real = topk.TopKEncoding.softened_tail

    def synced(t, rest, temperature):
        int(t["tail"].reshape(-1)[0])  # what reading a per-sample constant as a Python number does
        return real(t, rest, temperature)

    monkeypatch.setattr(topk.TopKEncoding, "softened_tail", staticmethod(synced))
    with ds, _fake_mode():
        on_gpu = {k: v.to(CUDA) for k, v in targets.items()}
        with pytest.raises(DataDependentOutputException):
            lc.KDLoss(ds).to(CUDA)(torch.randn(len(labels), 100, device=CUDA), on_gpu)
