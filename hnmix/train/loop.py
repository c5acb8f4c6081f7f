"""The pretraining loop: data -> MoCo step -> hooks (metrics, monitors, checkpoints), one process or DDP.

`pretrain(cfg, hooks)` is the whole run: set up the process group, open the run directory and the data,
build the Trainer (model, optimiser, one step; no I/O), resume it, then step through RunBatches.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from hnmix.core import dist
from hnmix.core.device import autocast, autocast_dtype, enable_fast_kernels
from hnmix.core.io import atomic_save
from hnmix.data.pretrain import RunBatches, sample_seed
from hnmix.errors import CorruptImageError, HnmixError
from hnmix.models.backbone import check_image_size, convert_split_bn, count_batchnorms, create_backbone
from hnmix.models.moco import MoCo
from hnmix.negatives import METHODS
from hnmix.train.checkpoint import load_checkpoint, make_checkpoint, set_rng_state
from hnmix.train.data import TrainingData
from hnmix.train.hooks import CheckpointHook, Hook, MetricsHook, Moment
from hnmix.train.run_dir import RunDirectory
from hnmix.train.stop import StopRequest

# settings a resumed run must share with its checkpoint: they shape the model or the data order
RESUME_FIXED = ("arch", "cifar_stem", "dim", "mlp", "queue_size", "batch_size", "data", "seed", "image_size",
                "augment")


def effective_lr(cfg) -> float:
    return cfg.lr * cfg.batch_size / 256


def lr_at(cfg, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Cosine over the run's steps (MoCo-v2's cosine, per step), or x0.1 at each --schedule epoch."""
    if cfg.cos:
        return effective_lr(cfg) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    epoch = step // steps_per_epoch
    return effective_lr(cfg) * 0.1 ** sum(epoch >= m for m in cfg.schedule)


