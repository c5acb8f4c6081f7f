"""MoCHi: mixing of hard negatives (Kalantidis et al., NeurIPS 2020).

Per query, from its N hardest queue negatives (largest logits):
  s  points  h  = normalize(a n_i + (1 - a) n_j),  a ~ U(0, 1),   i != j
  s' points  h' = normalize(b q   + (1 - b) n_j),  b ~ U(0, 0.5)
All points are detached, so the gradient reaches q only through the logit q.h; they are negatives for
their own query only and are never enqueued.

`mochi` computes the logits without building any point (the fused form): with l = l_neg = q @ queue.T,
  q.h  = (a l_i + (1 - a) l_j) / ||a n_i + (1 - a) n_j||,
         ||.||^2 = a^2 |n_i|^2 + (1 - a)^2 |n_j|^2 + 2 a (1 - a) n_i.n_j
  q.h' = (b q.q + (1 - b) l_j) / ||b q + (1 - b) n_j||,
         ||.||^2 = b^2 |q|^2 + (1 - b)^2 |n_j|^2 + 2 b (1 - b) l_j
The norms are constants (no gradient), l_i and l_j are read from l_neg with its graph (d l_k/dq = n_k),
and q.q is written q.(q detached), so d(q.h)/dq = h and d(q.h')/dq = h' exactly as in the naive form.
Only the pairwise dots n_i.n_j need queue rows; they are taken in chunks of a fixed number of elements,
so the extra memory is bounded whatever B, s and D. `mochi_naive` builds the (B, s + s', D) points.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hnmix.core.settings import setting
from hnmix.negatives.base import Method, MethodSettings, Negatives, Strategy, check_hardest

# elements of one gathered (B, chunk, D) block of queue rows in the pairwise dots: 64 MB in fp32, few
# enough chunks at MoCHi's sizes that kernel launches stay negligible
PAIR_CHUNK_ELEMENTS = 1 << 24


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


def mochi_naive_from_draws(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, draws: MochiDraws,
                           n_hard: int) -> torch.Tensor:
    """The reference form: builds the (B, s + s', D) points, then q.h. Same output as `mochi_from_draws`."""
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


def pair_dots(queue: torch.Tensor, rows_a: torch.Tensor, rows_b: torch.Tensor,
              chunk_elements: int = PAIR_CHUNK_ELEMENTS) -> torch.Tensor:
    """(B, s) dots queue[rows_a] . queue[rows_b], gathering at most chunk_elements rows' worth at a time."""
    batch, s = rows_a.shape
    step = max(1, chunk_elements // max(1, batch * queue.shape[1]))
    out = torch.empty(batch, s, dtype=queue.dtype, device=queue.device)
    for lo in range(0, s, step):
        hi = min(lo + step, s)
        out[:, lo:hi] = torch.einsum("bcd,bcd->bc", queue[rows_a[:, lo:hi]], queue[rows_b[:, lo:hi]])
    return out


def _logits_to_q(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor) -> torch.Tensor:
    """l_neg whose graph reaches q and nothing else. MoCo passes q @ queue.T of a buffer, which is that; a
    detached l_neg, or a queue that wants gradient, is recomputed (masked -inf entries kept)."""
    if not q.requires_grad or (l_neg.requires_grad and not queue.requires_grad):
        return l_neg
    fresh = (q @ queue.detach().T).to(l_neg.dtype)
    return torch.where(torch.isfinite(l_neg), fresh, l_neg.detach())


def mochi_from_draws(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, draws: MochiDraws,
                     n_hard: int, *, chunk_elements: int = PAIR_CHUNK_ELEMENTS) -> torch.Tensor:
    """(B, s + s') logits before temperature, the s negative mixes first, then the s' query mixes; fused.

    l_neg must be q @ queue.T (masked entries -inf, as the label oracle passes it). A mix that uses a
    masked entry (only possible when a query sees fewer than N) gets logit -inf: it leaves the loss.
    """
    hard = l_neg.detach().topk(n_hard, dim=1).indices  # (B, N) queue rows, hardest first
    rows_i, rows_j, rows_jp = hard.gather(1, draws.i), hard.gather(1, draws.j), hard.gather(1, draws.j_prime)
    logits = _logits_to_q(q, queue, l_neg)
    dtype = logits.dtype
    with torch.no_grad():
        row_sq = (queue * queue).sum(1)  # |n|^2, 1 for unit rows up to rounding
        a = draws.a.to(dtype)
        dots = pair_dots(queue, rows_i, rows_j, chunk_elements).to(dtype)
        norm = (a * a * row_sq[rows_i] + (1 - a) ** 2 * row_sq[rows_j] + 2 * a * (1 - a) * dots)
        norm = norm.clamp_min(1e-24).sqrt()
        b = draws.b.to(dtype)
        q_sq = (q.detach() * q.detach()).sum(1, keepdim=True).to(dtype)
        l_jp_value = l_neg.detach().gather(1, rows_jp).to(dtype)
        norm_p = (b * b * q_sq + (1 - b) ** 2 * row_sq[rows_jp] + 2 * b * (1 - b) * l_jp_value)
        norm_p = norm_p.clamp_min(1e-24).sqrt()
    l_i, l_j, l_jp = logits.gather(1, rows_i), logits.gather(1, rows_j), logits.gather(1, rows_jp)
    mixed = _finite_mix(a, l_i, l_j) / norm
    q_q = (q * q.detach()).sum(1, keepdim=True).to(dtype)  # value |q|^2, gradient q: the naive d(q.h')/dq
    query_mixed = _finite_mix(b, q_q.expand_as(l_jp), l_jp) / norm_p
    return torch.cat([mixed, query_mixed], dim=1).to(q.dtype)


def _finite_mix(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """w x + (1 - w) y, or -inf where x or y is -inf (masked) — without 0 * inf = nan, in value or gradient."""
    ok = torch.isfinite(x) & torch.isfinite(y)
    mix = w * x.masked_fill(~ok, 0) + (1 - w) * y.masked_fill(~ok, 0)
    return mix.masked_fill(~ok, float("-inf"))


def mochi(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, *, n_hard: int, s: int, s_prime: int,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """MoCHi synthetic logits (B, s + s') for unit queries q (B, D), unit queue rows (K, D), l_neg = q @ queue.T."""
    draws = draw_mochi(q.shape[0], n_hard, s, s_prime, generator=generator, device=q.device)
    return mochi_from_draws(q, queue, l_neg, draws, n_hard)


def mochi_naive(q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, *, n_hard: int, s: int, s_prime: int,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """`mochi` in the naive form (materialised points): the reference, and the baseline of `hnmix bench`."""
    draws = draw_mochi(q.shape[0], n_hard, s, s_prime, generator=generator, device=q.device)
    return mochi_naive_from_draws(q, queue, l_neg, draws, n_hard)


class MochiSettings(MethodSettings):
    n_hard: int = setting(1024, "N: the hardest queue negatives each query mixes", flags=("--N",), ge=1)
    s: int = setting(1024, "s: mixes of two hard negatives per query (torchrun's parser claims --s: write "
                     "--mochi-s there)", flags=("--s", "--mochi-s"), ge=0)
    s_prime: int = setting(128, "s': mixes of the query with a hard negative", flags=("--s-prime",), ge=0)
    start_epoch: int = setting(0, "first epoch (0-based) with synthetic negatives", ge=0)

    def describe(self) -> str:
        return f"N={self.n_hard}, s={self.s}, s'={self.s_prime}, from epoch {self.start_epoch}"

    def check(self, queue_size: int) -> None:
        check_hardest("mochi", "--N", self.n_hard, self.synthesises, queue_size)

    @property
    def synthesises(self) -> bool:
        return self.s + self.s_prime > 0


def strategy(settings: MochiSettings, fused: bool = True) -> Strategy:
    synthesise = mochi if fused else mochi_naive

    def hard_negatives(q, queue, l_neg, *, generator, epoch) -> Negatives:
        if epoch < settings.start_epoch or not settings.synthesises:
            return Negatives()
        return Negatives(extra=synthesise(q, queue, l_neg, n_hard=settings.n_hard, s=settings.s,
                                          s_prime=settings.s_prime, generator=generator))

    return hard_negatives


METHOD = Method("mochi", "mix the N hardest negatives (s pairs, s' with the query)", "MoCHi (--method mochi)",
                MochiSettings, strategy)
