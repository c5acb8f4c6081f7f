"""What feeds the training step: the images, and the pipeline that turns them into normalised views on the
device, per step, in RunBatches order (hnmix.data.pipelines: one BatchSource interface for all).

- resident: the dataset decoded once (disk cache), held on the device, augmented there in batches
- decode: workers read JPEG bytes, the device decodes and augments each batch
- pil: DataLoader workers decode and augment with PIL

`auto` picks by the images and the device; the choice is printed, saved in config.yaml and checkpoints,
and a resumed run keeps it (views from another pipeline would differ from the uninterrupted run's).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from hnmix.core import dist
from hnmix.data.folder import open_images
from hnmix.data.order import RunBatches
from hnmix.data.pipelines import PIPELINES
from hnmix.data.pipelines.auto import after_resident, choose_pipeline
from hnmix.data.pipelines.base import Batch, Setup
from hnmix.errors import HnmixError
from hnmix.train.stop import ignore_sigint_in_worker


class TrainingData:
    """The training images and their pipeline; `batches(sampler)` yields one Batch per step.

    `pipeline` overrides cfg.pipeline (a resumed run passes its checkpoint's)."""

    def __init__(self, cfg, info: dist.DistInfo, log: Callable[[str], None] = print, pipeline: str | None = None):
        self.cfg, self.info, self.log = cfg, info, log
        self.images = open_images(cfg.data, "train")
        if cfg.oracle_labels and min(self.images.labels) < 0:
            raise HnmixError("--oracle-labels needs labelled data (an ImageFolder: one sub-folder per class)")
        wanted = pipeline or cfg.pipeline
        auto = wanted == "auto"
        self.pipeline, reason = choose_pipeline(self.images, info.device) if auto else (wanted, "")
        self.source, note = PIPELINES[self.pipeline].open(self.images, self.setup(auto))
        if self.source is None:  # auto's resident choice, too large once decoded: the next pipeline in line
            self.pipeline = after_resident(self.images, info.device)
            self.source, note = PIPELINES[self.pipeline].open(self.images, self.setup(auto=False))
        self.description = f"{self.pipeline}: {note}" + (f" (auto: {reason})" if auto else "")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def workers(self) -> int:
        return min(self.cfg.workers, os.cpu_count() or 1)

    def setup(self, auto: bool) -> Setup:
        cfg, info = self.cfg, self.info
        return Setup(info.device, cfg.image_size, cfg.seed, channels_last=cfg.channels_last,
                     skip_corrupt=cfg.skip_corrupt, augment=cfg.augment, workers=self.workers,
                     worker_init_fn=ignore_sigint_in_worker, compile=cfg.compile, auto=auto,
                     local_rank=info.local_rank, log=self.log, barrier=dist.barrier)

    def batches(self, sampler: RunBatches) -> Iterator[Batch]:
        """(view_q, view_k, labels, skipped files) per step, normalised on the device."""
        return self.source(sampler)
