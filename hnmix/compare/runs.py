"""The runs of a comparison: each a normal `hnmix pretrain` run directory, launched as a subprocess.

A run is finished when it holds backbone.pt (pretrain writes it last), unfinished when its directory exists
without it (then `--resume auto` continues from last.pt, or starts over when none was saved), new otherwise.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import yaml

from hnmix.compare.grid import Point
from hnmix.config import PretrainConfig
from hnmix.core.settings import load_config, setting_changes
from hnmix.errors import HnmixError

SIGNAL_NAMES = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


@dataclass
class Run:
    point: Point
    dir: Path
    config: PretrainConfig  # what the run is made with (validated before anything starts)

    @property
    def name(self) -> str:
        return self.point.name

    @property
    def finished(self) -> bool:
        return (self.dir / "backbone.pt").is_file()

    @property
    def state(self) -> str:
        if self.finished:
            return "finished"
        return "unfinished" if self.dir.exists() else "new"


def plan_runs(points: list[Point], output: Path, base_config: str | None, sets: list[str]) -> list[Run]:
    """Every run's settings, resolved exactly as `hnmix pretrain` will: errors surface before any run
    starts."""
    runs = []
    for point in points:
        run_dir = output / point.name
        try:
            cfg = load_config(PretrainConfig, base_config, {"output": str(run_dir)}, [*sets, *point.sets])
        except HnmixError as e:
            raise HnmixError(f"run {point.name}: {e}") from None
        runs.append(Run(point, run_dir, cfg))
    return runs


def config_drift(run: Run) -> list[str]:
    """Settings in which the run on disk differs from the one the grid asks for now."""
    saved_file = run.dir / "config.yaml"
    if not saved_file.is_file():
        return []
    saved = yaml.safe_load(saved_file.read_text()) or {}
    # the settings a resume may not change (their resume policy); eval_transform is how compare measures,
    # which it re-measures on its own (evaluate.py)
    changes = setting_changes(PretrainConfig, saved, run.config.to_yaml_dict())
    return [f"{c.key}: {c.old!r} -> {c.new!r}" for c in changes if c.fixed and c.key != "eval_transform"]


def check_drift(runs: list[Run]) -> None:
    for run in runs:
        drift = config_drift(run)
        if drift:
            raise HnmixError(f"{run.dir} was made with other settings ({'; '.join(drift[:3])}): the report "
                             f"would mix two experiments; delete it or choose another --output")


def pretrain_command(run: Run, base_config: str | None, sets: list[str],
                     python: str = sys.executable) -> list[str]:
    """`python -m hnmix pretrain ...` with every setting as --set key=value: no flag such as --s, which
    torchrun's own parser would claim, so `torchrun --nproc_per_node=N -m hnmix ...` takes the same line."""
    cmd = [python, "-m", "hnmix", "pretrain"]
    if base_config is not None:
        cmd += ["--config", base_config]
    for item in [*sets, *run.point.sets]:
        cmd += ["--set", item]
    cmd += ["--output", str(run.dir)]
    if run.state == "unfinished":
        cmd += ["--resume", "auto"]
    return cmd


def shell_line(cmd: list[str]) -> str:
    return shlex.join(cmd)


class Interrupted(HnmixError):
    """Ctrl-C or SIGTERM reached compare; the child was told to save its step and stop. Carries the
    shell's exit code for the signal (the CLI prints 'stopped:')."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum, self.exit_code = signum, SIGNAL_NAMES[signum][1]


class Signalled(Exception):
    """SIGINT or SIGTERM arrived while children ran (raised in the main thread by catch_signals)."""

    def __init__(self, signum: int):
        self.signum = signum


def _raise_signal(signum, _frame):
    raise Signalled(signum)


@contextlib.contextmanager
def catch_signals():
    """SIGINT and SIGTERM become Signalled while a child runs, so compare can pass them on and wait."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, _raise_signal) for sig in SIGNAL_NAMES}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait(proc: subprocess.Popen, poll: Callable[[], None] | None) -> int:
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if poll:
                poll()


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, IO[str]]:
    """cmd in its own session (a terminal's Ctrl-C reaches compare alone), its output appended to log under
    a `$ command  # time` line; the caller closes the returned log file."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "a")  # noqa: SIM115 (the caller's, until the child ends)
    try:
        out.write(f"$ {shell_line(cmd)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        out.flush()
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env), out
    except BaseException:
        out.close()
        raise


def pass_on(first: Signalled, procs: list[subprocess.Popen]) -> None:
    """Pass the signal on (pretrain finishes its step and saves last.pt) and wait; a second signal is passed
    on too, and the children stop at once."""
    for proc in procs:
        proc.send_signal(first.signum)
    try:
        for proc in procs:
            proc.wait()
    except Signalled as second:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(second.signum)
        for proc in procs:
            proc.wait()


def reap(procs: list[subprocess.Popen]) -> None:
    """An error in compare itself: leave no orphan behind."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def launch(cmd: list[str], log: Path, poll: Callable[[], None] | None = None, what: str = "the run") -> int:
    """Run cmd with its output appended to log; returns its exit code. Ctrl-C / SIGTERM is passed on to the
    run (pass_on), then compare raises Interrupted."""
    with catch_signals():
        proc, out = start(cmd, log)
        with out:
            try:
                return _wait(proc, poll)
            except Signalled as first:
                pass_on(first, [proc])
                raise Interrupted(f"{SIGNAL_NAMES[first.signum][0]} during {what}", first.signum) from None
            finally:
                reap([proc])
