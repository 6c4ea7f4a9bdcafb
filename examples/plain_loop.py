"""Cached knowledge distillation in a plain PyTorch loop.

    python examples/plain_loop.py --tiny                      # seconds: a synthetic dataset, a cache in a tmp folder
    python examples/plain_loop.py --data ~/data --teacher-weights teacher.pth --out runs/plain   # Fashion-MNIST

The teacher runs once (``lc.build_cache``); every epoch after reads its soft targets from the cache. Swap in your own
dataset (map-style, ``(image, int label)``, no random transform), augmentation, teacher and student.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

import logitcache as lc
from logitcache.specs import load_weights


def make_model(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small CNN; any nn.Module that maps images to logits works, for the teacher and the student alike."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes),
    )  # fmt: skip


def tiny_dataset(train: bool = True) -> datasets.FakeData:
    """256 synthetic 16x16 grayscale images of 10 classes (64 for evaluation): (PIL image, int label), the same on
    every call."""
    size, offset = (256, 1) if train else (64, 100_000)
    return datasets.FakeData(size=size, image_size=(1, 16, 16), num_classes=10, random_offset=offset)


def augment_for(size: int) -> v2.Compose:
    """The training augmentation; logitcache replays it, seeded per (view, sample), for the teacher and the student."""
    return v2.Compose(
        [v2.ToImage(), v2.RandomCrop(size, padding=size // 7), v2.RandomHorizontalFlip(),
         v2.ToDtype(torch.float32, scale=True)]
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a synthetic dataset of 256 images (seconds on a CPU)")
    p.add_argument("--data", default="data", help="where Fashion-MNIST is (downloaded when missing)")
    p.add_argument("--out", help="where the cache goes (default: a new temporary folder)")
    p.add_argument("--teacher-weights", help="the teacher's weights (a state dict or a training checkpoint)")
    p.add_argument("--teacher-key", help="the checkpoint entry holding them (model, model_ema, state_dict, ...)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--views", type=int, default=2, help="augmented views the teacher labels per image")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    args = p.parse_args(argv)

    base = tiny_dataset() if args.tiny else datasets.FashionMNIST(args.data, train=True, download=True)
    augment = augment_for(16 if args.tiny else 28)
    out = Path(args.out or tempfile.mkdtemp(prefix="logitcache-plain-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    cache = out / "cache"
    if not cache.exists():  # once: the teacher over `views` replayed augmentations of every image
        torch.manual_seed(0)
        teacher = make_model()
        if args.teacher_weights:
            load_weights(teacher, args.teacher_weights, key=args.teacher_key)
        lc.build_cache(teacher, base, cache, augment=augment, views=args.views, workers=0, progress=False)

    torch.manual_seed(1)
    student = make_model().to(device)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9)
    losses = []
    with lc.CachedKDDataset(base, cache, augment=augment) as ds:  # refuses an augmentation that does not replay
        kd_loss = lc.KDLoss(ds, temperature=args.temperature).to(device)  # decodes on the device
        sampler = ds.sampler(seed=0)  # the sampler the dataset's read path wants, before the workers start
        loader = DataLoader(ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            drop_last=True, pin_memory=device.type == "cuda")  # fmt: skip
        for epoch in range(args.epochs):
            ds.set_epoch(epoch)  # view epoch % views, the sampler's shuffle; before iterating the epoch
            total, steps = 0.0, 0
            for images, labels, targets in loader:  # iterate every epoch in full
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}  # compact stored fields
                logits = student(images)
                loss = (1 - args.kd_weight) * F.cross_entropy(logits, labels) + args.kd_weight * kd_loss(
                    logits, targets
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total, steps = total + loss.item(), steps + 1
            losses.append(total / steps)
            print(f"epoch {epoch}: loss {losses[-1]:.4f}")
    result = {"example": "plain_loop", "epochs": args.epochs, "losses": losses, "out": str(out)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":  # required where DataLoader workers are spawned (macOS, Python 3.14's forkserver)
    main()
