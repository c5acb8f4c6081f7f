"""The augmentations of hnmix.data.augment.settings on a whole batch of uint8 images, batched tensor ops on any
device (a GPU, or the CPU): the distributions of the PIL ops (hnmix.data.augment.pil), with every draw a
tensor and no per-image Python.

Per view, in torchvision's order: RandomResizedCrop (10 tries, then the central fallback), ColorJitter with
its four ops in a random order, grayscale, Gaussian blur as PIL's ImageFilter.GaussianBlur (three passes of
an extended box per axis, edges repeated, as official MoCo's blur), solarisation, horizontal flip, then
normalisation. Colour ops follow torchvision's tensor kernels on [0, 1] floats (the PIL pipeline rounds to
uint8 after each op). The crop is resampled by roi_align: bilinear when enlarging (as PIL), an average of
bilinear samples when shrinking (PIL uses a triangle filter there).

Randomness lives in AugDraws (hnmix.data.augment.draws): raw U(0, 1) numbers per view, drawn once for the
global batch. Settings live in AugParams: each row's view settings as tensors, so one batched call augments
rows of both (BYOL-style different) views.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

from hnmix.data.augment.draws import AugDraws, AugParams, draw_augment, rows_params, view_table
from hnmix.data.augment.settings import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOLARIZE_THRESHOLD,
    AugmentSettings,
    ViewAugment,
)
from hnmix.data.normalize import normalize

BLUR_PASSES = 3  # PIL's GaussianBlur: three box passes per axis
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def pil_box_radius(sigma):
    """PIL's GaussianBlur(sigma) as three passes of an extended box of this radius (Pillow's BoxBlur.c,
    _gaussian_blur_radius; Gwosdek et al. 2011): the same variance sigma^2. Floats or tensors."""
    sigma2 = sigma * sigma / BLUR_PASSES
    length = (12.0 * sigma2 + 1.0) ** 0.5
    whole = ((length - 1.0) / 2.0) // 1
    part = (2 * whole + 1) * (whole * (whole + 1) - 3 * sigma2) / (6 * (sigma2 - (whole + 1) ** 2))
    return whole + part


def blur_reach(views: Sequence[ViewAugment]) -> int:
    """Farthest offset a blur box of any view reaches (0 when no view blurs): the conv width's half."""
    return max([int(pil_box_radius(v.blur_sigma[1])) + 1 for v in views if v.blur_p > 0], default=0)


def aug_params(views: Sequence[ViewAugment], view_of_row: torch.Tensor) -> AugParams:
    """Row k augmented with views[view_of_row[k]]: one small host-to-device copy, so build it once per run."""
    return rows_params(view_table(views).to(view_of_row.device), view_of_row, blur_reach(views))


