"""Lightning, Accelerate and Hugging Face datasets around CachedKDDataset (logitcache.integrations): on the CPU, in
one process and as two DDP ranks (gloo), every rank sees its share of every epoch exactly once, with the cached
targets of the epoch's view."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import helpers
import logitcache as lc
from logitcache.errors import LogitcacheError

TESTS = Path(__file__).parent


class Indexed(Dataset):
    """A CachedKDDataset whose samples also carry their index (its batched fetch kept)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index):
        return (*self.ds[index], index)

    def __getitems__(self, indices):
        return [(*sample, i) for sample, i in zip(self.ds.__getitems__(indices), indices)]


def check_epochs(records, cache_path, epochs, ranks=1):
    """``records``: (epoch, indices, labels, targets) per batch, of every rank. Per epoch, the ranks together saw
    every sample exactly once, each with its label and the cached target of the epoch's view."""
    cache, labels_of = lc.open_cache(cache_path), torch.as_tensor(helpers.tiny_dataset().targets)
    for epoch in epochs:
        rows = [r for r in records if r[0] == epoch]
        assert rows, f"no batch of epoch {epoch}"
        index = torch.cat([r[1] for r in rows])
        assert sorted(index.tolist()) == list(range(len(labels_of) // ranks * ranks)), epoch
        assert torch.equal(torch.cat([r[2] for r in rows]), labels_of[index])
        view = cache.read(epoch % cache.num_views)
        assert set(rows[0][3]) == set(view)
        for name in view:
            assert torch.equal(torch.cat([r[3][name] for r in rows]), view[name][index]), (epoch, name)


def _run(cmd, timeout=240, env=None):
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{stderr[-3000:]}") from None
    assert proc.returncode == 0, stderr[-4000:]
    return stdout


# --- Lightning ----------------------------------------------------------------------------------------------------


def _lightning():
    pytest.importorskip("lightning")
    import lightning.pytorch as pl

    from logitcache.integrations.lightning import CachedKDDataModule

    class IndexedModule(CachedKDDataModule):
        def loader_dataset(self, dataset):
            return Indexed(dataset)

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.seen = nn.Linear(256, helpers.NUM_CLASSES), []

        def setup(self, stage):
            self.kd = self.trainer.datamodule.kd_loss(2.0)

        def training_step(self, batch, batch_idx):
            images, labels, targets, index = batch
            copied = {k: v.clone() for k, v in targets.items()}
            self.seen.append((self.current_epoch, index.clone(), labels.clone(), copied))
            logits = self.net(images.flatten(1))
            return self.kd(logits, targets) + F.cross_entropy(logits, labels)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

        def on_train_start(self):
            # After Lightning made the first epoch's iterator, before on_train_epoch_start: the workers fetch now.
            time.sleep(0.5)

    return pl, IndexedModule, Recorder


def _trainer(pl, epochs, **kwargs):
    return pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, **kwargs,
    )  # fmt: skip


def test_lightning_sets_every_epoch_before_its_first_batch_and_resumes_on_the_right_view(built_cache, tiny, tmp_path):
    pl, IndexedModule, Recorder = _lightning()
    dm = IndexedModule(tiny, built_cache, batch_size=32, num_workers=2, loader_options={"persistent_workers": True})
    model = _trainer(pl, 2, enable_checkpointing=False)
    recorder = Recorder()
    model.fit(recorder, datamodule=dm)
    check_epochs(recorder.seen, built_cache, epochs=[0, 1])
    assert dm.dataset is None  # teardown closed it
    # resumed from a checkpoint after epoch 1: epoch 2 (view 2) is set before its workers fetch anything
    trainer = _trainer(pl, 2, default_root_dir=tmp_path)
    trainer.fit(Recorder(), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "after-2.ckpt")
    dm = IndexedModule(tiny, built_cache, batch_size=32, num_workers=2)
    resumed = Recorder()
    _trainer(pl, 3, enable_checkpointing=False).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "after-2.ckpt")
    assert {r[0] for r in resumed.seen} == {2}
    check_epochs(resumed.seen, built_cache, epochs=[2])


def test_lightning_closes_the_dataset_at_teardown_and_refuses_a_sampler_it_would_replace(built_cache, tiny):
    pl, IndexedModule, Recorder = _lightning()
    from logitcache.integrations.lightning import CachedKDDataModule

    dm = CachedKDDataModule(tiny, built_cache, batch_size=16)
    dm.setup("fit")
    ds = dm.dataset
    loader = dm.train_dataloader()
    images, labels, targets = next(iter(loader))  # sets epoch 0 (no trainer: epoch 0)
    assert images.shape[0] == 16 and loader.sampler is ds._sampler
    dm.teardown("fit")
    with pytest.raises(LogitcacheError, match="closed"):
        ds.set_epoch(1)
    with pytest.raises(LogitcacheError, match="before setup"):
        dm.train_dataloader()
    # a distributed Trainer that would put its own sampler in place of the dataset's
    ddp = types.SimpleNamespace(world_size=2, global_rank=0, _accelerator_connector=types.SimpleNamespace(
        use_distributed_sampler=True))  # fmt: skip
    dm = CachedKDDataModule(tiny, built_cache, batch_size=16)
    dm.trainer = ddp
    with pytest.raises(LogitcacheError, match="use_distributed_sampler=False"):
        dm.setup("fit")


