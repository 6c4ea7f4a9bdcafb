"""Cached KD with Hugging Face Accelerate: prepare the model and the optimizer, not the loader.

    pip install 'logitcache[accelerate]'
    python examples/accelerate_loop.py --tiny                    # seconds: a synthetic dataset, a cache in a tmp folder
    torchrun --nproc-per-node 2 examples/accelerate_loop.py --tiny --out runs/a   # 2 processes (accelerate launch too)
    python examples/accelerate_loop.py --tiny --hf               # the base dataset as a Hugging Face datasets.Dataset

``accelerator.prepare(loader)`` would re-shard the batches with a sampler of its own; ``kd_dataloader`` builds the
loader on the dataset's own sampler for this process's rank (``ds.sampler(num_replicas=accelerator.num_processes,
rank=accelerator.process_index)``). Constructing the dataset and its sampler is collective: every process does it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import send_to_device
from torch import nn
from torchvision import datasets
from torchvision.transforms import v2

import logitcache as lc
from logitcache.integrations.accelerate import kd_dataloader
from logitcache.integrations.hf import HFImages


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


def as_hf(dataset) -> HFImages:
    """A torch dataset of (PIL image, label) as a Hugging Face ``datasets.Dataset``, read back through ``HFImages``:
    what a dataset from ``datasets.load_dataset(...)`` looks like to logitcache (its "image" and "label" columns)."""
    import datasets as hf

    rows = [dataset[i] for i in range(len(dataset))]
    features = hf.Features({"image": hf.Image(), "label": hf.ClassLabel(num_classes=10)})
    table = hf.Dataset.from_dict({"image": [r[0] for r in rows], "label": [r[1] for r in rows]}, features=features)
    return HFImages(table, image_key="image", label_key="label")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a synthetic dataset of 256 images (seconds on a CPU)")
    p.add_argument("--hf", action="store_true", help="read the images through a Hugging Face datasets.Dataset")
    p.add_argument("--data", default="data", help="where Fashion-MNIST is (downloaded when missing)")
    p.add_argument("--out", help="where the cache goes (default: a new temporary folder; needed for >1 process)")
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even where a GPU is")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--kd-weight", type=float, default=0.5)
    args = p.parse_args(argv)

    # under torchrun / accelerate launch: the process group (cpu=True names gloo for it where no GPU is)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    if accelerator.num_processes > 1 and not args.out:
        p.error("more than one process needs --out: every process must find the same cache")
    base = tiny_dataset() if args.tiny else datasets.FashionMNIST(args.data, train=True, download=True)
    if args.hf:
        base = as_hf(base)
    size = 16 if args.tiny else 28
    augment = v2.Compose(
        [v2.ToImage(), v2.RandomCrop(size, padding=size // 7), v2.RandomHorizontalFlip(),
         v2.ToDtype(torch.float32, scale=True)]
    )  # fmt: skip
    out = Path(args.out or tempfile.mkdtemp(prefix="logitcache-accelerate-"))

    cache = out / "cache"
    missing = not cache.exists()
    accelerator.wait_for_everyone()  # every process has looked before any starts building: they decide alike
    if missing:  # every process takes part: the build shares the teacher's work among them
        torch.manual_seed(0)
        lc.build_cache(make_model(), base, cache, augment=augment, views=args.views, workers=0, progress=False)

    torch.manual_seed(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)  # not the loader
    losses = []
    with lc.CachedKDDataset(base, cache, augment=augment) as ds:  # collective: every process builds it
        kd_loss = lc.KDLoss(ds, temperature=args.temperature).to(accelerator.device)
        loader = kd_dataloader(ds, accelerator, batch_size=args.batch_size, num_workers=args.workers, drop_last=True)
        for epoch in range(args.epochs):
            ds.set_epoch(epoch)  # before iterating: the view, and the sampler's shuffle
            total, steps = torch.zeros((), device=accelerator.device), 0
            for batch in loader:
                images, labels, targets = send_to_device(batch, accelerator.device, non_blocking=True)
                with accelerator.autocast():
                    logits = model(images)
                kd = kd_loss(logits.float(), targets)
                loss = (1 - args.kd_weight) * F.cross_entropy(logits.float(), labels) + args.kd_weight * kd
                opt.zero_grad(set_to_none=True)
                accelerator.backward(loss)
                opt.step()
                total, steps = total + loss.detach(), steps + 1
            mean = accelerator.reduce(total / steps, reduction="mean")  # over the processes
            losses.append(float(mean))
            accelerator.print(f"epoch {epoch}: loss {losses[-1]:.4f}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # a checkpoint a later `logitcache build --teacher-weights` reads
        accelerator.save({"model": accelerator.unwrap_model(model).state_dict()}, out / "model.pth")
    result = {"example": "accelerate_loop", "processes": accelerator.num_processes, "losses": losses}
    accelerator.print(json.dumps(result))
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
