"""Run-directory logging: metrics.jsonl, TensorBoard, and the rich progress bars (main rank only)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records of steps the resumed run will redo, so the log has each step once."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLog:
    def __init__(self, run_dir: Path, enabled: bool, prefix: str = "pretrain"):
        self.enabled, self.prefix = enabled, prefix
        self.file = None
        self.tb = None
        if enabled:
            self.file = open(run_dir / "metrics.jsonl", "a")  # noqa: SIM115 - kept open for the run
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is a dependency, but the run must not die for a log
                self.tb = None

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in clean.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(f"{self.prefix}/{key}", value, record["step"])

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def progress_bar(console: Console, label: str, info: str) -> Progress:
    """Bar, count, elapsed time and ETA; silent off a terminal (logs get plain summary lines instead)."""
    return Progress(
        TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn(info),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    )


def training_progress(console: Console) -> Progress:
    return progress_bar(console, "epoch {task.fields[epoch]}",
                        "loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[speed]} img/s")


def eval_progress(console: Console) -> Progress:
    return progress_bar(console, "{task.description}", "{task.fields[info]}")


def last_line(log: Path, skip: str | None = None) -> str:
    """The last non-blank line of a log (one holding `skip` passed over): what a failed run said last."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip() and not (skip and skip in line)]
    return lines[-1] if lines else "no output"
