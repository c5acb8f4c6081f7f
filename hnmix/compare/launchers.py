"""Runs of a grid at once on this machine (`--launcher local --parallel N`), and the record of a grid's SLURM
jobs (so that a rerun waits for jobs still running instead of submitting them twice)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from hnmix.compare.runs import SIGNAL_NAMES, Interrupted, Signalled, catch_signals, pass_on, reap, start
from hnmix.errors import HnmixError


def slot_envs(n: int) -> list[dict[str, str]]:
    """The environment of each of n slots: one GPU each where there are GPUs, else an equal share of the
    CPU cores as threads (an OMP_NUM_THREADS already set wins)."""
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g for g in visible.split(",") if g.strip()] if visible else [
            str(i) for i in range(torch.cuda.device_count())]
        if n > len(gpus):
            raise HnmixError(f"--parallel {n}: this machine has {len(gpus)} GPU(s), one per run")
        return [{"CUDA_VISIBLE_DEVICES": gpus[i]} for i in range(n)]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // n))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}] * n


def run_parallel(jobs: list[tuple[str, list[str], Path]], n: int, on_start: Callable[[str, dict], None],
                 on_end: Callable[[str, int], None], poll: Callable[[list[str]], None]) -> None:
    """Run (name, command, log) jobs, n at a time, in grid order, each as `runs.launch` runs one: own
    session, Ctrl-C / SIGTERM passed on to each (they save their step), then Interrupted."""
    envs, pending = slot_envs(n), list(jobs)
    free, running = list(range(n)), {}  # slot -> (name, process, log file)
    with catch_signals():
        try:
            while pending or running:
                while pending and free:
                    slot, (name, cmd, log) = free.pop(0), pending.pop(0)
                    running[slot] = (name, *start(cmd, log, env={**os.environ, **envs[slot]}))
                    on_start(name, envs[slot])
                for slot, (name, proc, out) in list(running.items()):
                    if proc.poll() is not None:
                        out.close()
                        del running[slot]
                        free.append(slot)
                        on_end(name, proc.returncode)
                poll([name for name, _, _ in running.values()])
                time.sleep(0.5)
        except Signalled as first:
            pass_on(first, [proc for _, proc, _ in running.values()])
            names = ", ".join(name for name, _, _ in running.values())
            raise Interrupted(f"{SIGNAL_NAMES[first.signum][0]} during {names}", first.signum) from None
        finally:
            reap([proc for _, proc, _ in running.values()])
            for _, _, out in running.values():
                out.close()


class JobRecord:
    """FOLDER/jobs.json: {run name: SLURM job id} of the grid's last submission."""

    def __init__(self, folder: Path):
        self.path = folder / "jobs.json"

    def read(self) -> dict[str, str]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def write(self, jobs: dict[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**self.read(), **jobs}, indent=1))
        tmp.replace(self.path)
