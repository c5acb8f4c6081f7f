"""What every pipeline is: a BatchSource, opened from the images and a Setup, registered by name
(hnmix.data.pipelines.PIPELINES); and the one rule for unreadable files (`fill_batch`).

A BatchSource is called with the run's RunBatches (hnmix.data.order) and yields one Batch per step:
normalised float views and labels on the device, and a CPU count of unreadable files replaced.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch

from hnmix.data.augment.settings import AugmentSettings
from hnmix.data.order import RunBatches
from hnmix.errors import CorruptImageError, HnmixError


class Batch(NamedTuple):
    view_q: torch.Tensor  # (b, 3, S, S) normalised, on the device
    view_k: torch.Tensor
    labels: torch.Tensor  # (b,) on the device: each image's own label (a replacement's, where one was used)
    skipped: torch.Tensor  # (b,) CPU int64: unreadable files passed over for that slot


class BatchSource(Protocol):
    def __call__(self, sampler: RunBatches) -> Iterator[Batch]: ...


@dataclass(frozen=True)
class Setup:
    """What a pipeline is opened with: the run's settings that concern data, and the process's place."""

    device: torch.device
    image_size: int
    seed: int
    channels_last: bool = False
    skip_corrupt: bool = False
    augment: AugmentSettings | None = None
    workers: int = 0
    worker_init_fn: Callable[[int], None] | None = None
    compile: bool = False
    auto: bool = False  # chosen by --pipeline auto: a pipeline may decline (open returns None)
    local_rank: int = 0
    log: Callable[[str], None] = print
    barrier: Callable[[], None] = lambda: None


class Pipeline(NamedTuple):
    """A registry entry: `open(images, setup)` -> (the source, or None when auto's choice does not hold after
    all; one line for the run's header)."""

    name: str
    open: Callable[[Any, Setup], tuple[BatchSource | None, str]]


# ------------------------------------------------------------------------------------- unreadable files

Loaded = tuple[Any, str | None]  # (item, None), or (None, why unreadable; None when already reported)


def fill_batch(indices: Sequence[int], n: int, load: Callable[[int, int], Loaded], skip_corrupt: bool,
               describe: Callable[[int], str] = str, first: Sequence[Loaded] | None = None,
               ) -> tuple[list[Any], list[int], list[int]]:
    """Each slot's item, an unreadable file replaced: (items, the dataset index each slot used, files skipped
    per slot). `load(slot, index)` reads file `index` for slot `slot`; `first`, when given, holds each slot's
    first attempt, already made; `describe(index)` names a file.

    The one replacement rule of every pipeline: the first readable file after the unreadable one (wrapping
    around the dataset) that is not in the batch already, nor taken by an earlier slot. It depends on the
    files and the batch alone, so an exact resume still holds; the slot's label is the replacement's own.
    Without skip_corrupt the first unreadable file stops the run, named."""
    taken = set(indices)
    items, used, skipped = [], [], []
    for slot, index in enumerate(indices):
        item, why = first[slot] if first is not None else load(slot, index)
        current, passed = index, 0
        candidates = ((index + step) % n for step in range(1, n))
        while item is None:
            if why is not None:
                if not skip_corrupt:
                    raise CorruptImageError(f"{why} (use --skip-corrupt to skip unreadable images)")
                warnings.warn(f"skipping unreadable image {describe(current)}", stacklevel=2)
            current = next((j for j in candidates if j not in taken), None)
            if current is None:
                raise HnmixError(f"no image left to replace unreadable {describe(index)}: every other one is "
                                 "unreadable or already in its batch")
            passed += 1
            item, why = load(slot, current)
        taken.add(current)
        items.append(item)
        used.append(current)
        skipped.append(passed)
    return items, used, skipped
