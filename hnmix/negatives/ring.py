"""Ring: conditional negative sampling (Wu et al., ICLR 2021).

Per query, rank the queue negatives by similarity. Keep the ring of ranks [n_inner, n_outer): the top
`outer` share of the queue minus its closest `inner` share (likely false negatives); the easy remainder is
dropped. The loss then ignores dropped negatives exactly (masked log-sum-exp). `outer` can anneal from 1.0
(every negative: start easy) down to its final value.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from hnmix.core.settings import setting
from hnmix.negatives.base import Method, MethodSettings, Negatives, Strategy


def ring_bounds(num_negatives: int, outer: float, inner: float) -> tuple[int, int]:
    """(n_inner, n_outer) with at least one kept negative."""
    n_outer = min(num_negatives, max(1, math.ceil(outer * num_negatives)))
    n_inner = min(int(inner * n_outer), n_outer - 1)
    return n_inner, n_outer


def ring_mask(l_neg: torch.Tensor, *, outer: float, inner: float) -> torch.Tensor:
    """(B, K) bool, True = kept: similarity rank within [inner * n_outer, n_outer), n_outer = outer * K."""
    n_inner, n_outer = ring_bounds(l_neg.shape[1], outer, inner)
    ranked = l_neg.detach().topk(n_outer, dim=1).indices  # hardest first
    keep = torch.zeros_like(l_neg, dtype=torch.bool)
    return keep.scatter_(1, ranked[:, n_inner:], True)


def annealed_outer(final: float, schedule: str, epoch: float, anneal_epochs: int) -> float:
    """The outer share at a (fractional) epoch: 1.0 -> final over anneal_epochs."""
    if schedule == "none" or anneal_epochs <= 0:
        return final
    t = min(epoch / anneal_epochs, 1.0)
    if schedule == "linear":
        return 1.0 + (final - 1.0) * t
    if schedule == "step":
        return final if t >= 1.0 else 1.0
    if schedule == "exp":
        return final**t
    raise ValueError(f"unknown ring anneal schedule '{schedule}'")


class RingSettings(MethodSettings):
    outer: float = setting(0.1, "share of the queue (hardest first) in the ring", gt=0, le=1)
    inner: float = setting(0.1, "share of the ring's hardest dropped as likely false negatives", ge=0, lt=1)
    anneal: Literal["none", "linear", "step", "exp"] = setting(
        "linear", "how the outer share shrinks from 1.0 to --ring-outer")
    anneal_epochs: int = setting(100, "epochs over which the outer share anneals", ge=0)

    def describe(self) -> str:
        return f"outer {self.outer}, inner {self.inner}, anneal {self.anneal} over {self.anneal_epochs} epochs"


def strategy(settings: RingSettings) -> Strategy:
    def hard_negatives(q, queue, l_neg, *, generator, epoch) -> Negatives:
        outer = annealed_outer(settings.outer, settings.anneal, epoch, settings.anneal_epochs)
        return Negatives(keep=ring_mask(l_neg, outer=outer, inner=settings.inner))

    return hard_negatives


METHOD = Method("ring", "keep a ring of hard-but-not-too-hard negatives", "Ring (--method ring)", RingSettings,
                strategy)
