"""topk8's tail table: the unstored classes share the tail's mass in the teacher's usual shape for the sample's top
class. Fitted on a probe before the build, stored once, added to every target by the reader, checked like the rest."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import helpers
import logitcache as lc
from logitcache.teacher.build import ReplayedViews
from logitcache.cli import app
from logitcache.encoding import CompactTopKEncoding, dense_log_probs
from logitcache.errors import LogitcacheError
from logitcache.store import TABLE, DamagedCache
from logitcache.teacher.verify import verify_cache

BUILD = dict(views=2, seed=3, k=3, batch_size=16, chunk_rows=32, workers=0, progress=False, encoding="topk8")


def structured_logits(n: int, num_classes: int = 50, seed: int = 0) -> torch.Tensor:
    """A teacher whose tail depends on its top class (as real ones do: similar classes are likely together): class
    c's logits are a fixed random profile, c itself raised, plus per-sample noise."""
    g = torch.Generator().manual_seed(0)
    profiles = torch.randn(num_classes, num_classes, generator=g) * 3
    profiles += torch.eye(num_classes) * 12
    top = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    return profiles[top] + torch.randn(n, num_classes, generator=torch.Generator().manual_seed(seed + 1)) * 0.5


class Source:
    """An encoding with its table: what a cache gives ``kd_loss(..., cache=)`` / ``to_probs(..., cache=)``."""

    def __init__(self, encoding, table):
        self.encoding, self._table = encoding, table

    def table(self):
        return self._table

    def decode_table(self, device):
        return None if self._table is None else self._table.to(device)


def decoded(enc, logits, table):
    """A batch as it travels (the wire format: stored fields and the row index), and the source that decodes it."""
    return enc.wire(enc.encode(logits, table=table)), Source(enc, table)


def kl_to_teacher(logits, batch, temperature):
    targets, source = batch
    ref = torch.log_softmax(logits / temperature, dim=1)
    log_p = dense_log_probs(targets, temperature, cache=source)
    return float((ref.exp() * (ref - log_p)).sum(1).mean())


def test_the_table_keeps_the_tails_shape_where_flat_loses_it():
    enc = CompactTopKEncoding(50, 5, tail_rank=0)  # the row alone
    assert enc.tail_shape == "table" and enc.table_shape() == (50, 50)
    table = enc.fit_table(torch.log_softmax(structured_logits(3000), dim=1))
    assert table.dtype == torch.float16 and table.shape == (50, 50)
    logits = structured_logits(500, seed=7)  # other samples than the probe's
    shaped, flat = decoded(enc, logits, table), decoded(CompactTopKEncoding(50, 5, tail_shape="flat"), logits, None)
    for temperature in (1.0, 4.0):
        kl_shaped, kl_flat = kl_to_teacher(logits, shaped, temperature), kl_to_teacher(logits, flat, temperature)
        # (at T = 1 the tail holds little mass, so both are small; softened, the flat tail's error dominates)
        assert kl_shaped < (0.8 if temperature == 1 else 0.3) * kl_flat, (temperature, kl_shaped, kl_flat)
        # the same top k and the same tail mass: only how the tail is spread differs
        p_shaped, p_flat = lc.to_probs(*shaped[:1], temperature, cache=shaped[1]), lc.to_probs(
            flat[0], temperature, cache=flat[1]
        )
        ids = shaped[0]["ids"].long()
        assert torch.allclose(p_shaped.gather(1, ids), p_flat.gather(1, ids), atol=1e-5)
        assert torch.allclose(p_shaped.sum(1), torch.ones(500), atol=1e-5)
        # the loss is the KL of the decoded target (dense), the student's gradient that of that target
        student = torch.randn(500, 50, requires_grad=True)
        loss = lc.kd_loss(student, shaped[0], temperature, cache=shaped[1])
        assert torch.equal(loss, lc.KDLoss(shaped[1], temperature)(student, shaped[0]))
        with pytest.raises(LogitcacheError, match="take their tail's shape from the cache's table"):
            lc.kd_loss(student, shaped[0], temperature)  # alone it would decode a flat tail: refused
        log_q = torch.log_softmax(student.detach() / temperature, dim=1)
        p = p_shaped
        assert torch.isclose(loss, temperature**2 * (p * (p.log() - log_q)).sum(1).mean(), rtol=1e-4)


def low_rank_logits(n: int, num_classes: int = 50, seed: int = 0) -> torch.Tensor:
    """A teacher whose logits are a linear map of 6 features (as a real one's are of its penultimate layer's, there
    hundreds), the features clustered by class: what the row of a sample's top class misses lies in that subspace."""
    w = torch.randn(6, num_classes, generator=torch.Generator().manual_seed(1)) * 2
    centers = torch.randn(num_classes, 6, generator=torch.Generator().manual_seed(2))
    cls = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    return (centers[cls] + 0.5 * torch.randn(n, 6, generator=torch.Generator().manual_seed(seed + 1))) @ w