@functools.cache
def _constant(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small constant made once per device: torch.tensor(..., device=cuda) in a step would wait for it."""
    return torch.tensor(values, dtype=dtype, device=device)


@functools.cache
def _default_view() -> tuple[tuple[float, ...], int]:
    view = AugmentSettings().views()[0]
    return tuple(view_table([view])[0].tolist()), blur_reach([view])


def default_params(n: int, device) -> AugParams:
    """The default settings (MoCo v2 aug+, view 1) for n rows, without a host-to-device copy after the first."""
    values, reach = _default_view()
    table = _constant(values, torch.float64, torch.device(device))[None]
    return rows_params(table, torch.zeros(n, dtype=torch.long, device=device), reach)


# ------------------------------------------------------------------------------------------- crop


class Boxes(NamedTuple):
    top: torch.Tensor  # (n,) float64 integers, as RandomResizedCrop.get_params's (i, j, h, w)
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


def crop_boxes(heights: torch.Tensor, widths: torch.Tensor, draws: AugDraws, params: AugParams | None = None) -> Boxes:
    """RandomResizedCrop.get_params for every row at once: the first of 10 tries that fits, else the
    central crop. All tries are drawn (torchvision stops at the first fit): the same distribution."""
    params = default_params(len(heights), heights.device) if params is None else params
    H, W = heights.double()[:, None], widths.double()[:, None]
    scale_lo, scale_hi = params.crop_scale.double().unbind(1)
    ratio_lo, ratio_hi = params.crop_log_ratio.double().unbind(1)
    target = H * W * (scale_lo[:, None] + (scale_hi - scale_lo)[:, None] * draws.crop_scale.double())
    aspect = torch.exp(ratio_lo[:, None] + (ratio_hi - ratio_lo)[:, None] * draws.crop_ratio.double())
    w, h = torch.sqrt(target * aspect).round(), torch.sqrt(target / aspect).round()  # half to even, as round()
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.float().argmax(dim=1, keepdim=True)  # the first try that fits
    found = fits.any(dim=1)
    w, h, H, W = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], H[:, 0], W[:, 0]
    # fallback: the whole image, or its centre clipped to the extreme ratio
    in_ratio, max_ratio, min_ratio = W / H, ratio_hi.exp(), ratio_lo.exp()
    fb_w = torch.where(in_ratio > max_ratio, (H * max_ratio).round(), W)
    fb_h = torch.where(in_ratio < min_ratio, (W / min_ratio).round(), H)
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
    top = torch.where(x[:, :1] == maxc, 0, torch.where(x[:, 1:2] == maxc, 1, 2))  # argmax, first on ties
    diffs = x - x.roll(-1, dims=1)  # r - g, g - b, b - r
    h6 = diffs.gather(1, (top + 1) % 3) / torch.where(span == 0, 1.0, span) + 2 * top
    h6 = (h6 + 6 * _per_sample(shift, x)).remainder(6)
    k = (_constant((5.0, 3.0, 1.0), x.dtype, x.device).view(1, 3, 1, 1) + h6).remainder(6)
    return maxc - span * torch.minimum(k, 4 - k).clamp(0, 1)


def _blend_slot(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """One of brightness (op 0), contrast (1) or saturation (2) per sample, each a clamped blend
    x f + other (1 - f); other ops (3, hue; -1, none) leave the sample exactly as it is (f = 1)."""
    f = torch.where(op == 0, factors[:, 0], torch.where(op == 1, factors[:, 1], torch.where(op == 2, factors[:, 2], 1.0)))
    gray = rgb_to_grayscale(x)
    pick = op.reshape(-1, 1, 1, 1)
    other = torch.where(pick == 1, gray.mean(dim=(1, 2, 3), keepdim=True), gray) * (pick != 0)
    return torch.lerp(other, x, _per_sample(f, x)).clamp_(0, 1)  # lerp is exact at f = 1


def jitter_factors(draws: AugDraws, params: AugParams) -> torch.Tensor:
    """(n, 4) brightness, contrast and saturation factors and hue shift, each uniform in its view's range."""
    return params.jitter_lo + (params.jitter_hi - params.jitter_lo) * draws.jitter_factors.to(params.jitter_lo.dtype)


def color_jitter(x: torch.Tensor, draws: AugDraws, params: AugParams | None = None) -> torch.Tensor:
    """ColorJitter with each row's strengths and probability, each sample's four ops in its own order.

    The costly hue shift runs once for the whole batch: first each sample's ops before its hue (three
    blend slots, the identity where a sample has fewer), then the hue, then the ops after it. A zero
    strength skips its op, as torchvision does."""
    params = default_params(x.shape[0], x.device) if params is None else params
    applied = draws.jitter < params.jitter_p
    factors = jitter_factors(draws, params).to(x.dtype)
    order = torch.where(applied[:, None], draws.jitter_order, -1)  # -1: no op (jitter not drawn)
    hue_at = (draws.jitter_order == 3).float().argmax(dim=1)
    for slot in range(3):
        x = _blend_slot(x, torch.where(slot < hue_at, order[:, slot], -1), factors)
    hue = applied & (params.jitter_hi[:, 3] > 0)
    x = torch.where(hue.reshape(-1, 1, 1, 1), adjust_hue(x, torch.where(hue, factors[:, 3], 0.0)), x)
    for after in range(1, 4):
        slot = hue_at + after
        x = _blend_slot(x, torch.where(slot <= 3, order.gather(1, slot.clamp(max=3)[:, None])[:, 0], -1), factors)
    return x


# --------------------------------------------------------------------------- blur, solarise, flip


def blur_sigmas(draws: AugDraws, params: AugParams) -> torch.Tensor:
    """(n,) each row's blur sigma, uniform in its view's range where the blur is drawn, else 0 (no blur)."""
    lo, hi = params.blur_sigma.unbind(1)
    sigma = lo + (hi - lo) * draws.sigma.to(lo.dtype)
    return torch.where(draws.blur < params.blur_p, sigma, 0.0)


def box_kernels(radius: torch.Tensor, reach: int) -> torch.Tensor:
    """(n, 2 reach + 1) extended boxes: weight 1 within the whole radius, its fraction at the next pixel, over
    2 radius + 1 (Pillow's ImagingLineBoxBlur). Radius 0 is the identity."""
    offsets = torch.arange(-reach, reach + 1, dtype=radius.dtype, device=radius.device).abs()
    return (radius[:, None] + 1 - offsets).clamp(0, 1) / (2 * radius[:, None] + 1)


def box_blur(x: torch.Tensor, kernels: torch.Tensor, passes: int = BLUR_PASSES) -> torch.Tensor:
    """`passes` blurs of sample k with kernels[k] along each axis, the edge pixel repeated before every pass
    (PIL's box blur, in floats where PIL rounds each pass to uint8)."""
    n, c, height, width = x.shape
    reach = kernels.shape[1] // 2
    weight = kernels.to(x.dtype).repeat_interleave(c, dim=0)[:, None, None, :]  # (n * c, 1, 1, taps)
    y = x.reshape(1, n * c, height, width)
    for pad, w in (((reach, reach, 0, 0), weight), ((0, 0, reach, reach), weight.transpose(2, 3))):
        for _ in range(passes):
            y = F.conv2d(F.pad(y, pad, mode="replicate"), w, groups=n * c)
    return y.reshape(n, c, height, width)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, reach: int) -> torch.Tensor:
    """PIL's ImageFilter.GaussianBlur(sigma[k]) of each sample (sigma 0: unchanged); reach >= every row's box."""
    if reach == 0:
        return x
    return box_blur(x, box_kernels(pil_box_radius(sigma.double()), reach))


