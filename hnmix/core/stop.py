"""Ctrl-C / SIGTERM (a cluster's preemption) during a long run: the first signal only raises a flag, read at
a safe point (after a step), where the run saves itself and ends with a line saying how to continue; a
second signal acts as usual."""

from __future__ import annotations

import os
import signal

from rich.console import Console

from hnmix.errors import HnmixError

SIGNALS = {signal.SIGINT: ("interrupted", 130), signal.SIGTERM: ("terminated", 143)}


class Stopped(HnmixError):
    """Raised after the run is saved; carries the shell's exit code for the signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class SignalFlag:
    """`with SignalFlag(console) as stop:` ... `if stop.signal is not None: save; raise stop.stopped(...)`."""

    def __init__(self, console: Console | None = None, what: str = "stopping after this step and saving it"):
        self.console, self.what = console or Console(stderr=True), what
        self.signal: int | None = None
        self.previous: dict = {}
        self.pid = os.getpid()

    def __enter__(self):
        self.signal = None
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def _handle(self, signum, _frame) -> None:
        if os.getpid() != self.pid:  # a forked child (compile workers, ...) inherited this: die as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signal = signum
        for sig, handler in self.previous.items():  # a second signal acts as usual
            signal.signal(sig, handler)
        self.console.print(f"[yellow]{SIGNALS[signum][0]}:[/] {self.what} (again to quit at once)")

    def stopped(self, detail: str) -> Stopped:
        name, code = SIGNALS[self.signal or signal.SIGINT]
        return Stopped(f"{name} {detail}", code)
