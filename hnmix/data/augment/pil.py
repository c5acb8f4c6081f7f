"""The augmentations of hnmix.data.augment.settings on PIL images (one image at a time, in loader workers),
returning uint8 tensors; normalisation happens on the device.

Parameters come from the tensor ops' uniform draws (hnmix.data.augment.draws.draw_uniforms, from torch's
RNG), mapped as they map them (in plain Python here, tested equal), so both share one definition of every
distribution. Pixels are
Pillow's, as torchvision's PIL transforms and official MoCo compute them: RandomResizedCrop (crop, then
resize), ColorJitter's four ops (torchvision's functions), grayscale as `convert("L")`
(kept one band until the tensor), ImageFilter.GaussianBlur (band by band), ImageOps.solarize, flip.

An image is decoded once for both views, after both crops are drawn from its header size: a JPEG whose
two crops still cover the output size at 1/2, 1/4 or 1/8 scale is decoded at that scale (libjpeg's DCT
scaling, `Image.draft`), which leaves the crop distribution unchanged.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps, ImageStat

from hnmix.data.augment.draws import AugDraws, draw_uniforms, row_draws
from hnmix.data.augment.settings import SOLARIZE_THRESHOLD, AugmentSettings, ViewAugment
from hnmix.data.cache import cache_dir
from hnmix.data.folder import can_draft, decode

DRAFT_SCALES = (8, 4, 2)  # JPEG DCT-domain reductions


class ViewPlan(NamedTuple):
    """One view's drawn parameters as plain numbers."""

    box: tuple[int, int, int, int]  # left, top, right, bottom in the full-size image
    jitter: list[tuple[int, float]]  # (op, factor) in the drawn order; op 0-3: brightness, contrast, saturation, hue
    grayscale: bool
    sigma: float  # 0: no blur
    solarize: bool
    flip: bool


def crop_box(height: int, width: int, view: ViewAugment, u_scale, u_ratio, u_pos) -> tuple[int, int, int, int]:
    """RandomResizedCrop.get_params with these uniforms: the first of the tries that fits, else the central
    crop (hnmix.data.augment.tensor.crop_boxes for one image, in plain Python: a few microseconds)."""
    (scale_lo, scale_hi), (ratio_lo, ratio_hi) = view.crop_scale, view.crop_ratio
    log_lo, log_hi = math.log(ratio_lo), math.log(ratio_hi)
    for us, ur in zip(u_scale, u_ratio, strict=True):
        target = height * width * (scale_lo + (scale_hi - scale_lo) * us)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(math.floor(u_pos[0] * (height - h + 1)), height - h)
            left = min(math.floor(u_pos[1] * (width - w + 1)), width - w)
            return left, top, left + w, top + h
    w = round(height * ratio_hi) if width / height > ratio_hi else width
    h = round(width / ratio_lo) if width / height < ratio_lo else height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def plan_view(height: int, width: int, u: AugDraws, view: ViewAugment) -> ViewPlan:
    """One view's parameters from its row of draws (plain numbers), mapped as the tensor ops map them."""
    ranges = [(max(0.0, 1 - b), 1 + b) for b in (view.brightness, view.contrast, view.saturation)]
    ranges.append((-view.hue, view.hue))
    ops = []
    if u.jitter < view.jitter_p:
        ops = [(op, ranges[op][0] + (ranges[op][1] - ranges[op][0]) * u.jitter_factors[op]) for op in u.jitter_order
               if ranges[op][1] > ranges[op][0]]  # a zero strength skips its op, as torchvision does
    (sigma_lo, sigma_hi) = view.blur_sigma
    sigma = sigma_lo + (sigma_hi - sigma_lo) * u.sigma if u.blur < view.blur_p else 0.0
    return ViewPlan(crop_box(height, width, view, u.crop_scale, u.crop_ratio, u.crop_pos), ops,
                    u.gray < view.grayscale_p, sigma, u.solarize < view.solarize_p, u.flip < view.flip_p)


