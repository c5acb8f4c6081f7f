"""The pretraining loop: data -> MoCo step -> metrics/checkpoints, single process or DDP under torchrun."""

from __future__ import annotations

import functools
import math
import os
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.nn.parallel import DistributedDataParallel

from hnmix.config import PretrainConfig
from hnmix.core import dist as distributed
from hnmix.core.device import autocast_dtype
from hnmix.core.io import atomic_save
from hnmix.core.log import MetricsLog, training_progress, truncate_metrics
from hnmix.data.augment import Normalize
from hnmix.data.pretrain import RunBatches, TwoViews, open_images, sample_seed
from hnmix.errors import HnmixError
from hnmix.eval.knn import KnnMonitor, print_knn
from hnmix.models.backbone import check_image_size, convert_split_bn, count_batchnorms, create_backbone
from hnmix.models.moco import STAT_NAMES, MoCo
from hnmix.negatives import build_strategy
from hnmix.train.checkpoint import load_checkpoint, make_checkpoint, set_rng_state
from hnmix.train.stop import StopRequest, ignore_sigint_in_worker

# settings a resumed run must share with its checkpoint: they shape the model or the data order
RESUME_FIXED = ("arch", "cifar_stem", "dim", "mlp", "queue_size", "batch_size", "data", "seed", "image_size")


def effective_lr(cfg: PretrainConfig) -> float:
    return cfg.lr * cfg.batch_size / 256


def lr_at(cfg: PretrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Cosine over the run's steps (MoCo-v2's cosine, per step), or x0.1 at each --schedule epoch."""
    if cfg.cos:
        return effective_lr(cfg) * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
    epoch = step // steps_per_epoch
    return effective_lr(cfg) * 0.1 ** sum(epoch >= m for m in cfg.schedule)


def describe_method(cfg: PretrainConfig) -> str:
    details = {
        "mochi": f"N={cfg.n_hard}, s={cfg.s}, s'={cfg.s_prime}, from epoch {cfg.mochi_start_epoch}",
        "synco": f"N={cfg.n_hard}, counts {cfg.synco_counts}, sigma={cfg.synco_sigma}, delta={cfg.synco_delta}, "
                 f"eta={cfg.synco_eta}, from epoch {cfg.synco_start_epoch}",
        "ring": f"outer {cfg.ring_outer}, inner {cfg.ring_inner}, anneal {cfg.ring_anneal} over "
                f"{cfg.ring_anneal_epochs} epochs",
    }.get(cfg.method)
    text = cfg.method + (f" ({details})" if details else "")
    return text + (" + label oracle" if cfg.oracle_labels else "")


def resolve_bn(cfg: PretrainConfig, world: int, local_batch: int) -> tuple[str, int]:
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


def build_model(cfg: PretrainConfig, bn_mode: str, splits: int, world: int, console: Console) -> MoCo:
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
                 shuffle_keys=bn_mode == "shuffle" or splits > 1)
    if bn_mode == "sync" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class Meter:
    """Device-side sums between read-backs, so the step never waits for the host."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(1 + len(STAT_NAMES), device=device, dtype=torch.float64)
        self.steps, self.images, self.since = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, stats: torch.Tensor, images: int) -> None:
        self.sums += torch.cat([loss.detach().reshape(1), stats.detach()]).double()
        self.steps, self.images = self.steps + 1, self.images + images

    def read(self) -> dict:
        sums = self.sums.clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
            sums /= torch.distributed.get_world_size()
        values = (sums / max(self.steps, 1)).tolist()  # the one host sync per log interval
        elapsed = time.perf_counter() - self.since
        out = {"loss": values[0], **dict(zip(STAT_NAMES, values[1:], strict=True)),
               "img_per_s": self.images / max(elapsed, 1e-9)}
        self.sums.zero_()
        self.steps, self.images, self.since = 0, 0, time.perf_counter()
        return out


def pretrain(cfg: PretrainConfig) -> Path:
    info = distributed.setup(cfg.device)
    try:
        out = Trainer(cfg, info).run()  # the Trainer (and its DDP reducer) is freed before the group goes
    except BaseException:
        distributed.teardown(finished=False)
        raise
    distributed.teardown()
    return out


