"""What every hard-negative method shares: its output (Negatives), and how it plugs in (Method).

A method is one file: pure functions `(q, queue, l_neg, ...) -> logits or mask`, a settings model (its
options, their flags and checks), a `strategy(settings) -> Strategy` and a `Method` record naming them;
hnmix.negatives lists the records. The MoCo step (hnmix.models.moco) calls the strategy once per query pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from hnmix.core.settings import Settings


class Negatives(NamedTuple):
    extra: torch.Tensor | None = None  # (B, S) synthetic logits before temperature, per query
    keep: torch.Tensor | None = None  # (B, K) bool: queue negatives that stay in the loss


class Strategy(Protocol):
    def __call__(self, q: torch.Tensor, queue: torch.Tensor, l_neg: torch.Tensor, *, generator: torch.Generator,
                 epoch: float) -> Negatives:
        """q (B, D) unit fp32 queries, queue (K, D) unit keys, l_neg = q @ queue.T (B, K) with the label
        oracle's same-class entries at -inf; generator: this rank's draws for this step; epoch: fractional
        (step / steps per epoch). Must not wait for the device (no .item(), no tensors from Python data)."""


class MethodSettings(Settings):
    """A method's options, nested in the pretraining settings under the method's name."""

    def describe(self) -> str:
        """One line for the run's header."""
        return ", ".join(f"{k}={v}" for k, v in self.model_dump().items())

    def check(self, queue_size: int) -> None:
        """Checks against the rest of the run (raise ValueError with the flags to change)."""

    @property
    def synthesises(self) -> bool:
        """Whether the method adds synthetic negatives (analysis then reports their false-negative rate)."""
        return False


def check_hardest(method: str, flag: str, n_hard: int, synthesises: bool, queue_size: int) -> None:
    """For methods that build points from each query's N hardest queue entries: 2 <= N <= K."""
    if synthesises and n_hard < 2:
        raise ValueError(f"synthetic negatives ({method}) need N >= 2, got N={n_hard}")
    if n_hard > queue_size:
        raise ValueError(f"{flag} {n_hard} hardest negatives cannot exceed the queue size --queue-size {queue_size}")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str  # for --help: what the method does, in a few words
    title: str  # the help panel of its options, e.g. "MoCHi (--method mochi)"
    settings: type[MethodSettings]
    strategy: Callable[[MethodSettings], Strategy]
