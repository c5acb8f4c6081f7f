"""Helpers shared by the augmentation tests: views of one image from either pipeline, and the two-sample
Kolmogorov-Smirnov check used to compare their distributions."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from hnmix.data import gpu_augment as G
from hnmix.data.augment import make_pil_transform
from hnmix.data.augment_settings import AugmentSettings

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
    draws = G.draw_augment(n, generator=torch.Generator().manual_seed(seed))
    params = G.aug_params((settings or AugmentSettings()).views(), torch.full((n,), view))
    return (G.augment(images, draws, size, params=params) * 255).round()


PIPELINES = {"pil": pil_views, "gpu": gpu_views}