class Trainer:
    def __init__(self, cfg: PretrainConfig, info: distributed.DistInfo):
        self.cfg, self.info = cfg, info
        self.console = Console(quiet=not info.is_main, stderr=False)
        self.out = Path(cfg.output)
        if cfg.batch_size % info.world:
            raise HnmixError(f"global batch {cfg.batch_size} is not divisible by {info.world} ranks")
        self.local_batch = cfg.batch_size // info.world
        self.bn_mode, self.splits = resolve_bn(cfg, info.world, self.local_batch)
        self.dtype = autocast_dtype(cfg.precision, info.device)
        if self.bn_mode == "sync" and info.world > 1 and info.device.type != "cuda":
            raise HnmixError("--bn sync needs GPUs (SyncBatchNorm has no CPU kernel); use --bn shuffle")

        torch.manual_seed(cfg.seed)  # identical initial weights and queue on every rank and every run
        images = open_images(cfg.data, "train")
        if cfg.oracle_labels and min(images.labels) < 0:
            raise HnmixError("--oracle-labels needs labelled data (an ImageFolder: one sub-folder per class)")
        self.dataset = TwoViews(images, cfg.image_size, cfg.seed, cfg.skip_corrupt)
        if cfg.queue_size > len(images) // 2:  # MoCo assumes K << dataset size
            self.console.print(f"[yellow]warning:[/] the queue (K={cfg.queue_size}) holds more than half the dataset "
                               f"({len(images)} images): queries often meet a stale key of their own image among "
                               f"the negatives; a smaller --queue-size learns faster here", soft_wrap=True)
        self.knn = KnnMonitor(cfg.knn_data or cfg.data, cfg.image_size, self.local_batch, cfg.workers) \
            if cfg.knn_every else None
        self.model = build_model(cfg, self.bn_mode, self.splits, info.world, self.console).to(info.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.normalize = Normalize(channels_last=cfg.channels_last).to(info.device)
        self.optimizer = torch.optim.SGD(self.model.encoder_q.parameters(), lr=effective_lr(cfg),
                                         momentum=cfg.sgd_momentum, weight_decay=cfg.wd)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=self.dtype == torch.float16)
        self.step = 0
        self.last_good: Path | None = None
        self._resume()
        self.device_data, self.data_source = self._device_data(images)

    # ------------------------------------------------------------------ setup
    def _resume(self) -> None:
        cfg = self.cfg
        path = None
        existing = self.out / "last.pt"
        if self.out.exists() and not self.out.is_dir():
            raise HnmixError(f"--output {self.out} is a file, not a directory")
        if cfg.resume == "auto":
            path = existing if existing.is_file() else None
            if path is None:
                self.console.print(f"--resume auto: no last.pt in {self.out}, starting from step 0")
        elif cfg.resume:
            path = Path(cfg.resume)
        elif existing.is_file():  # never overwrite a run by accident
            raise HnmixError(f"{self.out} already holds a run (last.pt); --resume auto continues it, or choose "
                             f"another --output (or delete the directory) to start afresh")
        if path is None:
            return
        ckpt = load_checkpoint(path)
        saved = ckpt["config"]
        changed = [k for k in RESUME_FIXED if saved.get(k) != getattr(cfg, k)]
        if changed:
            diffs = ", ".join(f"{k}: {saved.get(k)!r} -> {getattr(cfg, k)!r}" for k in changed)
            raise HnmixError(f"cannot resume {path}: settings differ from the checkpoint ({diffs})")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        self.step, self.last_good = int(ckpt["step"]), path
        self.console.print(f"resumed from {path} at step {self.step} (epoch {ckpt['epoch']})")

    def _loader(self, sampler: RunBatches) -> torch.utils.data.DataLoader:
        workers = min(self.cfg.workers, os.cpu_count() or 1)
        return torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, num_workers=workers,
            pin_memory=self.info.device.type == "cuda", persistent_workers=workers > 0,
            worker_init_fn=ignore_sigint_in_worker,
            prefetch_factor=4 if workers else None,
        )

    def _device_data(self, images):
        from hnmix.data.gpu_data import device_batches

        cfg, info = self.cfg, self.info
        source, note = device_batches(images, mode=cfg.data_on_gpu, device=info.device, image_size=cfg.image_size,
                                      seed=cfg.seed, channels_last=cfg.channels_last, skip_corrupt=cfg.skip_corrupt,
                                      local_rank=info.local_rank, log=self.console.print, barrier=distributed.barrier)
        workers = min(cfg.workers, os.cpu_count() or 1)
        return source, note if source else f"{note}, {workers} workers"

    def _batches(self, sampler: RunBatches):
        """(view_q, view_k, labels, skipped files) per step, normalised on the device: from device-resident
        data (--data-on-gpu) or from the DataLoader's workers."""
        if self.device_data is not None:
            yield from self.device_data(sampler)
            return
        device = self.info.device
        for im_q, im_k, labels, skip in self._loader(sampler):
            yield (self.normalize(im_q.to(device, non_blocking=True)), self.normalize(im_k.to(device, non_blocking=True)),
                   labels.to(device, non_blocking=True), skip)

    def prepare_steps(self) -> None:
        """What every step uses: the (DDP-wrapped) model, the strategy, and its two generators."""
        self.shared_gen = torch.Generator(device=self.info.device)  # same draws on every rank: key shuffle
        self.rank_gen = torch.Generator(device=self.info.device)  # this rank's draws: synthetic negatives
        if self.cfg.compile:  # in place, so state-dict keys and the momentum update see the same modules
            self.model.encoder_q.compile()
            self.model.encoder_k.compile()
        self.ddp = self._wrap_ddp() if self.info.world > 1 else self.model
        self.strategy = build_strategy(self.cfg)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // self.cfg.batch_size  # drop_last, as RunBatches

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
        with torch.autocast(info.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.ddp(im_q, im_k, hard_negatives=hard, labels=labels, oracle=cfg.oracle_labels,
                           shuffle_generator=self.shared_gen)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return out, lr

    def _describe(self, sampler: RunBatches) -> None:
        cfg, info = self.cfg, self.info
        t = Table(title="hnmix pretrain", show_header=False, title_justify="left")
        rows = [
            ("method", describe_method(cfg)),
            ("backbone", f"{cfg.arch}{' + CIFAR stem' if cfg.cifar_stem else ''}, head "
                         f"{'MLP' if cfg.mlp else 'linear'} -> {cfg.dim}"),
            ("data", f"{cfg.data}: {len(self.dataset)} images, {cfg.image_size} px; {self.data_source}"),
            ("devices", f"{info.world} x {info.device.type}, precision {self.dtype or 'fp32'}, BN {self.bn_mode}"
                        f"{', compiled encoders' if cfg.compile else ''}"),
            ("batch", f"global {cfg.batch_size} = {info.world} x {self.local_batch} per rank"),
            ("lr", f"effective {effective_lr(cfg):.4g} = {cfg.lr} x {cfg.batch_size}/256, "
                   f"{'cosine' if cfg.cos else f'steps at {cfg.schedule}'}, wd {cfg.wd}"),
            ("steps", f"{sampler.steps_per_epoch}/epoch, {sampler.total} in all"
                      f" ({cfg.epochs} epochs{f', capped by --max-steps {cfg.max_steps}' if cfg.max_steps else ''})"),
            ("queue", f"K={cfg.queue_size}, filled after {cfg.queue_size // cfg.batch_size} steps; "
                      f"m={cfg.momentum}, T={cfg.temperature}"),
            ("output", str(self.out)),
        ]
        if self.knn:
            rows.insert(-1, ("kNN monitor", self.knn.describe(cfg.knn_every)))
        for k, v in rows:
            t.add_row(k, v)
        self.console.print(t)

    # ------------------------------------------------------------------ loop
    def run(self) -> Path:
        cfg, info = self.cfg, self.info
        sampler = RunBatches(len(self.dataset), cfg.batch_size, info.rank, info.world, cfg.seed, cfg.epochs,
                             start_step=self.step, total_steps=cfg.max_steps)
        spe, total = sampler.steps_per_epoch, sampler.total
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.out / "config.yaml")
            truncate_metrics(self.out / "metrics.jsonl", self.step)
        self._describe(sampler)
        log = MetricsLog(self.out, info.is_main)
        meter = Meter(info.device)
        self.prepare_steps()
        skipped = 0
        try:
            with training_progress(self.console) as progress, StopRequest(info.world, info.device,
                                                                          self.console) as stop:
                task = progress.add_task("train", total=total, completed=self.step, epoch=self.step // spe + 1,
                                         loss="-", acc="-", speed="-")
                for im_q, im_k, labels, skip in self._batches(sampler):
                    out, lr = self.train_step(im_q, im_k, labels, total, spe)
                    meter.add(out.loss, out.stats, cfg.batch_size)
                    skipped += int(skip.sum())
                    progress.update(task, advance=1, epoch=f"{self.step // spe + (self.step % spe > 0)}/{cfg.epochs}")
                    epoch_end, run_end = self.step % spe == 0, self.step == total
                    stopping = not run_end and stop.agreed(at_log_step=self.step % cfg.log_every == 0)
                    saving = epoch_end or run_end or stopping or (cfg.save_every and self.step % cfg.save_every == 0)
                    if saving or self.step % cfg.log_every == 0:
                        record = self._flush(meter, log, lr, spe)
                        progress.update(task, loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.2f}",
                                        speed=f"{record['img_per_s']:.0f}")
                    if epoch_end:
                        self._epoch_summary(record, skipped)
                        skipped = 0
                        self._knn_monitor(log, meter)
                    if saving:
                        self._save(epoch_end)
                    if stopping:
                        raise stop.stopped(self.step, self.last_good)
        finally:
            log.close()
        return self._finish()

    def _wrap_ddp(self) -> DistributedDataParallel:
        """DDP over the whole MoCo module; buffers are not broadcast: every rank updates the same queue from
        the all-gathered keys, and broadcasting K x D floats each step would cost more than the step."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            return DistributedDataParallel(
                self.model, device_ids=[self.info.local_rank] if self.info.device.type == "cuda" else None,
                broadcast_buffers=False)

    def _flush(self, meter: Meter, log: MetricsLog, lr: float, spe: int) -> dict:
        record = {"step": self.step, "epoch": round(self.step / spe, 4), "lr": lr, **meter.read()}
        if not math.isfinite(record["loss"]):
            last = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"
            raise HnmixError(
                f"non-finite loss at step {self.step} (lr {lr:.4g}; mean logits: positive "
                f"{record['logit_pos']:.3g}, negative {record['logit_neg']:.3g}); stopped, {last}")
        log.write(record)
        return record

    def _epoch_summary(self, record: dict, skipped: int) -> None:
        cfg = self.cfg
        spe = self.steps_per_epoch
        msg = (f"epoch {self.step // spe}/{cfg.epochs}  step {self.step}  loss {record['loss']:.4f}  "
               f"acc {record['acc']:.3f}  {record['img_per_s']:.0f} img/s")
        if not math.isnan(record.get("logit_syn", math.nan)):
            msg += f"  syn logit {record['logit_syn']:.3f}"
        if skipped:
            msg += f"  [yellow]skipped {skipped} unreadable images[/]"
        self.console.print(msg, highlight=False, soft_wrap=True)  # above the live bar in a terminal: a per-epoch history

    def _knn_monitor(self, log: MetricsLog, meter: Meter) -> None:
        """kNN accuracy of the query backbone every --knn-every epochs; every rank extracts a share."""
        epoch = self.step // self.steps_per_epoch
        if self.knn is None or epoch % self.cfg.knn_every:
            return
        with torch.random.fork_rng(devices=[]):  # the loader's seed draw must not shift the run's RNG stream
            result = self.knn(self.model.encoder_q.backbone, self.normalize, self.info.device, self.dtype)
        log.write({"step": self.step, "epoch": epoch, **result})
        print_knn(self.console, epoch, result)
        meter.since = time.perf_counter()  # the monitor's time is not training throughput

    def _save(self, epoch_end: bool) -> None:
        if not self.info.is_main:
            return
        spe = self.steps_per_epoch
        ckpt = make_checkpoint(model=self.model, optimizer=self.optimizer, scaler=self.scaler,
                               epoch=self.step // spe, step=self.step, config=self.cfg.model_dump(mode="json"))
        atomic_save(ckpt, self.out / "last.pt")
        self.last_good = self.out / "last.pt"
        keep = self.cfg.keep_every
        if epoch_end and keep and (self.step // spe) % keep == 0:
            atomic_save(ckpt, self.out / f"epoch_{self.step // spe:04d}.pt")

    def _finish(self) -> Path:
        if self.info.is_main:
            backbone = {k: v.contiguous() for k, v in self.model.encoder_q.backbone.state_dict().items()}
            atomic_save(backbone, self.out / "backbone.pt")
            self.console.print(f"done: {self.out / 'last.pt'} and {self.out / 'backbone.pt'} "
                               f"(timm {self.cfg.arch}, num_classes=0)")
        distributed.barrier()
        return self.out
