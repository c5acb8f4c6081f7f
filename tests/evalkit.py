"""Helpers shared by the lineval/kNN/analyze tests: toy labelled image sets and weights files in every format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hnmix.models.backbone import create_backbone
from hnmix.models.moco import MoCo


def write_brightness_split(root: Path, n_per_class: int, size: int = 16, seed: int = 0,
                           random_labels: bool = False) -> Path:
    """Classes 'dark' and 'bright' (pixel values 0-90 vs 165-255): trivially separable by any feature that
    keeps brightness. With random_labels the folder of each image is a coin flip: nothing to learn."""
    rng = np.random.default_rng(seed)
    for i in range(2 * n_per_class):
        bright = i % 2
        pixels = rng.integers(165, 256, (size, size, 3)) if bright else rng.integers(0, 91, (size, size, 3))
        label = int(rng.integers(2)) if random_labels else bright
        folder = root / ("bright" if label else "dark")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:04d}.png")
    return root


def write_brightness_dataset(root: Path, n_train: int = 24, n_val: int = 12, **kw) -> Path:
    write_brightness_split(root / "train", n_train, seed=1, **kw)
    write_brightness_split(root / "val", n_val, seed=2, **kw)
    return root


def tiny_moco(seed: int = 0, K: int = 32, dim: int = 16) -> MoCo:
    torch.manual_seed(seed)
    return MoCo(create_backbone("test_resnet"), dim=dim, K=K, m=0.99, T=0.2, mlp=True)


def save_hnmix_checkpoint(path: Path, model: MoCo, **config) -> Path:
    cfg = {"arch": "test_resnet", "cifar_stem": False, "image_size": 16, "dim": model.queue.shape[1],
           "queue_size": model.K, "temperature": model.T, "mlp": True, "method": "moco", **config}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": "hnmix-checkpoint", "model": model.state_dict(), "config": cfg, "epoch": 3, "step": 30},
               path)
    return path


def save_backbone(path: Path, model: MoCo) -> Path:
    torch.save(model.encoder_q.backbone.state_dict(), path)
    return path


def save_official_moco(path: Path, model: MoCo) -> Path:
    """The layout of facebookresearch/moco checkpoints: DataParallel prefixes, fc.* heads, a (dim, K) queue."""
    sd = {}
    for enc in ("encoder_q", "encoder_k"):
        for k, v in getattr(model, enc).state_dict().items():
            name = "fc." + k[5:] if k.startswith("head.") else k.removeprefix("backbone.")
            sd[f"module.{enc}.{name}"] = v
    sd["module.queue"] = model.queue.T.contiguous()
    sd["module.queue_ptr"] = model.queue_ptr.view(1)
    torch.save({"epoch": 200, "arch": "test_resnet", "state_dict": sd, "optimizer": {}}, path)
    return path
