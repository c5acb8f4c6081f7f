"""What feeds the training step: the images, and the pipeline that turns them into normalised views on the
device, per step, in RunBatches order: device-resident data (hnmix.data.gpu_data) or DataLoader workers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from hnmix.core import dist
from hnmix.data.augment import Normalize
from hnmix.data.pretrain import RunBatches, TwoViews, open_images
from hnmix.errors import HnmixError
from hnmix.train.stop import ignore_sigint_in_worker

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # view_q, view_k, labels, skipped


class TrainingData:
    """The training images and their pipeline; `batches(sampler)` yields one Batch per step."""

    def __init__(self, cfg, info: dist.DistInfo, log: Callable[[str], None] = print):
        self.cfg, self.info = cfg, info
        self.images = open_images(cfg.data, "train")
        if cfg.oracle_labels and min(self.images.labels) < 0:
            raise HnmixError("--oracle-labels needs labelled data (an ImageFolder: one sub-folder per class)")
        self.dataset = TwoViews(self.images, cfg.image_size, cfg.seed, cfg.skip_corrupt)
        self.normalize = Normalize(channels_last=cfg.channels_last).to(info.device)
        self.device_source, self.description = self._device_source(log)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def workers(self) -> int:
        return min(self.cfg.workers, os.cpu_count() or 1)

    def _device_source(self, log):
        from hnmix.data.gpu_data import device_batches

        cfg, info = self.cfg, self.info
        source, note = device_batches(self.images, mode=cfg.data_on_gpu, device=info.device,
                                      image_size=cfg.image_size, seed=cfg.seed, channels_last=cfg.channels_last,
                                      skip_corrupt=cfg.skip_corrupt, local_rank=info.local_rank, log=log,
                                      barrier=dist.barrier)
        return source, note if source else f"{note}, {self.workers} workers"

    def loader(self, sampler: RunBatches) -> torch.utils.data.DataLoader:
        workers = self.workers
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=workers,
            pin_memory=self.info.device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=ignore_sigint_in_worker, prefetch_factor=4 if workers else None)

    def batches(self, sampler: RunBatches) -> Iterator[Batch]:
        """(view_q, view_k, labels, skipped files) per step, normalised on the device."""
        if self.device_source is not None:
            yield from self.device_source(sampler)
            return
        device = self.info.device
        for im_q, im_k, labels, skip in self.loader(sampler):
            yield (self.normalize(im_q.to(device, non_blocking=True)),
                   self.normalize(im_k.to(device, non_blocking=True)), labels.to(device, non_blocking=True), skip)
