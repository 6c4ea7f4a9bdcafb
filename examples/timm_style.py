"""Cached KD in a timm-style recipe: Mixup/CutMix over the batch, label smoothing, AdamW with a cosine schedule, an
EMA of the weights, mixed precision, and checkpoints a later cache build takes as its teacher.

    python examples/timm_style.py --tiny                      # seconds: a synthetic dataset, a cache in a tmp folder
    python examples/timm_style.py --tiny --out runs/t --resume   # continues from runs/t/checkpoint.pth

Batch mixing with cached targets: ``BatchMix`` mixes images and labels in the collate function and hands the pairing
along; ``MixedKDLoss`` mixes the teacher's decoded distributions the same way (``lam * p_i + (1 - lam) * p_j``). The
teacher saw the unmixed images: for the teacher's own view of each mixed image, build the cache with ``--mix``
(per-sample replayed mixing) and leave ``BatchMix`` out.

The checkpoint holds ``model``, ``model_ema``, ``optimizer``, ``scheduler`` and ``epoch``; its EMA weights teach the
next run without running code from the file:

    logitcache build --teacher examples/timm_style.py:make_model --num-classes 10 \\
        --teacher-weights runs/t/checkpoint.pth --teacher-key model_ema --dataset ... --out caches/next
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

import logitcache as lc
from logitcache.student.batchmix import BatchMix, MixedKDLoss
from logitcache.specs import load_weights


def make_model(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """A small CNN (``timm.create_model(...)`` fits here as well)."""
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


def tiny_augment() -> v2.Compose:
    return v2.Compose(
        [v2.ToImage(), v2.RandomCrop(16, padding=2), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
    )


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--precision`` (None: fp32); ``auto`` is bf16 on a GPU that has it, else fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a synthetic dataset of 256 images (seconds on a CPU)")
    p.add_argument("--data", default="data", help="where Fashion-MNIST is (downloaded when missing)")
    p.add_argument("--out", help="the run folder: cache/ and checkpoint.pth (default: a new temporary folder)")
    p.add_argument("--teacher-weights", help="the teacher's weights (a state dict or a training checkpoint)")
    p.add_argument("--teacher-key", help="the checkpoint entry holding them (model, model_ema, state_dict, ...)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pth")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mixup", type=float, default=0.8, help="Mixup's alpha (0: off)")
    p.add_argument("--cutmix", type=float, default=1.0, help="CutMix's alpha (0: off)")
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    args = p.parse_args(argv)

    base = tiny_dataset() if args.tiny else datasets.FashionMNIST(args.data, train=True, download=True)
    augment = tiny_augment() if args.tiny else v2.Compose(
        [v2.ToImage(), v2.RandomCrop(28, padding=4), v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True)]
    )  # fmt: skip
    num_classes = 10
    out = Path(args.out or tempfile.mkdtemp(prefix="logitcache-timm-"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = autocast_dtype(args.precision, device)

    cache = out / "cache"
    if not cache.exists():
        torch.manual_seed(0)
        teacher = make_model(num_classes)
        if args.teacher_weights:
            load_weights(teacher, args.teacher_weights, key=args.teacher_key)
        lc.build_cache(teacher, base, cache, augment=augment, views=args.views, workers=0, progress=False)

    torch.manual_seed(1)
    model = make_model(num_classes).to(device)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    start = 0
    checkpoint = out / "checkpoint.pth"
    if args.resume and checkpoint.exists():
        state = torch.load(checkpoint, map_location=device, weights_only=True)  # tensors and numbers only
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["model_ema"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["epoch"] + 1

    mixer = BatchMix(args.mixup, args.cutmix, num_classes=num_classes, label_smoothing=args.smoothing)
    losses = []
    with lc.CachedKDDataset(base, cache, augment=augment) as ds:
        kd_loss = MixedKDLoss(ds, temperature=args.temperature).to(device)
        loader = DataLoader(ds, batch_size=args.batch_size, sampler=ds.sampler(seed=0), num_workers=args.workers,
                            collate_fn=mixer, drop_last=True, pin_memory=device.type == "cuda")  # fmt: skip
        for epoch in range(start, args.epochs):
            ds.set_epoch(epoch)
            model.train()
            total, steps = 0.0, 0
            for images, labels, targets, mixing in loader:  # labels: mixed soft vectors; mixing: the pairing
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                targets = {k: v.to(device, non_blocking=True) for k, v in targets.items()}
                mixing = mixing.to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = model(images)
                # the losses in fp32, outside autocast; the teacher's distributions mixed like the images
                kd = kd_loss(logits.float(), targets, mixing, labels=labels)
                loss = (1 - args.kd_weight) * F.cross_entropy(logits.float(), labels) + args.kd_weight * kd
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                ema.update_parameters(model)
                total, steps = total + loss.item(), steps + 1
            sched.step()
            losses.append(total / steps)
            print(f"epoch {epoch}: loss {losses[-1]:.4f}, lr {sched.get_last_lr()[0]:.2e}")
            state = {
                "model": model.state_dict(),
                "model_ema": ema.state_dict(),  # "module."-prefixed names and n_averaged: load_weights fits them
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "epoch": epoch,
            }
            torch.save(state, checkpoint.with_suffix(".partial"))
            checkpoint.with_suffix(".partial").replace(checkpoint)  # atomically: a crash keeps the previous one
    result = {"example": "timm_style", "start": start, "losses": losses, "checkpoint": str(checkpoint)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
