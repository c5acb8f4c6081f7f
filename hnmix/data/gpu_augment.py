"""MoCo-v2 aug+ on a whole batch of uint8 images on any device: the distributions of
hnmix.data.augment.moco_v2_augment, with every draw a tensor and no per-image Python.

Per sample, in torchvision's order: RandomResizedCrop(scale 0.2-1, ratio 3/4-4/3, 10 tries, then the
central fallback), ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 in a random order of its four ops,
grayscale p 0.2, Gaussian blur sigma U(0.1, 2) p 0.5 (kernel blur_kernel(size), reflect padding),
horizontal flip p 0.5, then ImageNet normalisation. Colour ops follow torchvision's tensor kernels on
[0, 1] floats (the CPU pipeline runs PIL's, which round to uint8 after each op). The crop is resampled
by roi_align: bilinear when enlarging (as PIL), an average of bilinear samples when shrinking (PIL
uses a triangle filter there).

Randomness lives in AugDraws: raw U(0, 1) numbers per view, drawn once for the global batch, so a
sample's views do not depend on how the batch is split over ranks.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from hnmix.data.augment import IMAGENET_MEAN, IMAGENET_STD, blur_kernel

SCALE, RATIO, CROP_TRIES = (0.2, 1.0), (3 / 4, 4 / 3), 10
BRIGHTNESS = CONTRAST = SATURATION = 0.4
HUE = 0.1
P_JITTER, P_GRAY, P_BLUR, P_FLIP = 0.8, 0.2, 0.5, 0.5
SIGMA = (0.1, 2.0)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


class AugDraws(NamedTuple):
    """Every random number of one view per row; the transforms map them to parameters."""

    crop_scale: torch.Tensor  # (n, 10) U(0, 1) per try
    crop_ratio: torch.Tensor  # (n, 10)
    crop_pos: torch.Tensor  # (n, 2) top, left
    jitter: torch.Tensor  # (n,) applied when < P_JITTER
    jitter_order: torch.Tensor  # (n, 4) a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue
    jitter_factors: torch.Tensor  # (n, 4) in that op order
    gray: torch.Tensor  # (n,)
    blur: torch.Tensor  # (n,)
    sigma: torch.Tensor  # (n,)
    flip: torch.Tensor  # (n,)

    def take(self, rows: torch.Tensor | slice) -> AugDraws:
        return AugDraws(*(field[rows] for field in self))


def draw_augment(n: int, *, generator: torch.Generator | None = None, device=None) -> AugDraws:
    kw = dict(generator=generator, device=device)
    return AugDraws(
        crop_scale=torch.rand(n, CROP_TRIES, **kw), crop_ratio=torch.rand(n, CROP_TRIES, **kw),
        crop_pos=torch.rand(n, 2, **kw), jitter=torch.rand(n, **kw),
        jitter_order=torch.rand(n, 4, **kw).argsort(dim=1),  # uniform over the 24 orders, as randperm(4)
        jitter_factors=torch.rand(n, 4, **kw), gray=torch.rand(n, **kw), blur=torch.rand(n, **kw),
        sigma=torch.rand(n, **kw), flip=torch.rand(n, **kw),
    )


@functools.cache
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant made once per device: torch.tensor(..., device=cuda) in a step would wait for it."""
    return torch.tensor(values, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------- crop


class Boxes(NamedTuple):
    top: torch.Tensor  # (n,) float64 integers, as RandomResizedCrop.get_params's (i, j, h, w)
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


def crop_boxes(heights: torch.Tensor, widths: torch.Tensor, draws: AugDraws) -> Boxes:
    """RandomResizedCrop.get_params for every row at once: the first of 10 tries that fits, else the
    central crop. All tries are drawn (torchvision stops at the first fit): the same distribution."""
    H, W = heights.double()[:, None], widths.double()[:, None]
    target = H * W * (SCALE[0] + (SCALE[1] - SCALE[0]) * draws.crop_scale.double())
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * draws.crop_ratio.double())
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()  # half to even, as round()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits
    found = fits.any(dim=1)
    w, h, H, W = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], H[:, 0], W[:, 0]
    # fallback: the whole image, or its centre clipped to the extreme ratio
    in_ratio = W / H
    fb_w = torch.where(in_ratio > RATIO[1], (H * RATIO[1]).round(), W)
    fb_h = torch.where(in_ratio < RATIO[0], (W / RATIO[0]).round(), H)
    w, h = torch.where(found, w, fb_w), torch.where(found, h, fb_h)
    u = draws.crop_pos.double()
    top = torch.where(found, torch.floor(u[:, 0] * (H - h + 1)).clamp_max(H - h), torch.div(H - h, 2, rounding_mode="floor"))
    left = torch.where(found, torch.floor(u[:, 1] * (W - w + 1)).clamp_max(W - w), torch.div(W - w, 2, rounding_mode="floor"))
    return Boxes(top, left, h, w)


