"""Hard-negative strategies: one file per method, each a pure function of (q, queue, l_neg, ...).

A method's `from_config(cfg)` returns a strategy `(q, queue, l_neg, *, generator, epoch) -> Negatives`:
extra synthetic logits appended for each query, and/or a mask of the queue negatives kept in its loss.
Adding a method = one file + one line in METHODS (+ its options in hnmix.config).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from hnmix.negatives import mochi as _mochi
from hnmix.negatives import ring as _ring
from hnmix.negatives import synco as _synco
from hnmix.negatives.mochi import (
    MochiDraws,
    draw_mochi,
    mochi,
    mochi_from_draws,
    mochi_naive,
    mochi_naive_from_draws,
)
from hnmix.negatives.ring import annealed_outer, ring_mask
from hnmix.negatives.synco import SYNCO_TYPES, draw_synco, synco, synco_from_draws


class Negatives(NamedTuple):
    extra: torch.Tensor | None = None  # (B, S) synthetic logits before temperature, per query
    keep: torch.Tensor | None = None  # (B, K) bool: queue negatives that stay in the loss


Strategy = Callable[..., Negatives]

METHODS: dict[str, Callable | None] = {
    "moco": None,  # MoCo-v2: every queue entry is a negative, nothing added
    "mochi": _mochi.from_config,
    "synco": _synco.from_config,
    "ring": _ring.from_config,
}


def build_strategy(cfg) -> Strategy | None:
    factory = METHODS[cfg.method]
    return factory(cfg) if factory else None


__all__ = ["METHODS", "SYNCO_TYPES", "MochiDraws", "Negatives", "Strategy", "annealed_outer", "build_strategy",
           "draw_mochi", "draw_synco", "mochi", "mochi_from_draws", "mochi_naive", "mochi_naive_from_draws",
           "ring_mask", "synco", "synco_from_draws"]
