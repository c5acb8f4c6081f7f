"""What happens around the training step, as hooks the loop calls in order: metrics (read-backs, log files,
progress, epoch lines), then any extra hooks (the kNN monitor, from hnmix.eval.monitor), then checkpoints.

A hook sees the Trainer and a Moment (which step just ended and what it is: a log step, an epoch end, a
save point); it never changes the model or the run's random streams.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from hnmix.core.io import atomic_save
from hnmix.core.log import MetricsLog, training_progress
from hnmix.errors import HnmixError
from hnmix.models.moco import STAT_NAMES
from hnmix.train.checkpoint import LAST, PREVIOUS


@dataclass(frozen=True)
class Moment:
    step: int  # steps completed
    epoch: int  # epochs completed
    lr: float
    log: bool  # metrics are read back (one host sync)
    epoch_end: bool
    run_end: bool
    save: bool  # a checkpoint is written after this step


class Hook:
    def start(self, trainer) -> None:
        """Before the first step (after a resume)."""

    def after_step(self, trainer, out, moment: Moment) -> dict | None:
        """After every optimisation step. An evaluating hook returns its results: they go to metrics.jsonl,
        and the time it took is left out of the training throughput."""

    def close(self, trainer, finished: bool) -> None:
        """At the end of the run, also after an error (finished=False)."""


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

    def pause(self) -> None:
        """Time spent outside training (an evaluation) is not training throughput."""
        self.since = time.perf_counter()


class MetricsHook(Hook):
    """metrics.jsonl + TensorBoard at log steps and save points, the progress bar, a line per epoch; stops the
    run on a non-finite loss before anything is saved."""

    def __init__(self, out: Path, console: Console, is_main: bool, device: torch.device, total: int, epochs: int):
        self.log = MetricsLog(out, is_main)
        self.console, self.total, self.epochs = console, total, epochs
        self.meter = Meter(device)
        self.skipped = 0
        self.progress = training_progress(console)

    def start(self, trainer) -> None:
        self.progress.start()
        spe = trainer.steps_per_epoch
        self.task = self.progress.add_task("train", total=self.total, completed=trainer.step,
                                           epoch=trainer.step // spe + 1, loss="-", acc="-", speed="-")
        self.meter.pause()
        self.started = time.perf_counter()

    def after_step(self, trainer, out, moment: Moment) -> None:
        self.meter.add(out.loss, out.stats, trainer.cfg.batch_size)
        self.skipped += int(out.skipped)
        spe = trainer.steps_per_epoch
        self.progress.update(self.task, advance=1, epoch=f"{moment.step // spe + (moment.step % spe > 0)}/{self.epochs}")
        if not (moment.log or moment.save):
            return
        record = {"step": moment.step, "epoch": round(moment.step / spe, 4), "lr": moment.lr, **self.meter.read(),
                  "elapsed_s": round(time.perf_counter() - self.started, 3)}  # since this session's first step
        if not math.isfinite(record["loss"]):
            last = trainer.last_good
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise HnmixError(f"non-finite loss at step {moment.step} (lr {moment.lr:.4g}; mean logits: positive "
                             f"{record['logit_pos']:.3g}, negative {record['logit_neg']:.3g}); stopped, {where}")
        self.log.write(record)
        self.progress.update(self.task, loss=f"{record['loss']:.3f}", acc=f"{record['acc']:.2f}",
                             speed=f"{record['img_per_s']:.0f}")
        if moment.epoch_end:
            self._epoch_line(moment, record)

    def add_record(self, record: dict) -> None:
        self.log.write(record)
        self.meter.pause()

    def _epoch_line(self, moment: Moment, record: dict) -> None:
        msg = (f"epoch {moment.epoch}/{self.epochs}  step {moment.step}  loss {record['loss']:.4f}  "
               f"acc {record['acc']:.3f}  {record['img_per_s']:.0f} img/s")
        if not math.isnan(record.get("logit_syn", math.nan)):  # acc counts the queue negatives only
            msg += f"  syn logit {record['logit_syn']:.3f}  acc with syn {record['acc_syn']:.3f}"
        if self.skipped:
            msg += f"  [yellow]skipped {self.skipped} unreadable images[/]"
            self.skipped = 0
        self.console.print(msg, highlight=False, soft_wrap=True)  # above the live bar: a per-epoch history

    def close(self, trainer, finished: bool) -> None:
        """After an error, log the steps since the last read-back too: the run may be saved at this step."""
        if not finished and self.meter.steps and trainer.info.world == 1:  # no collective on an error path
            spe = trainer.steps_per_epoch
            self.log.write({"step": trainer.step, "epoch": round(trainer.step / spe, 4), **self.meter.read()})
        self.progress.stop()
        self.log.close()


class CheckpointHook(Hook):
    """last.pt at every save point (epoch ends, --save-every, the end, a stop), the one before it kept as
    last.prev.pt; epoch_NNNN.pt every --keep-every epochs. The state is copied off the model at the step
    (consistent; on CUDA into pinned buffers, queued on the stream), and a background thread writes it while
    training goes on; the next step sees a failed write (a full disk) and stops the run with one line."""

    def __init__(self, out: Path, is_main: bool, keep_every: int):
        self.out, self.is_main, self.keep_every = out, is_main, keep_every
        self.writer: threading.Thread | None = None
        self.error: tuple[Path, BaseException] | None = None
        self.pinned: dict[str, torch.Tensor] = {}
        self.written: tuple[Path, int] | None = None  # the newest complete checkpoint and its step

    def start(self, trainer) -> None:
        if trainer.last_good is not None:
            self.written = (trainer.last_good, trainer.step)

    def after_step(self, trainer, out, moment: Moment) -> None:
        if self.error is not None:  # the last write failed: stop here rather than train on unsaved
            self.wait()
        if moment.save:
            self.save(trainer, moment.epoch_end, wait=moment.run_end)

    def save(self, trainer, epoch_end: bool, wait: bool = False) -> None:
        if not self.is_main:
            return
        self.wait()  # the previous write owns the pinned buffers until it is done
        state = self._snapshot(trainer.checkpoint())
        copied = torch.cuda.Event() if self.pinned else None
        if copied is not None:
            copied.record()
        paths = [self.out / LAST]
        epoch = trainer.step // trainer.steps_per_epoch
        if epoch_end and self.keep_every and epoch % self.keep_every == 0:
            paths.append(self.out / f"epoch_{epoch:04d}.pt")
        self.writer = threading.Thread(target=self._write, args=(state, paths, copied, trainer.step),
                                       name="hnmix-checkpoint")
        self.writer.start()
        trainer.last_good = paths[0]
        if wait:
            self.wait()

    def _snapshot(self, obj, key: str = ""):
        """A host copy of every tensor: training goes on changing the originals in place."""
        if isinstance(obj, torch.Tensor):
            if obj.device.type != "cuda":
                return obj.detach().clone()
            buffer = self.pinned.get(key)
            if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                buffer = self.pinned[key] = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            return buffer.copy_(obj.detach(), non_blocking=True)
        if isinstance(obj, dict):
            return {k: self._snapshot(v, f"{key}/{k}") for k, v in obj.items()}
        if isinstance(obj, list | tuple):
            return type(obj)(self._snapshot(v, f"{key}/{i}") for i, v in enumerate(obj))
        return obj

    def _write(self, state: dict, paths: list[Path], copied, step: int) -> None:
        path = paths[0]
        try:
            if copied is not None:
                copied.synchronize()  # the device has finished copying into the pinned buffers
            atomic_save(state, path, previous=self.out / PREVIOUS)  # the old last.pt becomes last.prev.pt
            self.written = (path, step)
            for path in paths[1:]:  # epoch_NNNN.pt
                atomic_save(state, path)
        except BaseException as e:  # re-raised in the training thread at its next step
            self.error = (path, e)

    def wait(self) -> None:
        if self.writer is not None:
            self.writer.join()
            self.writer = None
        if self.error is not None:
            (path, error), self.error = self.error, None
            if not isinstance(error, OSError | RuntimeError):
                raise error
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error).splitlines()[0]
            kept = (f"{self.written[0]} still holds step {self.written[1]}" if self.written
                    else "no checkpoint was written")
            raise HnmixError(f"could not write {path} ({reason}); stopped: {kept}, the earlier checkpoints are "
                             "intact") from None

    def close(self, trainer, finished: bool) -> None:
        self.wait()
