"""Cached KD with Lightning: ``CachedKDDataModule`` builds the dataset on every rank, keeps its sampler, sets its
epoch and closes it at the end; the LightningModule adds the KD loss.

    pip install 'logitcache[lightning]'
    python examples/lightning_module.py --tiny                 # seconds: a synthetic dataset, a cache in a tmp folder
    python examples/lightning_module.py --tiny --devices 2 --out runs/l   # DDP on 2 CPU processes (gloo)
    python examples/lightning_module.py --tiny --mix           # Mixup/CutMix over the batch, the targets mixed too

Under DDP, Lightning runs this script again for each further rank: give ``--out`` so that every rank finds the same
cache. ``use_distributed_sampler=False`` keeps the dataset's own sampler (``ds.sampler(num_replicas=, rank=)``).
The checkpoint Lightning writes (``OUT/last.ckpt``) teaches a later run: ``logitcache build --teacher
examples/lightning_module.py:make_model --num-classes 10 --teacher-weights OUT/last.ckpt`` (its ``state_dict``, the
``model.`` prefix removed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import datasets
from torchvision.transforms import v2

import logitcache as lc
from logitcache.student.batchmix import BatchMix, MixedKDLoss
from logitcache.integrations.lightning import CachedKDDataModule


def make_model(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )  # fmt: skip


def tiny_dataset(train: bool = True) -> datasets.FakeData:
    """256 synthetic 16x16 grayscale images of 10 classes (64 for evaluation): (PIL image, int label)."""
    size, offset = (256, 1) if train else (64, 100_000)
    return datasets.FakeData(size=size, image_size=(1, 16, 16), num_classes=10, random_offset=offset)


def tiny_augment() -> v2.Compose:
    return v2.Compose(
        [v2.ToImage(), v2.RandomCrop(16, padding=2), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
    )


class Student(pl.LightningModule):
    def __init__(self, num_classes: int = 10, temperature: float = 2.0, kd_weight: float = 0.5, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.model = make_model(num_classes)
        self.losses: list[float] = []

    def setup(self, stage: str) -> None:
        if stage == "fit":  # after the data module's setup: its dataset exists; Lightning moves the loss with us
            ds = self.trainer.datamodule.dataset
            self.kd = MixedKDLoss(ds, self.hparams.temperature)  # KDLoss(ds, T) when no batch is mixed

    def training_step(self, batch, batch_idx):
        if len(batch) == 4:  # mixed in the collate function: (images, soft labels, targets, pairing)
            images, labels, targets, mixing = batch
        else:
            (images, labels, targets), mixing = batch, None
        logits = self(images)
        kd = self.kd(logits, targets, mixing, labels=labels)  # labels: refuses mixed labels with unmixed targets
        loss = (1 - self.hparams.kd_weight) * F.cross_entropy(logits, labels) + self.hparams.kd_weight * kd
        self.log("loss", loss, prog_bar=True, on_epoch=True, on_step=False, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("accuracy", (self(images).argmax(1) == labels).float().mean(), sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self.losses.append(float(self.trainer.callback_metrics["loss"]))

    def forward(self, images):
        return self.model(images)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a synthetic dataset of 256 images (seconds on a CPU)")
    p.add_argument("--data", default="data", help="where Fashion-MNIST is (downloaded when missing)")
    p.add_argument("--out", help="the run folder: cache/ and last.ckpt (default: a new temporary folder)")
    p.add_argument("--devices", type=int, default=1, help="processes; above 1, DDP")
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--mix", action="store_true", help="Mixup/CutMix over each batch (lc.BatchMix)")
    args = p.parse_args(argv)

    if args.devices > 1 and not args.out:
        p.error("--devices above 1 needs --out: every rank runs this script and must find the same cache")
    if args.tiny:
        base, val, augment = tiny_dataset(), tiny_dataset(train=False), tiny_augment()
    else:
        base = datasets.FashionMNIST(args.data, train=True, download=True)
        val = datasets.FashionMNIST(args.data, train=False, download=True)
        augment = v2.Compose(
            [v2.ToImage(), v2.RandomCrop(28, padding=4), v2.RandomHorizontalFlip(),
             v2.ToDtype(torch.float32, scale=True)]
        )  # fmt: skip
    val.transform = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])  # evaluation: no replay
    out = Path(args.out or tempfile.mkdtemp(prefix="logitcache-lightning-"))

    cache = out / "cache"
    if not cache.exists():  # before fit: DDP's further ranks start inside trainer.fit, and find it complete
        torch.manual_seed(0)
        lc.build_cache(make_model(), base, cache, augment=augment, views=args.views, workers=0, progress=False)

    loader_options = {"drop_last": True, "persistent_workers": args.workers > 0}
    if args.mix:
        loader_options["collate_fn"] = BatchMix(0.8, 1.0, num_classes=10)
    dm = CachedKDDataModule(
        base, cache, augment=augment, batch_size=args.batch_size, num_workers=args.workers, val_dataset=val,
        loader_options=loader_options,
    )  # fmt: skip
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        use_distributed_sampler=False,  # the dataset hands each rank its own sampler
        max_epochs=args.epochs,
        default_root_dir=out,
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    torch.manual_seed(1)
    student = Student()
    trainer.fit(student, datamodule=dm)
    result = {"example": "lightning_module", "rank": trainer.global_rank, "losses": student.losses, "out": str(out)}
    if trainer.global_rank == 0:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
