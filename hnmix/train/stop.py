"""Stopping a pretraining run on Ctrl-C / SIGTERM (hnmix.core.stop): finish the step, save last.pt, exit.

Under DDP the ranks agree on the flag at log steps (one all-reduce, where the metrics are read back
anyway), so every rank stops after the same step. Loader workers ignore SIGINT: Ctrl-C reaches the whole
process group, and a worker that died would break the batch the main process still needs. They keep
SIGTERM, which is how multiprocessing and the DataLoader end them.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from hnmix.core.stop import SignalFlag, Stopped


def ignore_sigint_in_worker(_worker_id: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StopRequest(SignalFlag):
    def __init__(self, world: int, device: torch.device, console):
        super().__init__(console, "stopping after this step and saving last.pt")
        self.world, self.device = world, device

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
        where = f"saved {saved}" if saved else "nothing saved"
        return super().stopped(f"after step {step}: {where}; continue with --resume auto")
