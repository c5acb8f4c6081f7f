"""Labelled evaluation data: train/val pairs with matching classes, and the evaluation transforms.

Transforms return uint8 tensors, like the pretraining views; normalisation happens on the device.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T

from hnmix.data.demo import DEMO, DemoImages
from hnmix.data.folder import ImageFiles
from hnmix.errors import HnmixError

VAL_SPLITS = ("val", "test")  # CIFAR-style roots name their held-out split test/


SMALL_IMAGES = 64  # pretraining sizes up to this are evaluated at their own size
EVAL_TRANSFORMS = ("at-size", "resize-crop")


def choose_eval_transform(size: int, choice: str = "auto", recorded: str | None = None) -> str:
    """The one rule for how evaluation sees an image. An explicit choice wins, then the one the run recorded
    (its config.yaml), else by size: small images (<= 64 px, CIFAR, STL at 64) at-size, as MoCo's CIFAR-10
    demo and solo-learn evaluate them; larger ones resize-crop, MoCo's ImageNet validation transform."""
    if choice != "auto":
        return choice
    if recorded in EVAL_TRANSFORMS:
        return recorded
    return "at-size" if size <= SMALL_IMAGES else "resize-crop"


def eval_resize(size: int, choice: str) -> int:
    """The short side before the centre crop: the size itself (at-size), or 256/224 of it (resize-crop)."""
    return size if choice == "at-size" else round(size * 256 / 224)


def describe_eval_transform(size: int, choice: str) -> str:
    if choice == "at-size":
        return f"at-size: short side to {size} px, centre crop {size} (unchanged when already {size} px)"
    return f"resize-crop: short side to {eval_resize(size, choice)} px, centre crop {size} (MoCo's ImageNet val)"


def eval_transform(size: int, choice: str = "auto") -> T.Compose:
    """Short side to eval_resize, centre crop `size`, uint8 tensor (choice as choose_eval_transform)."""
    choice = choose_eval_transform(size, choice)
    return T.Compose([
        T.Resize(eval_resize(size, choice), antialias=True),
        T.CenterCrop(size),
        T.PILToTensor(),
    ])


def linear_train_transform(size: int, min_scale: float = 0.08) -> T.Compose:
    """RandomResizedCrop + horizontal flip: MoCo's main_lincls training augmentation."""
    return T.Compose([
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])


class Labelled(Dataset):
    """(transformed uint8 image, label) for ImageFiles/DemoImages, optionally restricted to some indices."""

    def __init__(self, images, transform, indices: list[int] | None = None):
        self.images, self.transform = images, transform
        self.indices = list(range(len(images))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        index = self.indices[i]
        return self.transform(self.images.load(index)), self.images.labels[index]


def describe_source(images) -> str:
    return str(images.root) if isinstance(images, ImageFiles) else "demo"


def require_labels(images, what: str) -> None:
    if not images.classes or any(label < 0 for label in images.labels):
        raise HnmixError(f"{what} needs labelled images (an ImageFolder: one sub-folder per class), "
                         f"but {describe_source(images)} has none")


def open_train_val(data: str | None, train: str | None = None, val: str | None = None,
                   what: str = "lineval"):
    """(train images, val images) with identical class lists.

    `data` is 'demo' or a root holding train/ and val/ (or test/); `train`/`val` name the folders directly.
    """

    if train is None and val is None and data == DEMO:
        train_images, val_images = DemoImages("train"), DemoImages("val")
    else:
        train_dir = Path(train) if train else _split_dir(data, ("train",), what)
        val_dir = Path(val) if val else _split_dir(data, VAL_SPLITS, what)
        train_images, val_images = ImageFiles(train_dir), ImageFiles(val_dir)
    require_labels(train_images, what)
    require_labels(val_images, what)
    if train_images.classes != val_images.classes:
        only_train = sorted(set(train_images.classes) - set(val_images.classes))
        only_val = sorted(set(val_images.classes) - set(train_images.classes))
        detail = "; ".join(part for part in (
            f"only in train: {', '.join(only_train[:5])}" if only_train else "",
            f"only in val: {', '.join(only_val[:5])}" if only_val else "",
        ) if part)
        raise HnmixError(f"val classes differ from train classes ({len(train_images.classes)} in "
                         f"{describe_source(train_images)}, {len(val_images.classes)} in "
                         f"{describe_source(val_images)}; {detail})")
    return train_images, val_images


def _split_dir(data: str | None, names: tuple[str, ...], what: str) -> Path:
    if data is None:
        raise HnmixError(f"{what} needs --data DIR (holding train/ and val/) or --train DIR --val DIR")
    root = Path(data)
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise HnmixError(f"{root} has no {' or '.join(n + '/' for n in names)} folder: pass --train DIR --val DIR")