def resized_crop(images: torch.Tensor, boxes: Boxes, size: int, source: torch.Tensor) -> torch.Tensor:
    """(n, C, size, size) float: box k of image source[k], resampled with pixel-centre alignment."""
    rois = torch.stack([source.double(), boxes.left, boxes.top, boxes.left + boxes.width, boxes.top + boxes.height],
                       dim=1).to(images.dtype)
    return roi_align(images, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)


# ------------------------------------------------------------------------------------------ colour


def _per_sample(x: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device).reshape(-1, 1, 1, 1)


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(n, 1, H, W) luma of (n, 3, H, W) floats."""
    return (x * _constant(GRAY_WEIGHTS, x.dtype, x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def blend(x: torch.Tensor, other: torch.Tensor, factor) -> torch.Tensor:
    return torch.lerp(other, x, _per_sample(factor, x)).clamp(0, 1)


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    return blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    return blend(x, rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    return blend(x, rgb_to_grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift) -> torch.Tensor:
    """Rotate the HSV hue by shift (turns), keeping S and V: torchvision's adjust_hue in fewer passes.

    Hue in sixths h6 from the channel holding the max (first one on ties, as torchvision/PIL), then back
    with the closed form c = V - V S clamp(min(k, 4 - k), 0, 1), k = (n_c + h6) mod 6, n = 5, 3, 1."""
    maxc = x.amax(dim=1, keepdim=True)
    span = maxc - x.amin(dim=1, keepdim=True)  # = V S
    top = x.argmax(dim=1, keepdim=True)
    diffs = x - x.roll(-1, dims=1)  # r - g, g - b, b - r
    h6 = diffs.gather(1, (top + 1) % 3) / torch.where(span == 0, 1.0, span) + 2 * top
    h6 = (h6 + 6 * _per_sample(shift, x)).remainder(6)
    k = (_constant((5.0, 3.0, 1.0), x.dtype, x.device).view(1, 3, 1, 1) + h6).remainder(6)
    return maxc - span * torch.minimum(k, 4 - k).clamp(0, 1)


def _blend_slot(x: torch.Tensor, op: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """One of brightness (op 0), contrast (1) or saturation (2) per sample, each a clamped blend
    x f + other (1 - f); other ops (3, hue; -1, none) leave the sample exactly as it is (f = 1)."""
    f = torch.where(op == 0, factors[0], torch.where(op == 1, factors[1], torch.where(op == 2, factors[2], 1.0)))
    gray = rgb_to_grayscale(x)
    pick = op.reshape(-1, 1, 1, 1)
    other = torch.where(pick == 1, gray.mean(dim=(1, 2, 3), keepdim=True), gray) * (pick != 0)
    return torch.lerp(other, x, _per_sample(f, x)).clamp_(0, 1)  # lerp is exact at f = 1


def color_jitter(x: torch.Tensor, draws: AugDraws) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, each sample's four ops in its own order.

    The costly hue shift runs once for the whole batch: first each sample's ops before its hue (three
    blend slots, the identity where a sample has fewer), then the hue, then the ops after it."""
    applied = draws.jitter < P_JITTER
    u = draws.jitter_factors.to(x.dtype)
    factors = [1 - b + 2 * b * u[:, k] for k, b in enumerate((BRIGHTNESS, CONTRAST, SATURATION))]
    order = torch.where(applied[:, None], draws.jitter_order, -1)  # -1: no op (jitter not drawn)
    hue_at = (draws.jitter_order == 3).float().argmax(dim=1)
    for slot in range(3):
        x = _blend_slot(x, torch.where(slot < hue_at, order[:, slot], -1), factors)
    shift = torch.where(applied, HUE * (2 * u[:, 3] - 1), 0.0)
    x = torch.where(applied.reshape(-1, 1, 1, 1), adjust_hue(x, shift), x)
    for after in range(1, 4):
        slot = hue_at + after
        x = _blend_slot(x, torch.where(slot <= 3, order.gather(1, slot.clamp(max=3)[:, None])[:, 0], -1), factors)
    return x


