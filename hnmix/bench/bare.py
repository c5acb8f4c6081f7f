"""The bare MoCo-v2 step: the yardstick of `hnmix bench` (share_of_bare = real step img/s / this one's).

A plain timm encoder with an MLP head and its momentum copy, plain BatchNorm, no key shuffle, a queue of K
unit keys, InfoNCE at T=0.2 with fp32 logits and loss, SGD (momentum 0.9, weight decay 1e-4), the queue write:
nothing else. Written apart from hnmix.models.moco on purpose: a reference must not share what it measures.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from hnmix.core.device import autocast_dtype, enable_fast_kernels
from hnmix.data.augment import Normalize
from hnmix.models.backbone import create_backbone


def synthetic_views(batch_size: int, image_size: int, device: torch.device,
                    channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Two normalised random batches made on the device (the same draws for the real and the bare step)."""
    g = torch.Generator(device=device).manual_seed(0)
    normalize = Normalize(channels_last=channels_last).to(device)
    return tuple(normalize(torch.randint(0, 256, (batch_size, 3, image_size, image_size), generator=g,
                                         device=device, dtype=torch.uint8)) for _ in range(2))


def mlp_encoder(arch: str, cifar_stem: bool, dim: int, mlp: bool, image_size: int | None = None) -> nn.Module:
    backbone = create_backbone(arch, cifar_stem, image_size=image_size)
    width = backbone.num_features
    head = nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim)) if mlp \
        else nn.Linear(width, dim)
    return nn.Sequential(backbone, head)


class BareStep:
    """One MoCo-v2 step per call on fixed views; returns the loss (detached, on the device)."""

    def __init__(self, encoder: nn.Module, views: tuple[torch.Tensor, torch.Tensor], queue_size: int, dim: int,
                 dtype: torch.dtype | None, T: float = 0.2, m: float = 0.999, lr: float = 0.03):
        self.device = views[0].device
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder).requires_grad_(False)
        self.views, self.dtype, self.T, self.m = views, dtype, T, m
        self.queue = F.normalize(torch.randn(queue_size, dim, device=self.device), dim=1)
        self.ptr = 0
        self.offsets = torch.arange(views[0].shape[0], device=self.device)
        self.targets = torch.zeros(views[0].shape[0], dtype=torch.long, device=self.device)  # positive: column 0
        self.q_params, self.k_params = list(encoder.parameters()), list(self.encoder_k.parameters())
        self.optimizer = torch.optim.SGD(self.q_params, lr=lr, momentum=0.9, weight_decay=1e-4)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=dtype == torch.float16)

    cudagraphs = False  # encoders compiled with reduce-overhead: mark each step's start

    def __call__(self) -> torch.Tensor:
        im_q, im_k = self.views
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            q = F.normalize(self.encoder_q(im_q).float(), dim=1)
            with torch.no_grad():
                torch._foreach_lerp_(self.k_params, self.q_params, 1.0 - self.m)
                k = F.normalize(self.encoder_k(im_k).float(), dim=1)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.queue.T], dim=1)  # fp32: outside autocast
        loss = F.cross_entropy(logits / self.T, self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():  # after the backward, so the queue autograd saved is never written over
            self.queue.index_copy_(0, (self.offsets + self.ptr) % len(self.queue), k)
        self.ptr = (self.ptr + len(k)) % len(self.queue)
        return loss.detach()


def bare_step_timer(arch: str, cifar_stem: bool, image_size: int, batch_size: int, queue_size: int, dim: int,
                    mlp: bool, device: torch.device, precision: str, channels_last: bool, compile: bool,
                    mode: str = "default",
                    views: tuple[torch.Tensor, torch.Tensor] | None = None) -> BareStep:
    """The bare step on `views` (default: synthetic_views, the same draws as `hnmix bench --data synthetic`)."""
    enable_fast_kernels(device)  # cudnn.benchmark on CUDA
    encoder = mlp_encoder(arch, cifar_stem, dim, mlp, image_size).to(device)
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    if views is None:
        views = synthetic_views(batch_size, image_size, device, channels_last)
    step = BareStep(encoder, views, queue_size, dim, autocast_dtype(precision, device), lr=0.03 * batch_size / 256)
    if compile:  # in place, as the real step compiles its encoders
        step.encoder_q.compile(mode=mode)
        step.encoder_k.compile(mode=mode)
        step.cudagraphs = "reduce-overhead" in mode
    return step