def resolve_bn(cfg, world: int, local_batch: int) -> tuple[str, int]:
    """(mode, splits): auto = shuffle BN across ranks, or on one process its split-BN emulation with
    sub-batches of at least 32 (MoCo's 256 images over 8 GPUs) and at most 8 of them."""
    mode = cfg.bn
    if mode == "auto":
        groups = [g for g in range(1, 9) if local_batch % g == 0 and local_batch // g >= 32] or [1]
        mode = "shuffle" if world > 1 else f"split:{max(groups)}"
    splits = int(mode[6:]) if mode.startswith("split:") else 1
    if local_batch % splits or (splits > 1 and local_batch // splits < 2):
        raise HnmixError(f"per-rank batch {local_batch} does not split into {splits} BN groups of 2 or more "
                         f"(--bn {mode})")
    return mode, splits


def build_model(cfg, bn_mode: str, splits: int, world: int, console: Console) -> MoCo:
    backbone = create_backbone(cfg.arch, cfg.cifar_stem, zero_init_residual=cfg.zero_init_residual)
    check_image_size(backbone, cfg.arch, cfg.image_size)
    plain, other = count_batchnorms(backbone)
    if bn_mode != "plain" and plain == 0:
        console.print(f"[yellow]warning:[/] {cfg.arch} has no BatchNorm2d: --bn {bn_mode} has no effect")
    if bn_mode == "shuffle" and world == 1:
        console.print("[yellow]warning:[/] shuffle BN is a no-op in one process; --bn split:8 emulates it")
    if splits > 1:
        convert_split_bn(backbone, splits)
        if other:
            console.print(f"[yellow]warning:[/] {other} non-plain batch-norm layers are not split")
    model = MoCo(backbone, dim=cfg.dim, K=cfg.queue_size, m=cfg.momentum, T=cfg.temperature, mlp=cfg.mlp,
                 shuffle_keys=bn_mode == "shuffle" or splits > 1, symmetric=cfg.symmetric)
    if bn_mode == "sync" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_strategy(cfg):
    options = cfg.method_settings
    return None if options is None else METHODS[cfg.method].strategy(options)


class StepOutput(NamedTuple):
    loss: torch.Tensor
    stats: torch.Tensor
    skipped: int  # unreadable files replaced in this batch


class Trainer:
    """The model, its optimiser and one optimisation step; reads and writes no files."""

    def __init__(self, cfg, info: dist.DistInfo, steps_per_epoch: int, console: Console | None = None,
                 strategy=None):
        self.cfg, self.info, self.steps_per_epoch = cfg, info, steps_per_epoch
        self.console = console or Console(quiet=not info.is_main)
        if cfg.batch_size % info.world:
            raise HnmixError(f"global batch {cfg.batch_size} is not divisible by {info.world} ranks")
        self.local_batch = cfg.batch_size // info.world
        self.bn_mode, self.splits = resolve_bn(cfg, info.world, self.local_batch)
        self.dtype = autocast_dtype(cfg.precision, info.device)
        if self.bn_mode == "sync" and info.world > 1 and info.device.type != "cuda":
            raise HnmixError("--bn sync needs GPUs (SyncBatchNorm has no CPU kernel); use --bn shuffle")
        enable_fast_kernels(info.device)
        torch.manual_seed(cfg.seed)  # identical initial weights and queue on every rank and every run
        self.model = build_model(cfg, self.bn_mode, self.splits, info.world, self.console).to(info.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.encoder_q.parameters(), lr=effective_lr(cfg),
                                         momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        self.strategy = strategy or build_strategy(cfg)  # (q, queue, l_neg, ...) -> Negatives, or None
        self.step = 0
        self.last_good: Path | None = None
        self.shared_gen = torch.Generator(device=info.device)  # same draws on every rank: key shuffle
        self.rank_gen = torch.Generator(device=info.device)  # this rank's draws: synthetic negatives
        self.ddp = self.model

    def load(self, ckpt: dict, path: Path) -> None:
        saved, current = ckpt["config"], self.cfg.model_dump(mode="json")
        changed = [k for k in RESUME_FIXED if k in saved and saved[k] != current[k]]  # hnmix 0.1: no augment
        if changed:
            diffs = ", ".join(f"{k}: {saved[k]!r} -> {current[k]!r}" for k in changed)
            raise HnmixError(f"cannot resume {path}: settings differ from the checkpoint ({diffs})")
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
            self.ddp = self._wrap_ddp()

    def _wrap_ddp(self) -> DistributedDataParallel:
        """DDP over the whole MoCo module; buffers are not broadcast: every rank updates the same queue from
        the all-gathered keys, and broadcasting K x D floats each step would cost more than the step."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DistributedDataParallel(
                self.model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None,
                broadcast_buffers=False)

    def train_step(self, im_q: torch.Tensor, im_k: torch.Tensor, labels: torch.Tensor, total: int, spe: int):
        """One optimisation step on normalised device views; nothing in it waits for the device.
        Returns (MocoOutput, lr)."""
        cfg, info = self.cfg, self.info
        lr = lr_at(cfg, self.step, total, spe)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.shared_gen.manual_seed(sample_seed(cfg.seed, self.step, -2))
        self.rank_gen.manual_seed(sample_seed(cfg.seed, self.step, -3 - info.rank))
        hard = self.strategy and functools.partial(self.strategy, generator=self.rank_gen, epoch=self.step / spe)
        if self.cfg.compile and "reduce-overhead" in self.cfg.compile_mode:
            torch.compiler.cudagraph_mark_step_begin()  # the graphs' outputs of the last step are free again
        with autocast(info.device, self.dtype):
            out = self.ddp(im_q, im_k, hard_negatives=hard, labels=labels, oracle=cfg.oracle_labels,
                           shuffle_generator=self.shared_gen, enqueue=False)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.model.enqueue(*out.keys)  # after the backward, which needed the queue as the loss saw it
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return out, lr


def describe(cfg, trainer: Trainer, data: TrainingData, sampler: RunBatches, hooks: list[Hook], out: Path) -> Table:
    info = trainer.info
    t = Table(title="hnmix pretrain", show_header=False, title_justify="left")
    rows = [
        ("method", cfg.describe_method()),
        ("backbone", f"{cfg.arch}{' + CIFAR stem' if cfg.cifar_stem else ''}, head "
                     f"{'MLP' if cfg.mlp else 'linear'} -> {cfg.dim}"),
        ("data", f"{cfg.data}: {len(data)} images, {cfg.image_size} px; {data.description}"),
        ("devices", f"{info.world} x {info.device.type}, precision {trainer.dtype or 'fp32'}, BN {trainer.bn_mode}"
                    f"{f', compiled encoders ({cfg.compile_mode})' if cfg.compile else ''}"),
        ("batch", f"global {cfg.batch_size} = {info.world} x {trainer.local_batch} per rank"),
        ("lr", f"effective {effective_lr(cfg):.4g} = {cfg.lr} x {cfg.batch_size}/256, "
               f"{'cosine' if cfg.cos else f'steps at {cfg.schedule}'}, wd {cfg.wd}"),
        ("steps", f"{sampler.steps_per_epoch}/epoch, {sampler.total} in all"
                  f" ({cfg.epochs} epochs{f', capped by --max-steps {cfg.max_steps}' if cfg.max_steps else ''})"),
        ("queue", f"K={cfg.queue_size}, filled after {cfg.queue_size // cfg.batch_size // (1 + cfg.symmetric)} "
                  f"steps; m={cfg.momentum}, T={cfg.temperature}" + (", symmetric loss" if cfg.symmetric else "")),
        *[row for hook in hooks for row in getattr(hook, "header_rows", lambda: [])()],
        ("output", str(out)),
    ]
    for k, v in rows:
        t.add_row(k, v)
    return t


def resumed_pipeline(cfg, ckpt: dict | None, console: Console) -> str | None:
    """A resumed run keeps its data pipeline (another one draws other views): --pipeline auto takes the
    checkpoint's; an explicit different one is honoured with a warning."""
    saved = (ckpt or {}).get("config", {}).get("pipeline")
    if saved not in ("resident", "decode", "pil"):  # a new run, or a checkpoint of hnmix 0.1
        return None
    if cfg.pipeline == "auto":
        return saved
    if cfg.pipeline != saved:
        console.print(f"[yellow]warning:[/] resuming a run trained with --pipeline {saved} on --pipeline "
                      f"{cfg.pipeline}: its views differ from the uninterrupted run's", soft_wrap=True)
    return None


def train(cfg, info: dist.DistInfo, hooks: list[Hook] = ()) -> Trainer:
    """Run (or continue) the pretraining of cfg on this rank; returns the Trainer at the end."""
    console = Console(quiet=not info.is_main)
    run_dir = RunDirectory(cfg, info, console)
    ckpt, path = None, run_dir.resume_from()
    if path is not None:
        ckpt = load_checkpoint(path)
    data = TrainingData(cfg, info, console.print, pipeline=resumed_pipeline(cfg, ckpt, console))
    cfg = cfg.model_copy(update={"pipeline": data.pipeline})  # config.yaml and checkpoints record the choice
    if cfg.queue_size > len(data) // 2:  # MoCo assumes K << dataset size
        console.print(f"[yellow]warning:[/] the queue (K={cfg.queue_size}) holds more than half the dataset "
                      f"({len(data)} images): queries often meet a stale key of their own image among the "
                      f"negatives; a smaller --queue-size learns faster here", soft_wrap=True)
    sampler_args = (len(data), cfg.batch_size, info.rank, info.world, cfg.seed, cfg.epochs)
    trainer = Trainer(cfg, info, RunBatches(*sampler_args).steps_per_epoch, console)
    if ckpt is not None:
        trainer.load(ckpt, path)
    sampler = RunBatches(*sampler_args, start_step=trainer.step, total_steps=cfg.max_steps)
    start = trainer.step
    run_dir.prepare(start, cfg)
    checkpoints = CheckpointHook(run_dir.path, info.is_main, cfg.keep_every)
    hooks = [MetricsHook(run_dir.path, console, info.is_main, info.device, sampler.total, cfg.epochs), *hooks,
             checkpoints]
    console.print(describe(cfg, trainer, data, sampler, hooks, run_dir.path))
    trainer.prepare_steps()
    try:
        fit(trainer, data.batches(sampler), sampler.total, hooks, checkpoints)
    except CorruptImageError as e:  # keep what was trained: save the last step, as a stop signal does
        if trainer.step == start == 0:
            run_dir.abandon()
            raise
        if trainer.step > start:
            checkpoints.save(trainer, epoch_end=False, wait=True)
        raise CorruptImageError(f"{e}; {trainer.last_good} holds step {trainer.step}: continue with "
                                "--skip-corrupt --resume auto") from None
    except BaseException:
        if trainer.step == start == 0:
            run_dir.abandon()
        raise
    return trainer


def fit(trainer: Trainer, batches, total: int, hooks: list[Hook], checkpoints: CheckpointHook) -> None:
    """Step through the batches; after each step the hooks run in order (metrics first, checkpoints last)."""
    cfg, info, spe = trainer.cfg, trainer.info, trainer.steps_per_epoch
    metrics = hooks[0]
    finished, started_at = False, trainer.step
    try:
        for hook in hooks:
            hook.start(trainer)
        with StopRequest(info.world, info.device, trainer.console) as stop:
            for im_q, im_k, labels, skip in batches:
                started = time.perf_counter()
                out, lr = trainer.train_step(im_q, im_k, labels, total, spe)
                if cfg.compile and started_at == trainer.step - 1:  # what compiling costs, once
                    trainer.console.print(f"first step: {time.perf_counter() - started:.1f} s (torch.compile, "
                                          f"mode {cfg.compile_mode})", highlight=False)
                step = trainer.step
                epoch_end, run_end = step % spe == 0, step == total
                stopping = not run_end and stop.agreed(at_log_step=step % cfg.log_every == 0)
                save = epoch_end or run_end or stopping or bool(cfg.save_every and step % cfg.save_every == 0)
                moment = Moment(step, step // spe, lr, step % cfg.log_every == 0, epoch_end, run_end, save)
                result = StepOutput(out.loss, out.stats, int(skip.sum()))
                for hook in hooks:
                    if (record := hook.after_step(trainer, result, moment)) is not None:
                        metrics.add_record({"step": step, "epoch": moment.epoch, **record})
                if stopping:
                    checkpoints.wait()
                    raise stop.stopped(step, trainer.last_good)
        finished = True
    finally:
        for hook in hooks:
            hook.close(trainer, finished)


def finish(trainer: Trainer, out: Path) -> None:
    if trainer.info.is_main:
        backbone = {k: v.contiguous() for k, v in trainer.model.encoder_q.backbone.state_dict().items()}
        atomic_save(backbone, out / "backbone.pt")
        trainer.console.print(f"done: {out / 'last.pt'} and {out / 'backbone.pt'} (timm {trainer.cfg.arch}, "
                              "num_classes=0)")
    dist.barrier()


def pretrain(cfg, hooks: list[Hook] = ()) -> Path:
    info = dist.setup(cfg.device)
    out = Path(cfg.output)
    try:
        trainer = train(cfg, info, list(hooks))
        finish(trainer, out)
        del trainer  # the DDP reducer holds the process group: free it before the group goes
    except BaseException:
        dist.teardown(finished=False)
        raise
    dist.teardown()
    return out
