"""--pipeline pil: DataLoader workers decode and augment each image with PIL (hnmix.data.augment.pil); the
device only normalises. Works for any images on any device.

Each image is decoded once for its two views, its draws from a generator seeded by (seed, epoch, index):
the caller's RNG is neither used nor changed, and a view depends on neither the worker count nor resuming.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from hnmix.data.augment.pil import PilAugment, hue_tables
from hnmix.data.augment.settings import AugmentSettings
from hnmix.data.normalize import Normalize
from hnmix.data.order import RunBatches, sample_seed
from hnmix.data.pipelines.base import Batch, Pipeline, Setup, fill_batch
from hnmix.errors import CorruptImageError

Sample = tuple[torch.Tensor, torch.Tensor, int, int]  # view_q uint8, view_k uint8, label, files skipped


class TwoViews(Dataset):
    """Item (index, epoch) -> (view_q uint8, view_k uint8, label, unreadable files skipped); a DataLoader
    fetches a whole batch at once (`__getitems__`), so an unreadable file's replacement is never an image of
    the batch (hnmix.data.pipelines.base.fill_batch)."""

    def __init__(self, images, size: int, seed: int, skip_corrupt: bool = False,
                 augment: AugmentSettings | None = None):
        self.images, self.seed, self.skip_corrupt = images, seed, skip_corrupt
        self.augment = PilAugment(augment, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Sample]:
        def load(slot: int, i: int):
            index, epoch = keys[slot]
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))  # the slot's draws
            try:
                with self._open(i) as img:
                    return self.augment(img, generator), None
            except CorruptImageError as e:
                return None, str(e)

        views, used, skipped = fill_batch([index for index, _ in keys], len(self.images), load, self.skip_corrupt,
                                          self.images.describe)
        return [(q, k, self.images.labels[i], s) for (q, k), i, s in zip(views, used, skipped, strict=True)]

    def _open(self, i: int):
        """Undecoded when the source can (files: the pipeline decodes, maybe reduced), else decoded."""
        return self.images.open(i) if hasattr(self.images, "open") else self.images.load(i)


class PilBatches:
    """TwoViews in DataLoader workers, normalised on the device."""

    def __init__(self, dataset: TwoViews, device: torch.device, workers: int, channels_last: bool,
                 worker_init_fn: Callable[[int], None] | None = None):
        self.dataset, self.device, self.worker_init_fn = dataset, device, worker_init_fn
        self.workers = min(workers, os.cpu_count() or 1)
        self.normalize = Normalize(channels_last=channels_last).to(device)

    def __call__(self, sampler: RunBatches) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                            worker_init_fn=self.worker_init_fn, prefetch_factor=4 if self.workers else None)
        for im_q, im_k, labels, skipped in loader:
            yield Batch(self.normalize(im_q.to(self.device, non_blocking=True)),
                        self.normalize(im_k.to(self.device, non_blocking=True)),
                        labels.to(self.device, non_blocking=True), skipped)


def open_pil(images, setup: Setup) -> tuple[PilBatches, str]:
    dataset = TwoViews(images, setup.image_size, setup.seed, setup.skip_corrupt, augment=setup.augment)
    if any(view.hue > 0 and view.jitter_p > 0 for view in dataset.augment.views):
        hue_tables()  # opened here, before the workers fork, so that they share it
    source = PilBatches(dataset, setup.device, setup.workers, setup.channels_last, setup.worker_init_fn)
    return source, f"{source.workers} DataLoader workers, PIL augmentations"


PIPELINE = Pipeline("pil", open_pil)
