"""Hard-negative methods: one file each (pure functions, a settings model, a `METHOD` record).

Adding a method = one file defining `METHOD = Method(...)` + one entry below; its options then appear in
the settings (`PretrainConfig.<name>`), as flags in `hnmix pretrain --help`, and in the run's header.
"""

from __future__ import annotations

from hnmix.negatives import mochi as _mochi
from hnmix.negatives import ring as _ring
from hnmix.negatives import synco as _synco
from hnmix.negatives.base import Method, MethodSettings, Negatives, Strategy
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

MOCO = "moco"  # MoCo-v2 itself: every queue entry is a negative, nothing added
METHODS: dict[str, Method] = {m.name: m for m in (_mochi.METHOD, _synco.METHOD, _ring.METHOD)}

__all__ = ["METHODS", "MOCO", "SYNCO_TYPES", "Method", "MethodSettings", "MochiDraws", "Negatives", "Strategy",
           "annealed_outer", "draw_mochi", "draw_synco", "mochi", "mochi_from_draws", "mochi_naive",
           "mochi_naive_from_draws", "ring_mask", "synco", "synco_from_draws"]
