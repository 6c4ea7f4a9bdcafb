"""Precision, channels-last and compile on the CPU: every precision builds, verifies, trains and resumes; the stored
targets are the teacher's pass in the recorded precision; other memory formats and compiled teachers store the same
targets within float rounding; what cannot compile runs uncompiled with one warning."""

import sys
import warnings

import pytest
import torch

import helpers
import logitcache as lc
from conftest import HELPERS
from logitcache.teacher.build import ReplayedViews
from logitcache.compute import Compute, resolve_precision
from logitcache.errors import LogitcacheError
from logitcache.teacher.verify import verify_cache

DATASET = f"{HELPERS}:tiny_dataset"
AUGMENT = f"{HELPERS}:heavy_augment"
BUILD = dict(views=2, seed=4, encoding="full", batch_size=32, chunk_rows=64, workers=0, progress=False,
             specs={"dataset": DATASET, "augment": AUGMENT})  # fmt: skip


def _build(path, **kw):
    return lc.build_cache(helpers.tiny_teacher(), helpers.tiny_dataset(), path, augment=helpers.heavy_augment(),
                          **{**BUILD, **kw})  # fmt: skip


def _reference(precision: str, rows: int = 64) -> torch.Tensor:
    """View 0's first rows through the teacher in ``precision``, in the build's batches of 32, stored as float16."""
    views = ReplayedViews(helpers.tiny_dataset(), helpers.heavy_augment(), BUILD["seed"])
    compute, teacher = Compute(torch.device("cpu"), precision), helpers.tiny_teacher()
    out = []
    for start in range(0, rows, 32):
        x = torch.stack([views[i] for i in range(start, start + 32)])
        with torch.inference_mode(), compute.autocast():
            out.append(teacher(x).float().to(torch.float16))
    return torch.cat(out)


