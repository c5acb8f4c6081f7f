"""SynCo: six kinds of synthetic hard negatives (Giakoumoglou & Stathaki, 2024).

Per query, each synthetic point starts from hard negatives n drawn with replacement from the query's N
hardest queue entries (independently per query); q is the detached query. In this order:
  1 interpolation   a q + (1 - a) n,      a ~ U(0, 0.5)
  2 extrapolation   q + b (n - q),        b ~ U(1, 1.5)
  3 mixup           g n1 + (1 - g) n2,    g ~ U(0, 1)
  4 noise           n + sigma eps,        eps ~ N(0, I)
  5 gradient        n + delta grad_n(q.n) = n + delta q
  6 adversarial     n + eta sign(grad_n(q.n)) = n + eta sign(q)
Every point is L2-normalised and detached. Unlike the public SynCo code, queue rows are unit vectors from
the start and types 4/5 are not swapped.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from pydantic import field_validator

from hnmix.core.settings import setting
from hnmix.negatives.base import Method, MethodSettings, Negatives, Strategy, check_hardest

SYNCO_TYPES = ("interpolation", "extrapolation", "mixup", "noise", "gradient", "adversarial")


class SyncoDraws(NamedTuple):
    picks: list[torch.Tensor]  # per type, (B, n_t) positions in the query's top-N list
    picks2: torch.Tensor  # (B, n_3) second negative of each mixup
    interp: torch.Tensor  # (B, n_1) a ~ U(0, 0.5)
    extrap: torch.Tensor  # (B, n_2) b ~ U(1, 1.5)
    mix: torch.Tensor  # (B, n_3) g ~ U(0, 1)
    noise: torch.Tensor  # (B, n_4, D) eps ~ N(0, I)


def draw_synco(batch: int, dim: int, n_hard: int, counts, *, generator=None, device=None) -> SyncoDraws:
    kw = dict(generator=generator, device=device)
    picks = [torch.randint(n_hard, (batch, c), **kw) for c in counts]
    picks2 = torch.randint(n_hard, (batch, counts[2]), **kw)
    interp = torch.rand((batch, counts[0]), **kw) * 0.5
    extrap = 1 + torch.rand((batch, counts[1]), **kw) * 0.5
    mix = torch.rand((batch, counts[2]), **kw)
    noise = torch.randn((batch, counts[3], dim), **kw)
    return SyncoDraws(picks, picks2, interp, extrap, mix, noise)


def synco_from_draws(q, queue, l_neg, draws: SyncoDraws, *, n_hard: int, sigma: float, delta: float,
                     eta: float) -> torch.Tensor:
    """(B, sum(counts)) logits before temperature, types in the order of the module docstring."""
    hard = l_neg.detach().topk(n_hard, dim=1).indices
    with torch.no_grad():
        qd = q.detach().to(queue.dtype).unsqueeze(1)  # (B, 1, D)

        def negatives(pos):
            return queue[hard.gather(1, pos)]  # (B, n, D)

        a, b, g = (x.unsqueeze(-1).to(queue.dtype) for x in (draws.interp, draws.extrap, draws.mix))
        points = [
            a * qd + (1 - a) * negatives(draws.picks[0]),
            qd + b * (negatives(draws.picks[1]) - qd),
            g * negatives(draws.picks[2]) + (1 - g) * negatives(draws.picks2),
            negatives(draws.picks[3]) + sigma * draws.noise.to(queue.dtype),
            negatives(draws.picks[4]) + delta * qd,
            negatives(draws.picks[5]) + eta * torch.sign(qd),
        ]
        points = F.normalize(torch.cat(points, dim=1), dim=-1).to(q.dtype)
        # a query that sees fewer than N entries (label oracle) gets masked ones in its top-N: a point built
        # from one is -inf, out of the loss, as in MoCHi
        visible = torch.isfinite(l_neg.detach().gather(1, hard))
        usable = [visible.gather(1, pick) for pick in draws.picks]
        usable[2] = usable[2] & visible.gather(1, draws.picks2)
        usable = torch.cat(usable, dim=1)
    return torch.einsum("bd,bsd->bs", q, points).masked_fill(~usable, float("-inf"))


def synco(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, *, n_hard: int, counts, sigma: float,
          delta: float, eta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """SynCo synthetic logits (B, sum(counts)) for unit queries q (B, D), unit queue rows (K, D), l_neg = q @ queue.T."""
    counts = list(counts)
    if len(counts) != 6 or min(counts) < 0:
        raise ValueError(f"counts must be six non-negative integers, got {counts}")
    draws = draw_synco(q.shape[0], q.shape[1], n_hard, counts, generator=generator, device=q.device)
    return synco_from_draws(q, queue, l_neg, draws, n_hard=n_hard, sigma=sigma, delta=delta, eta=eta)


class SyncoSettings(MethodSettings):
    n_hard: int = setting(1024, "N: the hardest queue negatives the points are built from", flags=("--N", "--synco-n"),
                          ge=1)
    counts: list[int] = setting([256, 256, 256, 64, 64, 64], "points per query of each kind: interpolation, "
                                "extrapolation, mixup, noise, gradient, adversarial (0 switches one off)",
                                metavar="N1,...,N6")
    sigma: float = setting(0.01, "noise scale of kind 4", ge=0)
    delta: float = setting(0.01, "gradient step of kind 5", ge=0)
    eta: float = setting(0.01, "adversarial step of kind 6", ge=0)
    start_epoch: int = setting(10, "first epoch (0-based) with synthetic negatives", ge=0)

    @field_validator("counts")
    @classmethod
    def _six_counts(cls, v: list[int]) -> list[int]:
        if len(v) != 6 or min(v) < 0:
            raise ValueError(f"needs six non-negative counts, got {v}")
        return v

    def describe(self) -> str:
        return (f"N={self.n_hard}, counts {self.counts}, sigma={self.sigma}, delta={self.delta}, eta={self.eta}, "
                f"from epoch {self.start_epoch}")

    def check(self, queue_size: int) -> None:
        check_hardest("synco", "--synco-n", self.n_hard, self.synthesises, queue_size)

    @property
    def synthesises(self) -> bool:
        return sum(self.counts) > 0


def strategy(settings: SyncoSettings) -> Strategy:
    def hard_negatives(q, queue, l_neg, *, generator, epoch) -> Negatives:
        if epoch < settings.start_epoch or not settings.synthesises:
            return Negatives()
        return Negatives(extra=synco(q, queue, l_neg, n_hard=settings.n_hard, counts=settings.counts,
                                     sigma=settings.sigma, delta=settings.delta, eta=settings.eta,
                                     generator=generator))

    return hard_negatives


METHOD = Method("synco", "six kinds of synthetic hard negatives", "SynCo (--method synco)", SyncoSettings, strategy)