def test_the_basis_keeps_each_samples_own_tail_where_the_row_alone_misses_it():
    probe = torch.log_softmax(low_rank_logits(3000), dim=1)
    row_only, basis = CompactTopKEncoding(50, 5, tail_rank=0), CompactTopKEncoding(50, 5)
    assert basis.tail_rank == 8 and basis.table_shape() == (58, 50)
    fields = basis.fields()
    assert (
        fields["tail_coef"].dtype == np.int8
        and fields["tail_coef"].shape == (8,)
        and "tail_coef" not in row_only.fields()
    )
    table_row, table_basis = row_only.fit_table(probe), basis.fit_table(probe)
    assert torch.equal(table_basis[:50], table_row)  # the same rows; the basis follows them
    logits = low_rank_logits(500, seed=7)  # other samples than the probe's
    with_basis, alone = decoded(basis, logits, table_basis), decoded(row_only, logits, table_row)
    for temperature in (1.0, 4.0):
        kl_basis, kl_alone = kl_to_teacher(logits, with_basis, temperature), kl_to_teacher(logits, alone, temperature)
        assert kl_basis < 0.1 * kl_alone, (temperature, kl_basis, kl_alone)
        # the same top k and tail mass: the coefficients move mass only within the tail
        ids = with_basis[0]["ids"].long()
        p_basis = lc.to_probs(with_basis[0], temperature, cache=with_basis[1])
        p_alone = lc.to_probs(alone[0], temperature, cache=alone[1])
        assert torch.allclose(p_basis.gather(1, ids), p_alone.gather(1, ids), atol=1e-5)
    # coefficients are int8 steps of a per-sample scale; a teacher exactly on its row needs none
    rows = table_basis[:50].float()
    exact = rows[[c for c in range(50) if rows[c].argmax() == c][:4]] + 3.0  # rows of classes seen on top
    coded = basis.encode(exact, table=table_basis)
    assert coded["tail_coef"].abs().max() <= 127 and torch.all(coded["tail_coef_scale"].float() < 1e-2)
    with pytest.raises(LogitcacheError, match="encodes against the cache's table"):
        basis.encode(logits)


def test_the_basis_rank_follows_the_table_and_the_unstored_classes():
    assert CompactTopKEncoding(50, 5, tail_shape="flat").tail_rank == 0  # no row to deviate from
    assert CompactTopKEncoding(10, 3).tail_rank == 6  # C - k - 1: more would describe nothing
    assert CompactTopKEncoding(10, 10).tail_rank == 0
    with pytest.raises(LogitcacheError, match="tail_rank must be at most 64"):
        CompactTopKEncoding(500, 10, tail_rank=65)


def test_a_row_never_seen_on_top_falls_back_to_the_probes_mean():
    enc = CompactTopKEncoding(6, 3, tail_rank=0)
    lp = torch.log_softmax(torch.tensor([[5.0, 1, 0, 0, 0, -3], [4.0, 0, 2, 0, 0, 0]]), dim=1)
    table = enc.fit_table(lp).float()
    assert torch.allclose(table[0], lp.mean(0), atol=1e-2) and torch.allclose(table[5], lp.mean(0), atol=1e-2)


def test_too_many_classes_for_a_table_is_refused_with_the_alternatives():
    with pytest.raises(LogitcacheError, match="tail_shape=flat, or headtail"):
        CompactTopKEncoding(5000, 10)
    assert CompactTopKEncoding(5000, 10, tail_shape="flat").table_shape() is None
    with pytest.raises(LogitcacheError, match="tail_shape must be one of"):
        CompactTopKEncoding(50, 5, tail_shape="bumpy")


@pytest.fixture(scope="module")
def table_store(tmp_path_factory):
    tiny = helpers.tiny_dataset()
    out = tmp_path_factory.mktemp("table") / "c"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), **BUILD)
    return out


def test_build_fits_the_table_on_a_probe_and_every_read_path_adds_the_samples_row(table_store):
    tiny = helpers.tiny_dataset()
    cache = lc.open_cache(table_store)
    record = cache.meta.table
    assert record.array == TABLE and record.probe == len(tiny)  # 64 per class, at most the dataset
    table = cache.table()
    assert table.shape == (10 + 6, 10) and table.dtype == torch.float16  # the rows, then a basis of rank C - k - 1
    # the table is the teacher's mean log-probabilities over view 0's probe, by top class
    views = ReplayedViews(tiny, helpers.heavy_augment(), 3)
    with torch.inference_mode():
        lp = torch.log_softmax(helpers.tiny_teacher()(torch.stack([views[i] for i in range(len(tiny))])), dim=1)
    assert torch.equal(table, cache.encoding.fit_table(lp))
    whole = cache.read(1)
    # a batch carries the row's index, never the row: the loss expands it from the table on the batch's device
    assert torch.equal(whole["tail_row"], whole["ids"][:, 0]) and "tail_shape" not in whole
    coef = whole["tail_coef"].float() * whole["tail_coef_scale"].float()[:, None]
    row = cache.encoding.tail_shape_of(whole, cache.decode_table(torch.device("cpu")))
    assert torch.equal(row, table[whole["ids"][:, 0].long()].float() + coef @ table[10:].float())
    assert "tail_row" not in cache.read(1, fields_only=True)
    for memory_mb in (4096, 0):  # the view in shared memory, and read by chunk
        ds = lc.CachedKDDataset(tiny, cache, augment=helpers.heavy_augment(), memory_mb=memory_mb)
        ds.set_epoch(1)
        batch = ds.cached_targets(list(range(40, 80)), 1)
        assert batch.keys() == whole.keys() and all(torch.equal(batch[k], whole[k][40:80]) for k in batch)
        assert torch.equal(lc.to_probs(batch, 4.0, cache=ds), lc.to_probs(whole, 4.0, cache=cache)[40:80])
    report = verify_cache(cache, helpers.tiny_teacher(), tiny, augment=helpers.heavy_augment(), samples=40)
    assert report.ok, report