def test_auto_is_fp32_on_the_cpu_and_unknown_names_are_refused():
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    with pytest.raises(LogitcacheError, match="unknown precision"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_every_precision_builds_what_its_pass_gives_and_verifies(tmp_path, precision):
    cache = _build(tmp_path / "c", precision=precision)
    assert cache.meta.precision == precision
    stored = cache.read(0)["logits"][:64]
    assert torch.equal(stored, _reference(precision))
    if precision != "fp32":
        assert not torch.equal(stored, _reference("fp32"))  # the precision changed the numbers: the test can fail
    tiny, aug = helpers.tiny_dataset(), helpers.heavy_augment()
    report = verify_cache(cache, helpers.tiny_teacher(), tiny, augment=aug, samples=48, batch_size=32)
    assert report.ok and not report.notes, report  # compared like with like: the recorded precision
    other = "fp32" if precision != "fp32" else "bf16"
    crossed = verify_cache(cache, helpers.tiny_teacher(), tiny, augment=aug, samples=48, precision=other, atol=1.0,
                           kl_tolerance=1.0)  # fmt: skip
    assert crossed.notes and f"built with a {precision} teacher" in crossed.notes[0] and other in crossed.notes[0]


def test_a_resume_needs_the_precision_it_started_with(tmp_path):
    out = tmp_path / "c"
    _build(out, precision="bf16")
    with pytest.raises(LogitcacheError, match="precision"):
        _build(out, precision="fp32", resume=True)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_training_in_a_precision_resumes_to_the_same_weights(tmp_path, precision, monkeypatch):
    cache = _build(tmp_path / "c", precision=precision)
    cfg = dict(dataset=DATASET, model="small-resnet8-w4", epochs=2, batch_size=32, workers=0, progress=False, lr=0.05,
               kd="cached", cache=str(cache.path), kd_until=1.0, precision=precision, seed=2)  # fmt: skip
    straight = lc.train(lc.TrainConfig(out=str(tmp_path / "straight"), **cfg))
    module = sys.modules["logitcache.student.loop"]
    real, calls = module.kd_loss, {"n": 0}

    def dies_in_epoch_2(*args, **kwargs):  # 10 steps per epoch
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "kd_loss", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        lc.train(lc.TrainConfig(out=str(tmp_path / "resumed"), **cfg))
    monkeypatch.setattr(module, "kd_loss", real)
    resumed = lc.train(lc.TrainConfig(out=str(tmp_path / "resumed"), resume=True, **cfg))
    assert [m["train_loss"] for m in resumed.metrics] == [m["train_loss"] for m in straight.metrics]
    with pytest.raises(LogitcacheError, match="precision"):
        lc.train(lc.TrainConfig(out=str(tmp_path / "resumed"), resume=True, **{**cfg, "precision": "fp32"}))


def test_channels_last_and_compile_store_the_same_targets(tmp_path):
    plain = _build(tmp_path / "plain").read(1)["logits"].float()
    last = _build(tmp_path / "last", channels_last=True).read(1)["logits"].float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = _build(tmp_path / "compiled", compile=True).read(1)["logits"].float()
    # float16 storage: the passes may differ by float32 rounding of the convolutions' order, never by more
    assert torch.allclose(plain, last, atol=2e-3, rtol=2e-3)
    assert torch.allclose(plain, compiled, atol=2e-3, rtol=2e-3)
    fallbacks = [w for w in caught if "--compile" in str(w.message)]
    assert len(fallbacks) <= 1  # compiled here, or one warning saying why not


def test_what_cannot_compile_runs_uncompiled_with_one_warning(tmp_path, monkeypatch):
    def fails(module, *args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", fails)
    with pytest.warns(UserWarning, match="cannot compile on this platform \\(no compiler here\\)"):
        cache = _build(tmp_path / "c", compile=True)
    assert torch.equal(cache.read(0)["logits"][:64], _reference("fp32"))
    with pytest.warns(UserWarning, match="cannot compile"):
        run = lc.train(lc.TrainConfig(out=str(tmp_path / "r"), dataset=DATASET, model="small-resnet8-w4", epochs=1,
                                      batch_size=32, workers=0, progress=False, compile=True))  # fmt: skip
    assert run.final_accuracy >= 0


@pytest.mark.parametrize(
    "encoding, options",
    [("full", {}), ("topk8", {"k": 4, "tail_rank": 2, "table_probe": 64}), ("sampled", {"samples": 8}),
     ("headtail", {"k": 3, "tail_samples": 4, "draws": "multinomial"})],
)  # fmt: skip
def test_encoding_beside_the_teacher_stores_the_same_bytes_as_on_the_writer_thread(tmp_path, encoding, options):
    # encode_on="device" on a CPU runs the device path (encode right after the unit's last batch, copy, write on the
    # thread) with the CPU as the device: the same bytes, draws included, as the host path
    host = _build(tmp_path / "host", encoding=encoding, encode_on="host", **options)
    device = _build(tmp_path / "device", encoding=encoding, encode_on="device", **options)
    for view in range(2):
        a, b = host.read(view, fields_only=True), device.read(view, fields_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (encoding, view)


@pytest.mark.parametrize("encode_on", ["host", "device"])
def test_a_non_finite_teacher_output_is_named_whichever_side_encodes(tmp_path, encode_on):
    # nan_teacher: the last row of every batch of 32 is NaN, so unit 0's first bad sample is 31
    with pytest.raises(LogitcacheError, match="NaN/inf for view 0, sample 31; nothing was written"):
        lc.build_cache(helpers.nan_teacher(), helpers.tiny_dataset(), tmp_path / "c", augment=helpers.heavy_augment(),
                       **{**BUILD, "encode_on": encode_on})  # fmt: skip
    assert not lc.open_cache(tmp_path / "c").completion().any()


def test_where_a_build_encodes():
    from logitcache.encoding import FullEncoding, make_encoding
    from logitcache.teacher.writer import encodes_on_device

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    full = make_encoding("full", 10, {})
    assert not encodes_on_device("auto", cpu, full) and encodes_on_device("auto", cuda, full)
    assert encodes_on_device("device", cpu, full) and not encodes_on_device("host", cuda, full)

    class HostOnly(FullEncoding):  # a user's encoding that does not declare device_side
        device_side = False

    assert not encodes_on_device("auto", cuda, HostOnly(10))
    with pytest.raises(LogitcacheError, match="use --encode-on host"):
        encodes_on_device("device", cuda, HostOnly(10))
    with pytest.raises(LogitcacheError, match="unknown --encode-on"):
        encodes_on_device("gpu", cuda, full)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("encoding, options", [("topk8", {"k": 4, "tail_rank": 2, "table_probe": 64}),
                                               ("sampled", {"samples": 8})])  # fmt: skip
def test_on_a_gpu_encoding_on_the_device_stores_what_the_host_encodes(tmp_path, encoding, options):
    # the same fp32 logits encoded on the GPU (pinned copies on a side stream) and on the host thread: the draws are
    # the same (uniforms from the CPU generator) but where the devices' softmax rounding moves a boundary, float fields
    # within the rounding of a float16 or 8-bit step
    kw = dict(device="cuda", precision="fp32", encoding=encoding, **options)
    host = _build(tmp_path / "host", encode_on="host", **kw)
    device = _build(tmp_path / "device", encode_on="device", **kw)
    for view in range(2):
        a, b = host.read(view, fields_only=True), device.read(view, fields_only=True)
        for key in a:
            if a[key].is_floating_point():
                assert torch.allclose(a[key].float(), b[key].float(), atol=1e-2, rtol=1e-2), key
            else:
                same = (a[key] == b[key]).reshape(len(a[key]), -1).all(1).float().mean()
                assert same >= 0.99, (key, same)  # a CUDA generator's draws would differ in nearly every row


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_auto_is_bf16_and_the_build_stores_the_devices_pass(tmp_path):
    device = torch.device("cuda")
    assert resolve_precision("auto", device) == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    cache = _build(tmp_path / "c", device="cuda", precision="auto", channels_last=True)
    views = ReplayedViews(helpers.tiny_dataset(), helpers.heavy_augment(), BUILD["seed"])
    compute = Compute.of(device, "auto", channels_last=True)
    teacher = compute.model(helpers.tiny_teacher())
    x = torch.stack([views[i] for i in range(32)])
    with torch.inference_mode(), compute.autocast():
        ref = teacher(compute.inputs(x)).float().to(torch.float16).cpu()
    assert torch.equal(cache.read(0)["logits"][:32], ref)
