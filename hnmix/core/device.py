"""Device choice and autocast precision: one definition for pretraining, evaluation and analysis."""

from __future__ import annotations

import torch

from hnmix.errors import HnmixError

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_device(pref: str = "auto", index: int | None = None) -> torch.device:
    """'auto' = CUDA when available; 'cuda' without a GPU is the user's error, said in one line."""
    if pref == "cuda" and not torch.cuda.is_available():
        raise HnmixError("--device cuda was asked for, but no CUDA device is available")
    if pref == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting (None = fp32, no autocast); auto = bf16 on GPU, fp32 on CPU."""
    choice = precision if precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    if choice == "fp16" and device.type != "cuda":
        raise HnmixError("--precision fp16 needs a GPU; use bf16 or fp32 on CPU")
    return PRECISIONS[choice]


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def enable_fast_kernels(device: torch.device) -> None:
    """cuDNN autotuning: a training step repeats the same shapes, so the first step's search pays off.
    (TF32 stays off: logits and loss are promised in fp32.)"""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA): timings must see the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
