"""Atomic checkpoints as plain dicts that load with torch.load(..., weights_only=True)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from hnmix.core.io import load_torch_dict
from hnmix.errors import HnmixError
from hnmix.models.weights import CHECKPOINT_FORMAT

FORMAT_VERSION = 1
LAST, PREVIOUS = "last.pt", "last.prev.pt"  # the newest checkpoint of a run, and the one before it


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy"]["keys"].numpy().astype(np.uint32), state["numpy"]["pos"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_checkpoint(*, model, optimizer, scaler, epoch: int, step: int, config: dict) -> dict:
    return {
        "format": CHECKPOINT_FORMAT,
        "version": FORMAT_VERSION,
        "model": model.state_dict(),  # includes queue and queue_ptr
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,  # epochs completed
        "step": step,  # optimizer steps completed; the LR schedule and data order resume from it
        "rng": rng_state(),
        "config": config,
    }


def load_checkpoint(path: Path) -> dict:
    ckpt = load_torch_dict(path)
    if ckpt.get("format") != CHECKPOINT_FORMAT or "optimizer" not in ckpt:
        raise HnmixError(f"{path} is not an hnmix training checkpoint (cannot resume from it)")
    return ckpt
