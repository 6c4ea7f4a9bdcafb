"""A Hugging Face ``datasets.Dataset`` of images as the base dataset of a cache: ``(PIL image, int label)`` per row.

Duck-typed: it reads rows by index and one column, so it imports nothing from ``datasets``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset


class HFImages(Dataset):
    """``HFImages(hf_dataset, image_key="image", label_key="label")[i]`` -> ``(PIL image, int label)``.

    The image column decodes to PIL (the ``Image`` feature) or holds arrays (converted with
    ``PIL.Image.fromarray``); ``targets`` holds the label column, so that labels are read without decoding images
    (the fingerprint and replayed mixing read them). Apply no random transform to the Hugging Face dataset itself:
    logitcache replays the augmentation (``augment=``). Pickles with the dataset (DataLoader workers, spawn too).
    """

    def __init__(self, dataset: Any, image_key: str = "image", label_key: str = "label"):
        self.dataset, self.image_key, self.label_key = dataset, image_key, label_key
        self.targets = np.asarray(list(dataset[label_key]), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.dataset[int(index)]
        image = row[self.image_key]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image))
        return image, int(row[self.label_key])
