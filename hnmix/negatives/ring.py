"""Ring: conditional negative sampling (Wu et al., ICLR 2021).

Per query, rank the queue negatives by similarity. Keep the ring of ranks [n_inner, n_outer): the top
`outer` share of the queue minus its closest `inner` share (likely false negatives); the easy remainder is
dropped. The loss then ignores dropped negatives exactly (masked log-sum-exp). `outer` can anneal from 1.0
(every negative: start easy) down to its final value.
"""

from __future__ import annotations

import math

import torch


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


def from_config(cfg):
    def strategy(q, queue, l_neg, *, generator, epoch):
        from hnmix.negatives import Negatives

        outer = annealed_outer(cfg.ring_outer, cfg.ring_anneal, epoch, cfg.ring_anneal_epochs)
        return Negatives(keep=ring_mask(l_neg, outer=outer, inner=cfg.ring_inner))

    return strategy
