"""Running a pretraining job: data -> Trainer step -> hooks (metrics, monitors, checkpoints), one process or DDP.

`pretrain(cfg, hooks)` is the whole run: set up the process group, lock the run directory (checking a resume
against the run's settings), open the data, build the Trainer (hnmix.train.trainer: model, optimiser, one
step; no I/O), resume it, print the run's table, then step through RunBatches; an unreadable image or a stop
keeps what was trained.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import torch
from rich.console import Console
from rich.table import Table

from hnmix.core import dist
from hnmix.core.io import atomic_save
from hnmix.data.order import RunBatches
from hnmix.errors import CorruptImageError
from hnmix.train.data import TrainingData
from hnmix.train.hooks import CheckpointHook, Hook, MetricsHook, Moment
from hnmix.train.run_dir import RunDirectory
from hnmix.train.stop import StopRequest
from hnmix.train.trainer import Trainer, effective_lr


class StepOutput(NamedTuple):
    loss: torch.Tensor
    stats: torch.Tensor
    skipped: int  # unreadable files replaced in this batch


def describe(cfg, trainer: Trainer, data: TrainingData, sampler: RunBatches, hooks: list[Hook], out: Path) -> Table:
    info = trainer.info
    t = Table(title="hnmix pretrain", show_header=False, title_justify="left")
    rows = [
        ("method", cfg.describe_method()),
        ("backbone", f"{cfg.arch}{' + CIFAR stem' if cfg.cifar_stem else ''}, head "
                     f"{'MLP' if cfg.mlp else 'linear'} -> {cfg.dim}"),
        ("data", f"{cfg.data}: {len(data)} images, {cfg.image_size} px; {data.description}"),
        ("devices", f"{info.world} x {info.device.type}, precision {trainer.dtype or 'fp32'}, BN {trainer.bn}"
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


def train(cfg, info: dist.DistInfo, hooks: list[Hook] = (), run_dir: RunDirectory | None = None) -> Trainer:
    """Run (or continue) the pretraining of cfg on this rank in run_dir (opened and locked here if not given);
    returns the Trainer at the end."""
    run_dir = run_dir or RunDirectory(cfg, info, Console(quiet=not info.is_main))
    console = run_dir.console
    ckpt = run_dir.resume()  # refuses a changed experiment before anything is written
    data = TrainingData(cfg, info, console.print, pipeline=resumed_pipeline(cfg, ckpt, console))
    cfg = cfg.model_copy(update={"pipeline": data.pipeline})  # config.yaml and checkpoints record the choice
    if cfg.queue_size > len(data) // 2:  # MoCo assumes K << dataset size
        console.print(f"[yellow]warning:[/] the queue (K={cfg.queue_size}) holds more than half the dataset "
                      f"({len(data)} images): queries often meet a stale key of their own image among the "
                      f"negatives; a smaller --queue-size learns faster here", soft_wrap=True)
    sampler_args = (len(data), cfg.batch_size, info.rank, info.world, cfg.seed, cfg.epochs)
    trainer = Trainer(cfg, info, RunBatches(*sampler_args).steps_per_epoch, console)
    if ckpt is not None:
        trainer.load(ckpt, run_dir.resumed_from)
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
        if trainer.step == start == 0:  # nothing to keep (pretrain() removes a new run's directory)
            raise
        if trainer.step > start:
            checkpoints.save(trainer, epoch_end=False, wait=True)
        raise CorruptImageError(f"{e}; {trainer.last_good} holds step {trainer.step}: continue with "
                                "--skip-corrupt --resume auto") from None
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
    run_dir = None
    try:
        run_dir = RunDirectory(cfg, info, Console(quiet=not info.is_main))
        trainer = train(cfg, info, list(hooks), run_dir)
        finish(trainer, out)
        del trainer  # the DDP reducer holds the process group: free it before the group goes
    except BaseException:
        if run_dir is not None:  # a new directory that never got a checkpoint goes, then the lock
            run_dir.abandon()
            run_dir.release()
        dist.teardown(finished=False)
        raise
    run_dir.release()
    dist.teardown()
    return out