# -------------------------------------------------------------------------------------- blur, flip


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(n, size) normalised 1-d kernels, torchvision's _get_gaussian_kernel1d per sigma."""
    lim = (size - 1) / (2.0 * math.sqrt(2.0))
    x = torch.linspace(-lim, lim, size, dtype=sigma.dtype, device=sigma.device)
    return torch.softmax(-(x[None, :] / sigma[:, None]) ** 2, dim=1)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of sample k with kernels[k] (reflect padding), one grouped conv per axis."""
    n, c, height, width = x.shape
    size = kernels.shape[1]
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0)  # (n * c, size)
    y = F.pad(x.reshape(1, n * c, height, width), [size // 2] * 4, mode="reflect")
    y = F.conv2d(y, weight[:, None, :, None], groups=n * c)
    y = F.conv2d(y, weight[:, None, None, :], groups=n * c)
    return y.reshape(n, c, height, width)


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.reshape(-1, 1, 1, 1), x.flip(-1), x)


# ------------------------------------------------------------------------------------------- whole


def crop_views(images: torch.Tensor, draws: AugDraws, size: int, source: torch.Tensor | None = None,
               sizes: torch.Tensor | None = None) -> torch.Tensor:
    """RandomResizedCrop of every row: (n, 3, size, size) floats in [0, 1]. View k is drawn from
    images[source[k]] (default k), whose valid region is its top-left sizes[source[k]] = (height, width)
    (default: the whole tensor; pixels past it must repeat the edge, as hnmix.data.gpu_data stores them)."""
    _, _, height, width = images.shape
    n = draws.jitter.shape[0]
    device = images.device
    source = torch.arange(n, device=device) if source is None else source
    if sizes is None:
        heights, widths = torch.full((n,), height, device=device), torch.full((n,), width, device=device)
    else:
        heights, widths = sizes[source, 0], sizes[source, 1]
    boxes = crop_boxes(heights, widths, draws)
    return resized_crop(images.float(), boxes, size, source) / 255


def finish_views(x: torch.Tensor, draws: AugDraws) -> torch.Tensor:
    """Everything after the crop, on (n, 3, size, size) floats in [0, 1]: jitter, grayscale, blur, flip."""
    x = color_jitter(x, draws)
    x = torch.where((draws.gray < P_GRAY).reshape(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
    sigma = SIGMA[0] + (SIGMA[1] - SIGMA[0]) * draws.sigma.to(x.dtype)
    width = blur_kernel(x.shape[-1])
    identity = _constant(tuple(float(i == width // 2) for i in range(width)), x.dtype, x.device)
    kernels = torch.where((draws.blur < P_BLUR)[:, None], gaussian_kernels(sigma, width), identity)
    x = gaussian_blur(x, kernels)
    return flip(x, draws.flip < P_FLIP)


def augment(images: torch.Tensor, draws: AugDraws, size: int, *, source: torch.Tensor | None = None,
            sizes: torch.Tensor | None = None) -> torch.Tensor:
    """(n, 3, size, size) floats in [0, 1]: crop_views, then finish_views."""
    return finish_views(crop_views(images, draws, size, source, sizes), draws)


class GpuAugment(torch.nn.Module):
    """uint8 batch -> `views` normalised augmented views of every image, stacked view-major."""

    def __init__(self, size: int, channels_last: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, images: torch.Tensor, draws: AugDraws, *, source: torch.Tensor | None = None,
                sizes: torch.Tensor | None = None) -> torch.Tensor:
        x = augment(images, draws, self.size, source=source, sizes=sizes)
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)

    def views(self, images: torch.Tensor, generator: torch.Generator | None = None, views: int = 2,
              sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Convenience: draw and apply `views` views of every image in one pass."""
        n = images.shape[0]
        draws = draw_augment(views * n, generator=generator, device=images.device)
        source = torch.arange(n, device=images.device).repeat(views)
        return list(self(images, draws, source=source, sizes=sizes).chunk(views))
