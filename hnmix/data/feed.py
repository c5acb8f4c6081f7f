"""Feeding the pretraining step: the three batch sources behind one interface, which one suits a dataset
and device, and how fast a source feeds alone.

A batch source is a callable `source(sampler: RunBatches)` yielding per step `(view_q, view_k, labels,
skipped)`: normalised float views and labels on the device, and a CPU count of unreadable files replaced.
The three: PIL DataLoader workers (LoaderBatches, over TwoViews), device-resident data
(hnmix.data.gpu_data.DeviceBatches) and GPU JPEG decoding (hnmix.data.gpu_decode.DecodeBatches).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader

from hnmix.data.augment import Normalize
from hnmix.data.gpu_data import auto_refusal, largest_side_sample
from hnmix.data.gpu_decode import device_decode_refusal, jpeg_share
from hnmix.data.pretrain import RunBatches, TwoViews
from hnmix.errors import HnmixError

Batches = Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
MIN_JPEG_SHARE = 0.5  # auto: below this, GPU decoding would leave most decoding to its few workers


class LoaderBatches:
    """The PIL pipeline as a batch source: TwoViews in DataLoader workers (what the training loop runs
    when no device data path is chosen), normalised on the device."""

    def __init__(self, dataset: TwoViews, device: torch.device, workers: int, channels_last: bool,
                 worker_init_fn: Callable[[int], None] | None = None):
        self.dataset, self.device, self.worker_init_fn = dataset, device, worker_init_fn
        self.workers = min(workers, os.cpu_count() or 1)
        self.normalize = Normalize(channels_last=channels_last).to(device)

    def __call__(self, sampler: RunBatches) -> Batches:
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                            worker_init_fn=self.worker_init_fn, prefetch_factor=4 if self.workers else None)
        for im_q, im_k, labels, skipped in loader:
            yield (self.normalize(im_q.to(self.device, non_blocking=True)),
                   self.normalize(im_k.to(self.device, non_blocking=True)),
                   labels.to(self.device, non_blocking=True), skipped)


class Feed(NamedTuple):
    img_per_s: float  # images (each with its two views) per second after the warm-up, device-synchronised
    first_batch_s: float  # from the call to the first batch's views: worker start-up and first reads


def _sync(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)


def measure_feed(source: Callable[[RunBatches], Batches], sampler: RunBatches, steps: int, warmup: int = 2) -> Feed:
    """How fast `source` feeds alone: it is driven with no training step, `warmup` steps (at least the
    first), then `steps` timed ones; every timed block ends once the device has produced the views."""
    warmup = max(warmup, 1)
    if len(sampler) < warmup + steps:
        raise HnmixError(f"the sampler has {len(sampler)} steps, fewer than {warmup} + {steps}")
    batches = source(sampler)
    try:
        start = time.perf_counter()
        view_q = next(batches)[0]
        _sync(view_q)
        first = time.perf_counter() - start
        for _ in range(warmup - 1):
            view_q = next(batches)[0]
        _sync(view_q)
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            view_q = next(batches)[0]
            images += view_q.shape[0]
        _sync(view_q)
        return Feed(images / (time.perf_counter() - start), first)
    finally:
        batches.close()  # stops a DataLoader's workers


class Pipeline(NamedTuple):
    kind: str  # "device" (device-resident), "decode" (GPU JPEG decode) or "loader" (PIL DataLoader workers)
    reason: str  # one line for the run's header


def choose_pipeline(images, device: torch.device, sample: int = 64) -> Pipeline:
    """`auto`'s choice from a quick look (headers and bytes of `sample` files): small images live on the
    device, large JPEGs are decoded there per batch, anything else (or no CUDA) goes to PIL workers.

    "device" is provisional: gpu_data.auto_refusal on the decoded size may still refuse it (memory),
    then "decode" is next in line."""
    if device.type != "cuda":
        return Pipeline("loader", "PIL DataLoader workers: not a CUDA device")
    side = largest_side_sample(images, sample)
    too_large = auto_refusal(side, None, device)
    if too_large is None:
        return Pipeline("device", f"device-resident data: images up to {side} px")
    if not hasattr(images, "paths"):
        return Pipeline("loader", f"PIL DataLoader workers: {too_large}, and not image files")
    share = jpeg_share(images, sample)
    if share < MIN_JPEG_SHARE:
        return Pipeline("loader", f"PIL DataLoader workers: {too_large}, and only {share:.0%} of sampled files "
                                  "are baseline colour JPEGs")
    if why := device_decode_refusal(device):
        return Pipeline("loader", f"PIL DataLoader workers: {too_large}, and no JPEG decoding on {device} ({why})")
    return Pipeline("decode", f"GPU JPEG decoding: {too_large}; {share:.0%} of sampled files decode on the "
                              "device, the rest in the workers")
