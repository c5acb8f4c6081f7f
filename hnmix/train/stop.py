"""Ctrl-C / SIGTERM (a cluster's preemption) during pretraining: finish the step, save last.pt, exit.

The first signal only raises a flag, read between steps, so the checkpoint holds a consistent state and
`--resume auto` continues exactly. Under DDP the ranks agree on the flag at log steps (one all-reduce,
where the metrics are read back anyway), so every rank stops after the same step. A second signal acts
as usual. Loader workers ignore SIGINT: Ctrl-C reaches the whole process group, and a worker that died
would break the batch the main process still needs. They keep SIGTERM, which is how multiprocessing
and the DataLoader end them.
"""

from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from hnmix.errors import HnmixError

SIGNALS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


class Stopped(HnmixError):
    """Raised after the checkpoint is saved; carries the shell's exit code for the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def ignore_sigint_in_worker(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest:
    def __init__(self, world: int, device: torch.device, console):
        self.world, self.device, self.console = world, device, console
        self.signal: int | None = None
        self.previous: dict = {}
        self.pid = os.getpid()

    def __enter__(self) -> StopRequest:
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self.pid:  # a forked child (compile workers, ...) inherited this: die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        for sig, handler in self.previous.items():  # a second signal acts as usual
            signal.signal(sig, handler)
        self.console.print(f"[yellow]{SIGNALS[signum][0]}:[/] stopping after this step and saving last.pt "
                           f"(again to quit at once)")

    def agreed(self, at_log_step: bool) -> bool:
        """Whether every rank stops after this step: at once in one process, at log steps under DDP."""
        if self.world == 1:
            return self.signal is not None
        if not at_log_step:
            return False
        flag = torch.tensor([0 if self.signal is None else self.signal], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        self.signal = int(flag) or None
        return self.signal is not None

    def stopped(self, step: int, saved) -> Stopped:
        name, code = SIGNALS[self.signal]
        where = f"saved {saved}" if saved else "nothing saved"
        return Stopped(f"{name} after step {step}: {where}; continue with --resume auto", code)
