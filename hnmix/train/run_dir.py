"""The run directory: one process at a time (DIR/.lock), never overwritten, resumed only with the settings of
its experiment, and a record of every start.

- A run's settings carry a resume policy (hnmix.core.settings): a resumed run that changes a fixed one is
  refused before anything is written, unless `--allow-change KEY` says it is meant; then config.yaml keeps
  the settings the run started with, and history.jsonl records the change.
- history.jsonl: one line per start or resume (step, host, pid, hnmix version, time, changed settings).
- `--resume auto` takes last.pt, or last.prev.pt (the checkpoint before it) when last.pt is unreadable.
- A new run that fails before its first checkpoint leaves no directory behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path

from rich.console import Console

from hnmix import __version__
from hnmix.core import dist
from hnmix.core.dist import DistInfo
from hnmix.core.io import sweep_temporaries
from hnmix.core.lock import DirectoryLock
from hnmix.core.log import truncate_metrics
from hnmix.core.settings import Change, setting_changes
from hnmix.errors import HnmixError
from hnmix.train.checkpoint import LAST, PREVIOUS, load_checkpoint

UNREADABLE, HISTORY = "last.unreadable.pt", "history.jsonl"
NOT_RECORDED = ("output", "resume", "allow_change")  # how this start was asked for, not how the run differs


def holds_run(path: Path) -> bool:
    """A run directory with a checkpoint to continue from."""
    return any((Path(path) / name).is_file() for name in (LAST, PREVIOUS))


def refuse_overwrite(path: Path, resume: str | None) -> None:
    """A new run (no --resume) never overwrites one by accident."""
    if resume is None and holds_run(path):
        raise HnmixError(f"{path} already holds a run ({LAST}); --resume auto continues it, or choose another "
                         "--output (or delete the directory) to start afresh")


class RunDirectory:
    def __init__(self, cfg, info: DistInfo, console: Console):
        self.cfg, self.info, self.console = cfg, info, console
        self.path = Path(cfg.output)
        if self.path.exists() and not self.path.is_dir():
            raise HnmixError(f"--output {self.path} is a file, not a directory")
        missing = [p for p in (self.path, *self.path.parents) if not p.exists()]
        self.created = missing[-1] if missing else None  # the outermost folder this run makes (the lock does)
        self.lock = DirectoryLock(self.path)
        self._take_lock()
        try:
            refuse_overwrite(self.path, cfg.resume)
        except HnmixError:
            self.release()
            raise
        self.resumed_from: Path | None = None
        self.unreadable: Path | None = None  # a last.pt that --resume auto passed over
        self.saved: dict = {}  # the resumed checkpoint's settings

    def _take_lock(self) -> None:
        """Rank 0 holds the lock, before anything is written; every rank hears whether it got it."""
        error = None
        if self.info.is_main:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                if warning := self.lock.acquire():
                    self.console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True, highlight=False)
            except (HnmixError, OSError) as e:  # OSError: an --output under a file, no permission
                error = e
        problem = dist.broadcast_object(None if error is None else str(error))
        if error is not None:
            raise error
        if problem is not None:
            raise HnmixError(problem)

    def release(self) -> None:
        self.lock.release()

    # ------------------------------------------------------------------------------------ resuming

    def resume(self) -> dict | None:
        """The checkpoint to continue from (None: a new run), its settings checked against this run's."""
        if self.cfg.resume is None:
            return None
        if self.cfg.resume != "auto":
            path = Path(self.cfg.resume)
            ckpt = load_checkpoint(path)
        elif (found := self._auto()) is None:
            return None
        else:
            path, ckpt = found
        self._check_settings(ckpt["config"], path)
        self.resumed_from, self.saved = path, ckpt["config"]
        return ckpt

    def _auto(self) -> tuple[Path, dict] | None:
        last, previous = self.path / LAST, self.path / PREVIOUS
        if not last.is_file() and not previous.is_file():
            self.console.print(f"--resume auto: no {LAST} in {self.path}, starting from step 0")
            return None
        try:
            if not last.is_file():  # a save that stopped between its two renames
                raise HnmixError(f"{last} is missing")
            return last, load_checkpoint(last)
        except HnmixError as e:
            if not previous.is_file():
                raise
            ckpt = load_checkpoint(previous)
            self.console.print(f"[yellow]warning:[/] {e}; resuming from {previous} (step {ckpt['step']}) instead",
                               soft_wrap=True, highlight=False)
            self.unreadable = last if last.is_file() else None
            return previous, ckpt

    @staticmethod
    def changes(saved: dict, cfg) -> list[Change]:
        """How cfg differs from a checkpoint's settings (the sections of methods neither selects aside)."""
        return [c for c in setting_changes(type(cfg), cfg.experiment(saved), cfg.to_yaml_dict())
                if c.key not in NOT_RECORDED]

    def _check_settings(self, saved: dict, path: Path) -> None:
        """Refuse a change of a fixed setting that --allow-change does not name; nothing is written yet."""
        allowed = self.cfg.allow_change
        refused = [c for c in self.changes(saved, self.cfg)
                   if c.fixed and not any(c.key == a or c.key.startswith(a + ".") for a in allowed)]
        if refused:
            diffs = "; ".join(map(str, refused))
            keys = " ".join(f"--allow-change {c.key}" for c in refused)
            raise HnmixError(f"cannot resume {path} with other settings of its experiment ({diffs}): give the "
                             f"run's values, or {keys} to change it on purpose (recorded in {HISTORY})")

    # ------------------------------------------------------------------------------------ writing

    def prepare(self, step: int, cfg) -> None:
        """Write what a start writes (main rank): config.yaml for a new run (a resumed one keeps the file it
        started with), metrics.jsonl trimmed to the resumed step, a history.jsonl line. cfg: the run's
        settings as resolved (the pipeline auto chose, ...)."""
        if not self.info.is_main:
            return
        if self.resumed_from is None or not (self.path / "config.yaml").is_file():
            cfg.save_yaml(self.path / "config.yaml")
        truncate_metrics(self.path / "metrics.jsonl", step)
        sweep_temporaries(self.path)  # the lock says no one else writes here
        if self.unreadable is not None:  # kept for a look, out of the way of the next save's rotation
            os.replace(self.unreadable, self.path / UNREADABLE)
        changes = self.changes(self.saved, cfg) if self.resumed_from is not None else []
        record = {"event": "resume" if self.resumed_from is not None else "start", "step": step,
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
                  "pid": os.getpid(), "hnmix": __version__,
                  "from": str(self.resumed_from) if self.resumed_from is not None else None,
                  "changed": {c.key: {"old": c.old, "new": c.new} for c in changes if c.fixed},
                  "free_changed": {c.key: {"old": c.old, "new": c.new} for c in changes if not c.fixed}}
        with open(self.path / HISTORY, "a") as f:
            f.write(json.dumps(record) + "\n")

    def abandon(self) -> None:
        """A run that failed before saving anything leaves no half-made directory behind (a new one only)."""
        if self.info.is_main and self.created is not None and self.path.is_dir() and not (self.path / LAST).exists():
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self.path.parents:  # the folders made for it, while empty: another run may use one now
                if parent == self.created.parent:
                    break
                try:
                    parent.rmdir()
                except OSError:
                    break


def recorded_changes(run_dir: Path) -> list[dict]:
    """The deliberate changes of fixed settings in a run's history: [{key, old, new, step}], oldest first."""
    path = Path(run_dir) / HISTORY
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash: the others still count
                continue
            out += [{"key": k, **v, "step": record.get("step")} for k, v in record.get("changed", {}).items()]
    return out
