"""Files in and out: atomic writes, and loading user files without ever executing code from them."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from hnmix.errors import HnmixError


class _WriteErrors:
    """A file that remembers the OSError of a failed write: torch.save reports a full disk (ENOSPC, EFBIG) as
    an opaque RuntimeError about stream positions, and the cause is what the user needs."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def fsync_dir(path: Path) -> None:
    """Make renames in a directory durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_beside(path: Path) -> Path:
    """Where a file is written before its rename into place: hidden, and this process's own."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def sweep_temporaries(directory: Path) -> None:
    """Remove what saves a kill cut short left (temporary_beside's files); the caller is the only writer."""
    for stale in Path(directory).glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def atomic_save(obj, path: str | Path, previous: str | Path | None = None) -> None:
    """Write beside the target, fsync, then rename: a crash leaves the old file or the new one, never half.
    With `previous`, the file being replaced is first renamed to it, once the new one is complete on disk.
    A failed write (full disk) raises its OSError and leaves every existing file as it was."""
    path = Path(path)
    tmp = temporary_beside(path)
    try:
        with open(tmp, "wb") as f:
            out = _WriteErrors(f)
            try:
                torch.save(obj, out)
            except RuntimeError:
                if out.error is not None:
                    raise out.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.exists():
            keep_as_previous(path, Path(previous))
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def keep_as_previous(path: Path, previous: Path) -> None:
    """`previous` becomes the file now at `path`, while `path` stays in place: a hard link under a temporary
    name renamed over `previous`, so a kill at any point leaves `path` whole (the next rename replaces it
    atomically). Without hard links (some FUSE or SMB mounts) it falls back to a rename, whose short window
    without `path` the resume covers by reading `previous`."""
    link = temporary_beside(previous)
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
    except OSError:
        os.replace(path, previous)
        return
    try:
        os.replace(link, previous)
    finally:
        link.unlink(missing_ok=True)


def load_torch_dict(path: str | Path) -> dict:
    """A torch file holding a dict, loaded with weights_only=True (tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise HnmixError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if found := re.search(r"(?i)unsupported global:?\s+(?:GLOBAL\s+)?([\w.]+)", str(e)):  # maybe code
            raise HnmixError(f"{path} holds a pickled {found.group(1)}, not only tensors and plain containers; "
                             "hnmix never unpickles objects from a weights file") from None
        raise HnmixError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    except Exception as e:  # zip errors, truncated files: all mean "not a checkpoint"
        raise HnmixError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise HnmixError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts, lists, numbers, strings and numpy arrays; refuses every other global, so a crafted
    file cannot run code (pickle's REDUCE only ever calls what find_class returned)."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("builtins", "set"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_arrays_pickle(path: str | Path) -> dict:
    """A pickled dict of numpy arrays (detectron2's .pkl weights), read without executing code."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = _ArraysOnly(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise HnmixError(f"{path} is not a plain pickle of arrays ({e}); hnmix never unpickles code") from None
    except Exception as e:  # truncated, not a pickle at all
        raise HnmixError(f"{path} is not a readable pickle ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise HnmixError(f"{path} holds a {type(data).__name__}, not a weights dict")
    return data

