"""The kNN monitor as a training hook: kNN accuracy of the query backbone every --knn-every epochs, logged to
metrics.jsonl, without touching the run's random streams or BN statistics."""

from __future__ import annotations

import torch

from hnmix.core import dist
from hnmix.data.normalize import Normalize
from hnmix.eval.knn import KnnMonitor, print_knn
from hnmix.train.hooks import Hook, Moment


class KnnMonitorHook(Hook):
    def __init__(self, cfg):
        self.every = cfg.knn_every
        # opened now, so a missing val/ split fails before training starts
        self.monitor = KnnMonitor(cfg.knn_data or cfg.data, cfg.image_size, cfg.batch_size, cfg.workers,
                                  cfg.eval_transform)

    def header_rows(self) -> list[tuple[str, str]]:
        return [("kNN monitor", self.monitor.describe(self.every))]

    def start(self, trainer) -> None:
        self.monitor.batch_size = max(trainer.local_batch, 256)  # no gradients: larger batches, fewer launches
        self.normalize = Normalize(channels_last=trainer.cfg.channels_last).to(trainer.info.device)
        if trainer.cfg.pipeline == "resident" and self._hold_on(trainer):
            trainer.console.print("kNN monitor: both splits held on the device (as the training data)")

    def _hold_on(self, trainer) -> bool:
        """Local rank 0 decodes (and caches) the splits, the other ranks then read its cache."""
        info = trainer.info
        if info.local_rank == 0:
            held = self.monitor.hold_on(info.device, trainer.console.print)
            dist.barrier()
            return held
        dist.barrier()
        return self.monitor.hold_on(info.device, trainer.console.print, build=False)

    def after_step(self, trainer, out, moment: Moment) -> dict | None:
        if not moment.epoch_end or moment.epoch % self.every:
            return None
        with torch.random.fork_rng(devices=[]):  # the loader's seed draw must not shift the run's RNG stream
            result = self.monitor(trainer.model.encoder_q.backbone, self.normalize, trainer.info.device,
                                  trainer.dtype)
        print_knn(trainer.console, moment.epoch, result)
        return result


def knn_monitor_hooks(cfg) -> list[Hook]:
    return [KnnMonitorHook(cfg)] if cfg.knn_every else []