def solarize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Invert the levels that round to >= 128 of 255 (PIL's ImageOps.solarize on the uint8 view) where mask."""
    inverted = torch.where(x >= (SOLARIZE_THRESHOLD - 0.5) / 255, 1 - x, x)
    return torch.where(mask.reshape(-1, 1, 1, 1), inverted, x)


def flip(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.reshape(-1, 1, 1, 1), x.flip(-1), x)


# ------------------------------------------------------------------------------------------- whole


def crop_views(images: torch.Tensor, draws: AugDraws, size: int, source: torch.Tensor | None = None,
               sizes: torch.Tensor | None = None, params: AugParams | None = None) -> torch.Tensor:
    """RandomResizedCrop of every row: (n, 3, size, size) floats in [0, 1]. View k is drawn from
    images[source[k]] (default k), whose valid region is its top-left sizes[source[k]] = (height, width)
    (default: the whole tensor; pixels past it must repeat the edge, as hnmix.data.pipelines.resident stores
    them)."""
    _, _, height, width = images.shape
    n = draws.jitter.shape[0]
    device = images.device
    source = torch.arange(n, device=device) if source is None else source
    if sizes is None:
        heights, widths = torch.full((n,), height, device=device), torch.full((n,), width, device=device)
    else:
        heights, widths = sizes[source, 0], sizes[source, 1]
    boxes = crop_boxes(heights, widths, draws, params)
    return resized_crop(images.float(), boxes, size, source) / 255


def finish_views(x: torch.Tensor, draws: AugDraws, params: AugParams | None = None) -> torch.Tensor:
    """Everything after the crop, on (n, 3, size, size) floats in [0, 1]: jitter, grayscale, blur, solarise,
    flip, each row with its view's settings (default: MoCo v2 aug+ for every row)."""
    params = default_params(x.shape[0], x.device) if params is None else params
    x = color_jitter(x, draws, params)
    x = torch.where((draws.gray < params.grayscale_p).reshape(-1, 1, 1, 1), rgb_to_grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, blur_sigmas(draws, params), params.blur_reach)
    x = solarize(x, draws.solarize < params.solarize_p)
    return flip(x, draws.flip < params.flip_p)


def augment(images: torch.Tensor, draws: AugDraws, size: int, *, source: torch.Tensor | None = None,
            sizes: torch.Tensor | None = None, params: AugParams | None = None) -> torch.Tensor:
    """(n, 3, size, size) floats in [0, 1]: crop_views, then finish_views."""
    return finish_views(crop_views(images, draws, size, source, sizes, params), draws, params)


class TensorAugment(torch.nn.Module):
    """uint8 batch -> normalised augmented views, each row with the settings of its view (`view`: 0 for the
    first view, the settings' top level; 1 for the second, `view2`)."""

    def __init__(self, size: int, channels_last: bool = False, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 settings: AugmentSettings | None = None):
        super().__init__()
        self.size = size
        views = (settings or AugmentSettings()).views()
        self.register_buffer("table", view_table(views), persistent=False)
        self.blur_reach = blur_reach(views)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def params(self, view: torch.Tensor) -> AugParams:
        """Rows' settings for their view indices (on the table's device: no host-to-device copy)."""
        return rows_params(self.table, view, self.blur_reach)

    def forward(self, images: torch.Tensor, draws: AugDraws, *, source: torch.Tensor | None = None,
                sizes: torch.Tensor | None = None, view: torch.Tensor | None = None) -> torch.Tensor:
        view = torch.zeros(draws.jitter.shape[0], dtype=torch.long, device=images.device) if view is None else view
        x = augment(images, draws, self.size, source=source, sizes=sizes, params=self.params(view))
        return normalize(x, self.mean, self.std, self.memory_format)

    def views(self, images: torch.Tensor, generator: torch.Generator | None = None, views: int = 2,
              sizes: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Convenience: draw and apply `views` views of every image in one pass (view 1's settings for the
        first, view 2's for the others)."""
        n = images.shape[0]
        draws = draw_augment(views * n, generator=generator, device=images.device)
        source = torch.arange(n, device=images.device).repeat(views)
        view = (torch.arange(views, device=images.device) > 0).long().repeat_interleave(n)
        return list(self(images, draws, source=source, sizes=sizes, view=view).chunk(views))
