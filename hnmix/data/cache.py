"""Where decoded data and lookup tables are cached: $HNMIX_CACHE_DIR, else $XDG_CACHE_HOME/hnmix, else
~/.cache/hnmix. Datasets are often read-only or shared, and a run directory would rebuild them every run."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    if os.environ.get("HNMIX_CACHE_DIR"):
        return Path(os.environ["HNMIX_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hnmix"
