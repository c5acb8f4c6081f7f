"""MoCHi: mixing of hard negatives (Kalantidis et al., NeurIPS 2020).

Per query, from its N hardest queue negatives (largest logits):
  s  points  h  = normalize(a n_i + (1 - a) n_j),  a ~ U(0, 1),   i != j
  s' points  h' = normalize(b q   + (1 - b) n_j),  b ~ U(0, 0.5)
All points are detached, so the gradient reaches q only through the logit q.h; they are negatives for
their own query only and are never enqueued.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class MochiDraws(NamedTuple):
    i: torch.Tensor  # (B, s)  positions in the query's top-N list
    j: torch.Tensor  # (B, s)  same, never equal to i
    a: torch.Tensor  # (B, s)  U(0, 1)
    j_prime: torch.Tensor  # (B, s')
    b: torch.Tensor  # (B, s') U(0, 0.5)


def draw_mochi(batch: int, n_hard: int, s: int, s_prime: int, *, generator=None, device=None) -> MochiDraws:
    """All random draws of one MoCHi call, in a fixed order (tests replay them)."""
    kw = dict(generator=generator, device=device)
    i = torch.randint(n_hard, (batch, s), **kw)
    j = torch.randint(max(n_hard - 1, 1), (batch, s), **kw)
    j = j + (j >= i).long()  # uniform over the N - 1 positions other than i
    a = torch.rand((batch, s), **kw)
    j_prime = torch.randint(n_hard, (batch, s_prime), **kw)
    b = torch.rand((batch, s_prime), **kw) * 0.5
    return MochiDraws(i, j, a, j_prime, b)


def mochi_from_draws(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, draws: MochiDraws,
                     n_hard: int) -> torch.Tensor:
    """(B, s + s') logits before temperature: the s negative mixes first, then the s' query mixes."""
    hard = l_neg.detach().topk(n_hard, dim=1).indices  # (B, N) queue rows, hardest first
    with torch.no_grad():
        n_i = queue[hard.gather(1, draws.i)]  # (B, s, D)
        n_j = queue[hard.gather(1, draws.j)]
        a = draws.a.unsqueeze(-1).to(queue.dtype)
        mixed = F.normalize(a * n_i + (1 - a) * n_j, dim=-1)
        b = draws.b.unsqueeze(-1).to(queue.dtype)
        n_jp = queue[hard.gather(1, draws.j_prime)]
        query_mixed = F.normalize(b * q.detach().unsqueeze(1).to(queue.dtype) + (1 - b) * n_jp, dim=-1)
        points = torch.cat([mixed, query_mixed], dim=1).to(q.dtype)  # (B, s + s', D)
    return torch.einsum("bd,bsd->bs", q, points)


def mochi(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, *, n_hard: int, s: int, s_prime: int,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """MoCHi synthetic logits (B, s + s') for unit queries q (B, D), unit queue rows (K, D), l_neg = q @ queue.T."""
    draws = draw_mochi(q.shape[0], n_hard, s, s_prime, generator=generator, device=q.device)
    return mochi_from_draws(q, queue, l_neg, draws, n_hard)


def from_config(cfg):
    def strategy(q, queue, l_neg, *, generator, epoch):
        from hnmix.negatives import Negatives

        if epoch < cfg.mochi_start_epoch or not (cfg.s or cfg.s_prime):
            return Negatives()
        return Negatives(extra=mochi(q, queue, l_neg, n_hard=cfg.n_hard, s=cfg.s, s_prime=cfg.s_prime,
                                     generator=generator))

    return strategy
