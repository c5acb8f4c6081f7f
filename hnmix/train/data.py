"""What feeds the training step: the images, and the pipeline that turns them into normalised views on the
device, per step, in RunBatches order (hnmix.data.feed: one interface for the three).

- resident: the dataset decoded once (disk cache), held on the device, augmented there in batches
- decode: workers read JPEG bytes, the device decodes and augments each batch
- pil: DataLoader workers decode and augment with PIL

`auto` picks by the images and the device; the choice is printed, saved in config.yaml and checkpoints,
and a resumed run keeps it (views from another pipeline would differ from the uninterrupted run's).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import torch

from hnmix.core import dist
from hnmix.data.augment import hue_tables
from hnmix.data.feed import LoaderBatches, choose_pipeline
from hnmix.data.gpu_data import device_batches
from hnmix.data.gpu_decode import WORKERS as DECODE_WORKERS
from hnmix.data.gpu_decode import DecodeBatches, device_decode_refusal
from hnmix.data.pretrain import RunBatches, TwoViews, open_images
from hnmix.errors import HnmixError
from hnmix.train.stop import ignore_sigint_in_worker

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # view_q, view_k, labels, skipped
KINDS = {"device": "resident", "loader": "pil", "decode": "decode"}  # hnmix.data.feed's names -> the setting's


class TrainingData:
    """The training images and their pipeline; `batches(sampler)` yields one Batch per step.

    `pipeline` overrides cfg.pipeline (a resumed run passes its checkpoint's)."""

    def __init__(self, cfg, info: dist.DistInfo, log: Callable[[str], None] = print, pipeline: str | None = None):
        self.cfg, self.info, self.log = cfg, info, log
        self.images = open_images(cfg.data, "train")
        if cfg.oracle_labels and min(self.images.labels) < 0:
            raise HnmixError("--oracle-labels needs labelled data (an ImageFolder: one sub-folder per class)")
        self.dataset = TwoViews(self.images, cfg.image_size, cfg.seed, cfg.skip_corrupt, augment=cfg.augment)
        wanted = pipeline or cfg.pipeline
        self.pipeline, reason = self._resolve(wanted)
        self.source, note = self._open(self.pipeline, auto=wanted == "auto")
        self.description = f"{self.pipeline}: {note}" + (f" (auto: {reason})" if wanted == "auto" else "")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def workers(self) -> int:
        return min(self.cfg.workers, os.cpu_count() or 1)

    def _resolve(self, wanted: str) -> tuple[str, str]:
        if wanted != "auto":
            return wanted, ""
        choice = choose_pipeline(self.images, self.info.device)
        return KINDS[choice.kind], choice.reason

    def _open(self, kind: str, auto: bool):
        cfg, info = self.cfg, self.info
        if kind == "resident":
            source, note = device_batches(self.images, mode="auto" if auto else "on", device=info.device,
                                          image_size=cfg.image_size, seed=cfg.seed, channels_last=cfg.channels_last,
                                          skip_corrupt=cfg.skip_corrupt, local_rank=info.local_rank, log=self.log,
                                          barrier=dist.barrier, augment=cfg.augment)
            if source is not None:
                return source, note
            # auto and too large once decoded: the next pipeline in line
            self.pipeline = "decode" if hasattr(self.images, "paths") and not device_decode_refusal(
                info.device) else "pil"
            return self._open(self.pipeline, auto=False)
        if kind == "decode":
            if not hasattr(self.images, "paths"):
                raise HnmixError("--pipeline decode reads image files; the built-in demo data is an array "
                                 "(use resident or pil)")
            workers = min(self.workers, DECODE_WORKERS)
            source = DecodeBatches(self.images, info.device, cfg.image_size, cfg.seed, cfg.channels_last,
                                   cfg.skip_corrupt, workers=workers, worker_init_fn=ignore_sigint_in_worker,
                                   compile_augment=cfg.compile, augment=cfg.augment)
            return source, f"{workers} workers read bytes, {info.device.type} decodes and augments each batch"
        if any(view.hue > 0 and view.jitter_p > 0 for view in cfg.augment.views()):
            hue_tables()  # opened here, before the workers fork, so that they share it
        source = LoaderBatches(self.dataset, info.device, self.workers, cfg.channels_last, ignore_sigint_in_worker)
        return source, f"{source.workers} DataLoader workers, PIL augmentations"

    def batches(self, sampler: RunBatches) -> Iterator[Batch]:
        """(view_q, view_k, labels, skipped files) per step, normalised on the device."""
        return self.source(sampler)
