"""The Trainer: the model, its optimiser and the MoCo step at the run's step count; reads and writes no files.

What a step draws is a function of (seed, step): the key shuffle's seed is shared by the ranks, the synthetic
negatives' is the rank's own, so a resumed run (or another world size) repeats the same step.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from hnmix.core import dist
from hnmix.core.device import autocast_dtype, enable_fast_kernels
from hnmix.data.order import sample_seed
from hnmix.errors import HnmixError
from hnmix.models.moco import MocoOutput, MocoStep
from hnmix.negatives.base import Strategy
from hnmix.train.build import batch_norm_for, build_model, build_strategy
from hnmix.train.checkpoint import make_checkpoint, set_rng_state


def effective_lr(cfg) -> float:
    return cfg.lr * cfg.batch_size / 256


def lr_at(cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Cosine over the run's steps (MoCo-v2's cosine, per step), or x0.1 at each --schedule epoch."""
    if cfg.cos:
        return effective_lr(cfg) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    epoch = step // steps_per_epoch
    return effective_lr(cfg) * 0.1 ** sum(epoch >= m for m in cfg.schedule)


class Trainer:
    """The model, its optimiser and one optimisation step; reads and writes no files (the console hears
    build warnings and the resume)."""

    def __init__(self, cfg, info: dist.DistInfo, steps_per_epoch: int, console: Console | None = None,
                 strategy: Strategy | None = None):
        self.cfg, self.info, self.steps_per_epoch = cfg, info, steps_per_epoch
        self.console = console or Console(quiet=not info.is_main)
        if cfg.batch_size % info.world:
            raise HnmixError(f"global batch {cfg.batch_size} is not divisible by {info.world} ranks")
        self.local_batch = cfg.batch_size // info.world
        self.bn = batch_norm_for(cfg, info.world, self.local_batch, info.device)
        self.dtype = autocast_dtype(cfg.precision, info.device)
        enable_fast_kernels(info.device)
        torch.manual_seed(cfg.seed)  # identical initial weights and queue on every rank and every run
        self.model = build_model(cfg, self.bn, info.world, self.console.print).to(info.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.encoder_q.parameters(), lr=effective_lr(cfg),
                                         momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        self.moco_step = MocoStep(self.model, self.optimizer, self.scaler, strategy=strategy or build_strategy(cfg),
                                  oracle=cfg.oracle_labels, dtype=self.dtype, device=info.device,
                                  cudagraphs=cfg.compile and "reduce-overhead" in cfg.compile_mode)
        self.step = 0
        self.last_good: Path | None = None

    def load(self, ckpt: dict, path: Path) -> None:
        """The checkpoint's state (the run directory has checked its settings: hnmix.train.run_dir)."""
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step, self.last_good = int(ckpt["step"]), path
        self.console.print(f"resumed from {path} at step {self.step} (epoch {ckpt['epoch']})")

    def checkpoint(self) -> dict:
        return make_checkpoint(model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                               epoch=self.step // self.steps_per_epoch, step=self.step,
                               config=self.cfg.model_dump(mode="json"))

    def prepare_steps(self) -> None:
        """Compile (in place, so state-dict keys and the momentum update see the same modules) and wrap in DDP."""
        if self.cfg.compile:
            self.model.encoder_q.compile(mode=self.cfg.compile_mode)
            self.model.encoder_k.compile(mode=self.cfg.compile_mode)
        if self.info.world > 1:
            self.moco_step.net = self._wrap_ddp()

    def _wrap_ddp(self) -> DistributedDataParallel:
        """DDP over the whole MoCo module; buffers are not broadcast: every rank updates the same queue from
        the all-gathered keys, and broadcasting K x D floats each step would cost more than the step."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DistributedDataParallel(
                self.model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None,
                broadcast_buffers=False)

    def train_step(self, im_q: torch.Tensor, im_k: torch.Tensor, labels: torch.Tensor, total: int,
                   spe: int) -> tuple[MocoOutput, float]:
        """The MoCo step at this step's lr and seeds, on normalised device views; returns (its output, lr)."""
        seed, step = self.cfg.seed, self.step
        lr = lr_at(self.cfg, step, total, spe)
        out = self.moco_step(im_q, im_k, labels, lr=lr, epoch=step / spe, shared_seed=sample_seed(seed, step, -2),
                             rank_seed=sample_seed(seed, step, -3 - self.info.rank))
        self.step += 1
        return out, lr