LIGHTNING_DDP = """
import sys
sys.path.insert(0, {tests!r})
import torch
import lightning.pytorch as pl
import helpers
from test_integrations import _lightning

pl_, IndexedModule, Recorder = _lightning()
dm = IndexedModule(
    helpers.tiny_dataset(), {cache!r}, batch_size=16, num_workers=1, dataset_options={{"memory_mb": {memory_mb}}},
    loader_options={{"persistent_workers": {persistent}}},
)
recorder = Recorder()
trainer = pl.Trainer(
    accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, use_distributed_sampler=False, logger=False,
    enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
)
trainer.fit(recorder, datamodule=dm)
torch.save(recorder.seen, {out!r} + f"/rank{{trainer.global_rank}}.pt")
"""


@pytest.mark.multiprocess
@pytest.mark.parametrize("path", [pytest.param("memory", marks=pytest.mark.smoke), "ring"])  # the fast loop: ring
def test_lightning_ddp_on_two_cpu_ranks_sees_every_sample_once_per_epoch(built_cache, tmp_path, path):
    pytest.importorskip("lightning")
    script = tmp_path / "ddp.py"
    # the ring: a view over the memory budget read through chunk_sampler(), with workers started anew each epoch
    memory_mb, persistent = (4096, True) if path == "memory" else (0.001, False)
    script.write_text(
        LIGHTNING_DDP.format(
            tests=str(TESTS), cache=str(built_cache), out=str(tmp_path), memory_mb=memory_mb, persistent=persistent
        )
    )
    _run([sys.executable, str(script)])
    records = [r for rank in (0, 1) for r in torch.load(tmp_path / f"rank{rank}.pt")]
    check_epochs(records, built_cache, epochs=[0, 1, 2], ranks=2)


# --- Accelerate ---------------------------------------------------------------------------------------------------

ACCELERATE_DDP = """
import sys
sys.path.insert(0, {tests!r})
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device
import helpers
import logitcache as lc
from logitcache.integrations.accelerate import kd_dataloader

accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(256, helpers.NUM_CLASSES)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
model, opt = accelerator.prepare(model, opt)  # not the loader
seen = []
with lc.CachedKDDataset(helpers.tiny_dataset(), {cache!r}) as ds:
    kd = lc.KDLoss(ds, 2.0).to(accelerator.device)
    loader = kd_dataloader(ds, accelerator, batch_size=16, num_workers=1)
    for epoch in range(3):
        ds.set_epoch(epoch)
        order = torch.tensor(list(loader.sampler))  # the loader serves the sampler's order
        at = 0
        for batch in loader:
            images, labels, targets = send_to_device(batch, accelerator.device)
            copied = {{k: v.clone() for k, v in targets.items()}}
            seen.append((epoch, order[at : at + len(labels)], labels.clone(), copied))
            at += len(labels)
            logits = model(images.flatten(1))
            accelerator.backward(kd(logits, targets))
            opt.step()
            opt.zero_grad()
torch.save(seen, {out!r} + f"/rank{{accelerator.process_index}}.pt")
accelerator.end_training()
"""


@pytest.mark.multiprocess
def test_accelerate_on_two_cpu_processes_keeps_the_datasets_sampler_per_rank(built_cache, tmp_path):
    pytest.importorskip("accelerate")
    script = tmp_path / "acc.py"
    script.write_text(ACCELERATE_DDP.format(tests=str(TESTS), cache=str(built_cache), out=str(tmp_path)))
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script)])
    records = [r for rank in (0, 1) for r in torch.load(tmp_path / f"rank{rank}.pt")]
    check_epochs(records, built_cache, epochs=[0, 1, 2], ranks=2)


def test_kd_dataloader_takes_the_datasets_sampler_for_the_accelerators_rank(built_cache, tiny):
    from logitcache.integrations.accelerate import kd_dataloader

    with lc.CachedKDDataset(tiny, built_cache) as ds:
        for rank in (0, 1):
            accelerator = types.SimpleNamespace(num_processes=2, process_index=rank, device=torch.device("cpu"))
            loader = kd_dataloader(ds, accelerator, batch_size=8, seed=3)
            assert loader.sampler is ds._sampler and loader.sampler.num_replicas == 2 and loader.sampler.rank == rank
            assert loader.pin_memory is False and loader.batch_size == 8


# --- Hugging Face datasets ----------------------------------------------------------------------------------------


def _hf_tiny():
    hf = pytest.importorskip("datasets")
    from logitcache.integrations.hf import HFImages

    tiny = helpers.tiny_dataset()
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(num_classes=helpers.NUM_CLASSES)})
    rows = [tiny[i] for i in range(len(tiny))]
    table = hf.Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]}, features=features)
    return HFImages(table)


def test_a_hugging_face_dataset_serves_as_the_base_dataset(built_cache, tiny, tmp_path):
    base = _hf_tiny()
    assert len(base) == len(tiny) and base.targets.tolist() == tiny.targets.tolist()
    image, label = base[5]
    assert image.tobytes() == tiny[5][0].tobytes() and label == tiny[5][1]
    # the cache built from the torch dataset accepts it (same images, same labels), and serves the same batches
    with lc.CachedKDDataset(base, built_cache) as hf_ds, lc.CachedKDDataset(tiny, built_cache) as ds:
        hf_ds.set_epoch(1), ds.set_epoch(1)
        pairs = zip(DataLoader(hf_ds, batch_size=60, num_workers=2), DataLoader(ds, batch_size=60))
        for (a, la, ta), (b, lb, tb) in pairs:
            assert torch.equal(a, b) and torch.equal(la, lb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    # and a cache is built from it directly
    lc.build_cache(helpers.tiny_teacher(), base, tmp_path / "hf", augment=helpers.heavy_augment(), views=1,
                   workers=0, progress=False)  # fmt: skip
    built = lc.open_cache(tmp_path / "hf")
    assert built.num_samples == len(tiny) and built.labels().tolist() == tiny.targets.tolist()