def test_resume_keeps_the_stored_table(table_store, tmp_path, monkeypatch):
    out = tmp_path / "c"
    shutil.copytree(table_store, out)
    before = (out / TABLE).joinpath("c", "0", "0").read_bytes()

    def refit(*args, **kwargs):
        raise AssertionError("a resume must not fit the table again")

    monkeypatch.setattr(sys.modules["logitcache.teacher.build"], "_fit_table", refit)
    tiny = helpers.tiny_dataset()
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), resume=True, **BUILD)
    assert (out / TABLE).joinpath("c", "0", "0").read_bytes() == before


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("attack", ["deleted", "flipped byte", "emptied"])
def test_a_damaged_table_is_named_and_never_decoded(table_store, tmp_path, attack):
    out = tmp_path / "c"
    shutil.copytree(table_store, out)
    chunk = out / TABLE / "c" / "0" / "0"
    {"deleted": Path.unlink, "flipped byte": _flip, "emptied": lambda p: p.write_bytes(b"")}[attack](chunk)
    cache = lc.open_cache(out)
    with pytest.raises(DamagedCache, match=f"array '{TABLE}'"):
        cache.read(0, 0, 4)
    with pytest.raises(DamagedCache, match=f"array '{TABLE}'"):
        lc.CachedKDDataset(helpers.tiny_dataset(), out, augment=helpers.heavy_augment())
    r = CliRunner().invoke(app, ["verify", str(out), "--storage-only"])
    assert r.exit_code != 0 and TABLE in r.output, r.output


def test_inspect_reports_the_table(table_store):
    r = CliRunner().invoke(app, ["inspect", str(table_store), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["encoding_params"]["tail_shape"] == "table" and info["encoding_params"]["tail_rank"] == 6
    assert info["arrays"]["tail_coef"]["shape"] == [2, 240, 6]
    assert info["table"]["probe"] == 240 and info["arrays"][TABLE]["shape"] == [16, 10]


def test_dry_run_counts_the_table_and_its_probe():
    from logitcache.teacher.estimate import estimate_build

    tiny = helpers.tiny_dataset()
    est = estimate_build(
        helpers.tiny_teacher(), tiny, augment=helpers.heavy_augment(), views=2, chunk_rows=64, encoding="topk8", k=3,
        batch_size=16, workers=0,
    )  # fmt: skip
    assert est.table_probe == 240 and est.table_bytes == 2 * 16 * 10
    flat = estimate_build(
        helpers.tiny_teacher(), tiny, augment=helpers.heavy_augment(), views=2, chunk_rows=64, encoding="topk8", k=3,
        batch_size=16, workers=0, tail_shape="flat",
    )  # fmt: skip
    assert flat.table_probe == 0 and flat.table_bytes == 0
    assert np.isclose(est.total_bytes - est.table_bytes, est.samples * est.bytes_per_sample)


def test_a_table_store_from_before_the_basis_reads_with_its_rows_alone(tmp_path):
    import zarr

    from logitcache.store.meta import DIGEST_KEY as META_DIGEST, json_digest as metadata_digest

    tiny, out = helpers.tiny_dataset(), tmp_path / "c"
    lc.build_cache(helpers.tiny_teacher(), tiny, out, augment=helpers.heavy_augment(), tail_rank=0, **BUILD)
    before_cache = lc.open_cache(out)
    before = before_cache.read(1)
    g = zarr.open_group(str(out), mode="r+")
    meta = dict(g.attrs["logitcache"])
    del meta["encoding"]["params"]["tail_rank"]  # as a store from before the basis has it
    meta[META_DIGEST] = metadata_digest(meta)
    g.attrs["logitcache"] = meta
    cache = lc.open_cache(out)
    assert cache.encoding.tail_rank == 0 and cache.table().shape == (10, 10)
    after = cache.read(1)
    assert "tail_coef" not in after and torch.equal(after["tail_row"], before["tail_row"])
    assert torch.equal(lc.to_probs(after, 4.0, cache=cache), lc.to_probs(before, 4.0, cache=before_cache))
    assert verify_cache(cache, helpers.tiny_teacher(), tiny, augment=helpers.heavy_augment(), samples=20).ok
