"""What the augmentations draw and with which settings, field by field: AugDraws holds a view's raw U(0, 1)
numbers, AugParams its settings as tensors. Both pipelines read them by name: the tensor ops on whole
batches (hnmix.data.augment.tensor) and the PIL ops one image at a time (hnmix.data.augment.pil, from
`row_draws`, the same numbers as plain floats), so both share one definition of every distribution.

Draws are taken once for the global batch (one kernel on a GPU), so a sample's views do not depend on how
the batch is split over ranks (hnmix.data.order.rank_rows).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from hnmix.data.augment.settings import ViewAugment

CROP_TRIES = 10


class AugDraws(NamedTuple):
    """Every random number of one view per row; the transforms map them to parameters (with AugParams)."""

    crop_scale: torch.Tensor  # (n, 10) U(0, 1) per try
    crop_ratio: torch.Tensor  # (n, 10)
    crop_pos: torch.Tensor  # (n, 2) top, left
    jitter: torch.Tensor  # (n,) applied when < jitter_p
    jitter_order: torch.Tensor  # (n, 4) a permutation of 0 brightness, 1 contrast, 2 saturation, 3 hue
    jitter_factors: torch.Tensor  # (n, 4) in that op order
    gray: torch.Tensor  # (n,)
    blur: torch.Tensor  # (n,)
    sigma: torch.Tensor  # (n,)
    solarize: torch.Tensor  # (n,)
    flip: torch.Tensor  # (n,)

    def take(self, rows: torch.Tensor | slice) -> AugDraws:
        return AugDraws(*(field[rows] for field in self))


DRAW_WIDTHS = AugDraws(crop_scale=CROP_TRIES, crop_ratio=CROP_TRIES, crop_pos=2, jitter=1, jitter_order=4,
                       jitter_factors=4, gray=1, blur=1, sigma=1, solarize=1, flip=1)


def draw_uniforms(n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """(n, sum(DRAW_WIDTHS)) U(0, 1): all of n views' random numbers in one draw (one kernel on a GPU)."""
    return torch.rand(n, sum(DRAW_WIDTHS), generator=generator, device=device)


def split_draws(u: torch.Tensor) -> AugDraws:
    """The fields of draw_uniforms' columns; the jitter order is the argsort of its four numbers."""
    parts = u.split(list(DRAW_WIDTHS), dim=1)
    fields = {name: part if width > 1 else part[:, 0]
              for (name, width), part in zip(DRAW_WIDTHS._asdict().items(), parts, strict=True)}
    fields["jitter_order"] = fields["jitter_order"].argsort(dim=1)  # uniform over the 24 orders, as randperm(4)
    return AugDraws(**fields)


def draw_augment(n: int, *, generator: torch.Generator | None = None, device=None) -> AugDraws:
    return split_draws(draw_uniforms(n, generator=generator, device=device))


def row_draws(row: list[float]) -> AugDraws:
    """One row of draw_uniforms as plain numbers, split as split_draws splits the tensor."""
    fields, start = [], 0
    for width in DRAW_WIDTHS:
        fields.append(row[start] if width == 1 else row[start:start + width])
        start += width
    draws = AugDraws(*fields)
    return draws._replace(jitter_order=sorted(range(4), key=draws.jitter_order.__getitem__))  # = argsort


# ----------------------------------------------------------------------------------------- settings


class AugParams(NamedTuple):
    """Each row's view settings (hnmix.data.augment.settings.ViewAugment) as tensors."""

    crop_scale: torch.Tensor  # (n, 2) lo, hi share of the image's area
    crop_log_ratio: torch.Tensor  # (n, 2) lo, hi of log(width / height)
    jitter_lo: torch.Tensor  # (n, 4) lowest brightness, contrast, saturation factor and hue shift
    jitter_hi: torch.Tensor  # (n, 4) highest
    jitter_p: torch.Tensor  # (n,)
    grayscale_p: torch.Tensor
    blur_p: torch.Tensor
    blur_sigma: torch.Tensor  # (n, 2)
    solarize_p: torch.Tensor
    flip_p: torch.Tensor
    blur_reach: int  # farthest pixel any row's blur reads, in pixels: a static conv size, known without a sync

    def take(self, rows: torch.Tensor | slice) -> AugParams:
        return AugParams(*(field[rows] for field in self[:-1]), self.blur_reach)


def view_columns(v: ViewAugment) -> dict[str, list[float]]:
    """One view's settings as AugParams' tensor fields (in their order), each a list of its columns."""
    strengths = (v.brightness, v.contrast, v.saturation)
    return {"crop_scale": list(v.crop_scale), "crop_log_ratio": [math.log(r) for r in v.crop_ratio],
            "jitter_lo": [*(max(0.0, 1 - b) for b in strengths), -v.hue],
            "jitter_hi": [*(1 + b for b in strengths), v.hue], "jitter_p": [v.jitter_p],
            "grayscale_p": [v.grayscale_p], "blur_p": [v.blur_p], "blur_sigma": list(v.blur_sigma),
            "solarize_p": [v.solarize_p], "flip_p": [v.flip_p]}


PARAM_WIDTHS = {name: len(columns) for name, columns in view_columns(ViewAugment()).items()}
assert tuple(PARAM_WIDTHS) == AugParams._fields[:-1]


def view_table(views: Sequence[ViewAugment]) -> torch.Tensor:
    """(len(views), sum(PARAM_WIDTHS)) float64: each view's settings as one row of AugParams' columns."""
    return torch.tensor([[x for columns in view_columns(v).values() for x in columns] for v in views],
                        dtype=torch.float64)


def rows_params(table: torch.Tensor, view_of_row: torch.Tensor, reach: int) -> AugParams:
    """AugParams for rows of the views view_of_row (indices into view_table's rows), on table's device."""
    parts = table[view_of_row].split(list(PARAM_WIDTHS.values()), dim=1)
    return AugParams(*(part if width > 1 else part[:, 0]
                       for part, width in zip(parts, PARAM_WIDTHS.values(), strict=True)), reach)
