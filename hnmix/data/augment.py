"""MoCo-v2 augmentations (aug+) on PIL images, returning uint8 tensors; normalisation happens on device."""

from __future__ import annotations

import torch
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def blur_kernel(size: int) -> int:
    """About 10 % of the crop, odd, as in SimCLR/MoCo-v2 (MoCo's PIL blur has no kernel size to copy)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def moco_v2_augment(size: int) -> T.Compose:
    """RandomResizedCrop(0.2-1), ColorJitter(0.4,0.4,0.4,0.1) p0.8, grayscale p0.2, blur sigma 0.1-2 p0.5, flip.

    Every random draw goes through torch's global RNG, which the caller seeds per sample.
    """
    return T.Compose([
        T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))], p=0.5),
        T.RandomHorizontalFlip(),
        T.PILToTensor(),
    ])


class Normalize(torch.nn.Module):
    """uint8 (B, 3, H, W) -> float normalised, on the device, in the requested memory format."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last: bool = False):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1) * 255, persistent=False)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)
