"""Batched feature extraction with a frozen network (eval mode, no grad), sharded over DDP ranks if any."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
from rich.progress import Progress
from torch import nn

from hnmix.core.dist import all_gather, rank_and_world
from hnmix.data.labelled import Labelled, choose_eval_transform, eval_resize
from hnmix.errors import HnmixError


def make_loader(dataset, batch_size: int, workers: int, device: torch.device, shuffle: bool = False,
                generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    # more workers than cores or than batches only adds process start-up time
    workers = min(workers, os.cpu_count() or 1, math.ceil(len(dataset) / batch_size))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, generator=generator,
        pin_memory=device.type == "cuda", persistent_workers=False,
    )


@torch.no_grad()
def extract_features(
    model: Callable[[torch.Tensor], torch.Tensor], dataset, *, batch_size: int, workers: int,
    device: torch.device, normalize: nn.Module, dtype: torch.dtype | None = None,
    progress: Progress | None = None, description: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 features on `device` and (N,) labels, in dataset order; modules run in eval mode."""
    modules = [model] if isinstance(model, nn.Module) else []
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    loader = make_loader(dataset, batch_size, workers, device)
    task = progress.add_task(description, total=len(loader), info="") if progress else None
    feats, labels = [], []
    try:
        for x, y in loader:
            x = normalize(x.to(device, non_blocking=True))
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                feats.append(model(x).float())
            labels.append(y.to(device, non_blocking=True))
            if task is not None:
                progress.advance(task)
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    if not feats:
        raise HnmixError("no images to extract features from")
    return torch.cat(feats), torch.cat(labels)


def resize_center_crop(x: torch.Tensor, size: int, short: int) -> torch.Tensor:
    """eval_transform on a uint8 batch on the device: short side to `short` (antialiased bilinear, as PIL's;
    nothing when it is already that size), then the central size x size crop; float in 0-255."""
    height, width = x.shape[-2:]
    scale = short / min(height, width)
    new = (max(short, round(height * scale)), max(short, round(width * scale)))
    x = x.float()
    if new != (height, width):
        x = torch.nn.functional.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
    top, left = round((new[0] - size) / 2), round((new[1] - size) / 2)  # torchvision's CenterCrop
    return x[..., top:top + size, left:left + size].clamp(0, 255).round()


@torch.no_grad()
def extract_resident(model, images: torch.Tensor, labels: torch.Tensor, *, size: int, batch_size: int,
                     normalize: nn.Module, dtype: torch.dtype | None = None,
                     eval_choice: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) features and (N,) labels of device-resident uint8 images of one size (the eval transform done on
    the device), every rank extracting 1/world of them; rows in dataset order on every rank."""
    short = eval_resize(size, choose_eval_transform(size, eval_choice))
    rank, world = rank_and_world()
    n = images.shape[0]
    mine = torch.tensor(rank_shard(n, rank, world, pad=world > 1), device=images.device)
    training = model.training
    model.eval()
    feats = []
    try:
        for chunk in mine.split(batch_size):
            x = normalize(resize_center_crop(images[chunk], size, short))
            with torch.autocast(images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                feats.append(model(x).float())
    finally:
        model.train(training)
    feats, mine_labels = torch.cat(feats), labels[mine]
    if world == 1:
        return feats, mine_labels
    per = feats.shape[0]
    feats = all_gather(feats).view(world, per, -1).transpose(0, 1).reshape(world * per, -1)[:n]
    return feats, all_gather(mine_labels).view(world, per).T.reshape(-1)[:n]


def rank_shard(n: int, rank: int, world: int, pad: bool) -> list[int]:
    """Indices rank, rank + world, ...; padded with repeats to ceil(n / world) so all_gather shapes match."""
    indices = list(range(rank, n, world))
    if pad:
        indices += (indices or [0])[-1:] * (math.ceil(n / world) - len(indices))
    return indices


def extract_all_ranks(model, images, transform, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of every image in order, each rank extracting 1/world of them (identity without DDP)."""
    rank, world = rank_and_world()
    n = len(images)
    feats, labels = extract_features(model, Labelled(images, transform, rank_shard(n, rank, world, pad=world > 1)),
                                     **kwargs)
    if world == 1:
        return feats, labels
    # gathered rows are rank-major; image i*world + r sits at row r*per + i
    per = feats.shape[0]
    feats = all_gather(feats).view(world, per, -1).transpose(0, 1).reshape(world * per, -1)[:n]
    labels = all_gather(labels).view(world, per).T.reshape(-1)[:n]
    return feats, labels
