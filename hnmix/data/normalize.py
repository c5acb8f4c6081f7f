"""Normalisation on the device, the last step of every pipeline and of evaluation: ImageNet statistics, in
the memory format the model wants."""

from __future__ import annotations

import torch

from hnmix.data.augment.settings import IMAGENET_MEAN, IMAGENET_STD


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Floats in [0, 1] (the tensor ops' views) -> normalised, mean and std shaped (1, 3, 1, 1)."""
    return ((x - mean) / std).contiguous(memory_format=memory_format)


class Normalize(torch.nn.Module):
    """uint8 (B, 3, H, W) -> float normalised, on the device, in the requested memory format."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalize(x.float(), self.mean, self.std, self.memory_format)
