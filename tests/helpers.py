"""Helpers every test module may use: tiny data made on the fly, weights files in every format, the
one-line-error check, and the two pipelines' views with the Kolmogorov-Smirnov check that compares them.
(Fixtures live in conftest.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hnmix.data.augment import draws as D
from hnmix.data.augment import tensor as G
from hnmix.data.augment.pil import make_pil_transform
from hnmix.data.augment.settings import AugmentSettings
from hnmix.models.backbone import create_backbone
from hnmix.models.moco import MoCo

ROOT = Path(__file__).resolve().parents[1]
# the smallest settings that still exercise every part of a pretraining run
TINY = ["--arch", "test_resnet", "--image-size", "16", "--batch-size", "8", "--queue-size", "32",
        "--dim", "16", "--workers", "0", "--set", "log_every=1"]


def write_images(root: Path, n: int, classes: list[str] | None = None, size: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.jpg")
    return root


def assert_clean_error(result, message):
    assert result.exit_code == 2, result.output
    err = result.stderr.strip()
    assert "Traceback" not in result.output and len(err.splitlines()) == 1, err
    assert err.startswith("error:") and message in err, err


# ----------------------------------------------------------------- labelled sets and weights files


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


# ------------------------------------------------------------------ the two augmentation pipelines


OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, flip_p=0.0)  # only the crop stays


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().sort().values, b.double().sort().values
    v = torch.cat([a, b])
    fa = torch.searchsorted(a, v, right=True) / len(a)
    fb = torch.searchsorted(b, v, right=True) / len(b)
    return float((fa - fb).abs().max())


def assert_same_distribution(a, b, what):
    """Two-sample KS test at alpha = 0.001."""
    critical = math.sqrt(-math.log(0.001 / 2) / 2) * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    d = ks_statistic(a, b)
    assert d < critical, f"{what}: KS statistic {d:.4f} >= {critical:.4f}"


def pil_views(array: np.ndarray, size: int, n: int, settings: AugmentSettings | None = None, view: int = 0,
              seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) float uint8 levels: n views of one image by the PIL pipeline."""
    transform, img = make_pil_transform(settings, size, view), Image.fromarray(array)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(img) for _ in range(n)]).float()


def gpu_views(array: np.ndarray, size: int, n: int, settings: AugmentSettings | None = None, view: int = 0,
              seed: int = 0) -> torch.Tensor:
    """The same from the device pipeline, rounded to the PIL pipeline's uint8 levels."""
    images = torch.from_numpy(array).permute(2, 0, 1)[None].expand(n, -1, -1, -1).contiguous()
    draws = D.draw_augment(n, generator=torch.Generator().manual_seed(seed))
    params = G.aug_params((settings or AugmentSettings()).views(), torch.full((n,), view))
    return (G.augment(images, draws, size, params=params) * 255).round()


PIPELINES = {"pil": pil_views, "gpu": gpu_views}