def plan_views(height: int, width: int, uniforms: torch.Tensor, views: Sequence[ViewAugment]) -> list[ViewPlan]:
    """Row k of uniforms (draws.draw_uniforms) planned with views[k], for an image of this size."""
    return [plan_view(height, width, row_draws(row), view) for row, view in zip(uniforms.tolist(), views, strict=True)]


# ---------------------------------------------------------------------------------------- stages


def draft_scale(plans: Sequence[ViewPlan], size: int, img: Image.Image) -> int:
    """The largest JPEG reduction at which every view's crop still covers size x size pixels (else 1)."""
    if not can_draft(img):
        return 1
    smallest = min(min(p.box[2] - p.box[0], p.box[3] - p.box[1]) for p in plans)
    return next((s for s in DRAFT_SCALES if smallest / s >= size), 1)


def crop_resize(img: Image.Image, box: tuple[int, int, int, int], size: int, scale: int = 1) -> Image.Image:
    """RandomResizedCrop's crop and bilinear (antialiased) resize, box in full-size pixels. On a reduced image
    (scale > 1) one `resize(box=...)` call takes the fractional box; at full size the crop comes first, as
    torchvision's (its edge repeats at the view's border, where the box form would read past it)."""
    if scale > 1:
        return img.resize((size, size), Image.Resampling.BILINEAR, box=tuple(c / scale for c in box))
    return img.crop(box).resize((size, size), Image.Resampling.BILINEAR)


def _all_colours(slowest_first: tuple[int, int, int]) -> np.ndarray:
    """Every 24-bit colour once, as a 4096 x 4096 x 3 image; channel slowest_first[k] varies along axis k."""
    colours = np.empty((256, 256, 256, 3), np.uint8)
    for axis, channel in enumerate(slowest_first):
        shape = [1, 1, 1]
        shape[axis] = 256
        colours[..., channel] = np.arange(256, dtype=np.uint8).reshape(shape)
    return colours.reshape(4096, 4096, 3)


def _pack(pixels: np.ndarray, shifts: tuple[int, int, int]) -> np.ndarray:
    return sum(pixels[:, c].astype(np.uint32) << s for c, s in enumerate(shifts)).astype(np.uint32)


@functools.cache
def hue_tables() -> tuple[np.ndarray, np.ndarray]:
    """PIL's own RGB <-> HSV conversions of every colour, as lookup tables of packed uint32 (64 MiB each):
    rgb_to_hsv[r | g << 8 | b << 16] = h << 16 | s << 8 | v and hsv_to_rgb[h << 16 | s << 8 | v] = r | g << 8 |
    b << 16. Built once (a few seconds) into the decoded-data cache directory, then memory-mapped: every
    process, loader workers included, shares the same pages."""
    paths = [cache_dir() / f"pil-{name}-{Image.__version__}.npy" for name in ("rgb2hsv", "hsv2rgb")]
    if not all(p.is_file() for p in paths):
        hsv = np.asarray(Image.fromarray(_all_colours((2, 1, 0)), "RGB").convert("HSV")).reshape(-1, 3)
        rgb = np.asarray(Image.fromarray(_all_colours((0, 1, 2)), "HSV").convert("RGB")).reshape(-1, 3)
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        for path, table in zip(paths, (_pack(hsv, (16, 8, 0)), _pack(rgb, (0, 8, 16))), strict=True):
            tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
            np.save(tmp, table)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the whole table or none
    rgb_to_hsv, hsv_to_rgb = (np.load(p, mmap_mode="r") for p in paths)
    return rgb_to_hsv, hsv_to_rgb


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's PIL adjust_hue, pixel for pixel (PIL's uint8 HSV, the hue shifted with wrap-around, back
    to RGB), its two slow PIL conversions replaced by lookups in tables of those very conversions."""
    if img.mode != "RGB":
        return img
    rgb_to_hsv, hsv_to_rgb = hue_tables()
    shift = np.uint32(np.int32(factor * 255).astype(np.uint8)) << 16  # as torchvision: the uint8 wraps around
    hsv = np.take(rgb_to_hsv, np.frombuffer(img.tobytes("raw", "RGBX"), np.uint32) & 0xFFFFFF)
    hsv += shift
    hsv &= 0xFFFFFF
    return Image.frombuffer("RGBX", img.size, np.take(hsv_to_rgb, hsv), "raw", "RGBX", 0, 1).convert("RGB")


def _blend_lut(base: int, factor: float) -> list[int]:
    """Image.blend(constant base, img, factor) of every level, as Pillow computes it: in float32, clipped, cut
    towards zero (Blend.c)."""
    levels = np.arange(256, dtype=np.float32)
    out = np.float32(base) + np.float32(factor) * (levels - np.float32(base))
    return np.clip(np.trunc(out), 0, 255).astype(np.uint8).tolist()


def adjust_brightness(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's PIL adjust_brightness (ImageEnhance.Brightness: a blend with black), as a lookup table."""
    return img.point(_blend_lut(0, factor) * len(img.getbands()))


