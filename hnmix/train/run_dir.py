"""The run directory: refuses to overwrite a run, finds the checkpoint to resume, writes config.yaml and trims
metrics.jsonl to the resumed step; removes what it made when a new run fails before its first checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

from rich.console import Console

from hnmix.core.dist import DistInfo
from hnmix.core.log import truncate_metrics
from hnmix.errors import HnmixError


class RunDirectory:
    def __init__(self, cfg, info: DistInfo, console: Console):
        self.cfg, self.info, self.console = cfg, info, console
        self.path = Path(cfg.output)
        if self.path.exists() and not self.path.is_dir():
            raise HnmixError(f"--output {self.path} is a file, not a directory")
        self.existed = self.path.exists()
        last = self.path / "last.pt"
        if cfg.resume is None and last.is_file():  # never overwrite a run by accident
            raise HnmixError(f"{self.path} already holds a run (last.pt); --resume auto continues it, or choose "
                             f"another --output (or delete the directory) to start afresh")

    def resume_from(self) -> Path | None:
        if self.cfg.resume == "auto":
            last = self.path / "last.pt"
            if last.is_file():
                return last
            self.console.print(f"--resume auto: no last.pt in {self.path}, starting from step 0")
            return None
        return Path(self.cfg.resume) if self.cfg.resume else None

    def prepare(self, step: int, cfg) -> None:
        """cfg: the run's settings as resolved (the pipeline auto chose, ...)."""
        if self.info.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            cfg.save_yaml(self.path / "config.yaml")
            truncate_metrics(self.path / "metrics.jsonl", step)

    def abandon(self) -> None:
        """A run that failed before saving anything leaves no half-made directory behind (a new one only)."""
        if self.info.is_main and not self.existed and self.path.is_dir() and not (self.path / "last.pt").exists():
            shutil.rmtree(self.path, ignore_errors=True)
