"""How fast a data pipeline feeds alone: its BatchSource driven with no training step."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from hnmix.core.device import synchronize
from hnmix.data.order import RunBatches
from hnmix.errors import HnmixError


class Feed(NamedTuple):
    img_per_s: float  # images (each with its two views) per second after the warm-up, device-synchronised
    first_batch_s: float  # from the call to the first batch's views: worker start-up and first reads


def measure_feed(source: Callable[[RunBatches], Iterator[tuple]], sampler: RunBatches, steps: int,
                 warmup: int = 2) -> Feed:
    """How fast `source` feeds alone: it is driven with no training step, `warmup` steps (at least the
    first), then `steps` timed ones; every timed block ends once the device has produced the views."""
    warmup = max(warmup, 1)
    if len(sampler) < warmup + steps:
        raise HnmixError(f"the sampler has {len(sampler)} steps, fewer than {warmup} + {steps}")
    batches = source(sampler)
    try:
        start = time.perf_counter()
        view_q = next(batches)[0]
        synchronize(view_q.device)
        first = time.perf_counter() - start
        for _ in range(warmup - 1):
            view_q = next(batches)[0]
        synchronize(view_q.device)
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            view_q = next(batches)[0]
            images += view_q.shape[0]
        synchronize(view_q.device)
        return Feed(images / (time.perf_counter() - start), first)
    finally:
        batches.close()  # stops a DataLoader's workers