def adjust_contrast(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's PIL adjust_contrast (ImageEnhance.Contrast: a blend with the rounded mean gray level),
    as a lookup table."""
    mean = int(ImageStat.Stat(img if img.mode == "L" else img.convert("L")).mean[0] + 0.5)
    return img.point(_blend_lut(mean, factor) * len(img.getbands()))


# torchvision's PIL kernels (ImageEnhance blends; hue through PIL's uint8 HSV), as official MoCo's ColorJitter:
# the same pixels, faster where a lookup table can do it
JITTER_OPS = (adjust_brightness, adjust_contrast, TF.adjust_saturation, adjust_hue)


def jitter(img: Image.Image, ops: list[tuple[int, float]]) -> Image.Image:
    for op, factor in ops:
        img = JITTER_OPS[op](img, factor)
    return img


def blur(img: Image.Image, sigma: float) -> Image.Image:
    """ImageFilter.GaussianBlur, band by band: PIL's one-band blur is faster than its four-byte RGB one."""
    if sigma == 0:
        return img
    blurred = [band.filter(ImageFilter.GaussianBlur(sigma)) for band in img.split()]
    return blurred[0] if img.mode == "L" else Image.merge(img.mode, blurred)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8; a one-band (gray) image repeated over three channels without a copy."""
    pixels = torch.from_numpy(np.array(img))
    return pixels[None].expand(3, -1, -1) if pixels.ndim == 2 else pixels.permute(2, 0, 1)


def render(img: Image.Image, plan: ViewPlan, size: int, scale: int = 1) -> torch.Tensor:
    """One view of a decoded image (decoded at 1/scale) from its plan."""
    view = jitter(crop_resize(img, plan.box, size, scale), plan.jitter)
    if plan.grayscale:
        view = view.convert("L")  # = torchvision's rgb_to_grayscale(img, 3), one band instead of three equal
    view = blur(view, plan.sigma)
    if plan.solarize:
        view = ImageOps.solarize(view, SOLARIZE_THRESHOLD)
    if plan.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(view)


# ----------------------------------------------------------------------------------------- whole


class PilAugment:
    """Views of one image: row k of each call uses the settings of view `views[k]` (0: the first view, the
    settings' top level; 1: the second, `view2`). Draws come from `generator` (default: torch's global RNG)."""

    def __init__(self, settings: AugmentSettings | None, size: int, views: Sequence[int] = (0, 1)):
        both = (settings or AugmentSettings()).views()
        self.size, self.views = size, [both[v] for v in views]

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        """uint8 (3, size, size) views of a PIL image, lazily opened (decoded here, once) or already decoded."""
        uniforms = draw_uniforms(len(self.views), generator=generator)
        plans = plan_views(img.height, img.width, uniforms, self.views)
        scale = draft_scale(plans, self.size, img)
        img = decode(img, scale)
        return [render(img, plan, self.size, scale) for plan in plans]


class PilTransform:
    """A single-view transform, img -> uint8 tensor, drawing from torch's global RNG (as torchvision's)."""

    def __init__(self, augment: PilAugment):
        self.augment = augment

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.augment(img)[0]


def make_pil_transform(settings: AugmentSettings | None, size: int, view: int = 0) -> PilTransform:
    """The PIL transform of one view (0: first, 1: second) of these settings (default: MoCo v2 aug+)."""
    return PilTransform(PilAugment(settings, size, views=(view,)))
