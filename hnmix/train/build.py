"""Building what a run trains: the batch-norm policy for this world, the MoCo model, the method's strategy."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hnmix.config import BatchNorm
from hnmix.errors import HnmixError
from hnmix.models.backbone import check_image_size, convert_split_bn, count_batchnorms, create_backbone
from hnmix.models.moco import MoCo
from hnmix.negatives import METHODS
from hnmix.negatives.base import Strategy


def batch_norm_for(cfg, world: int, local_batch: int, device: torch.device) -> BatchNorm:
    """--bn resolved for this world and per-rank batch; refuses what cannot run."""
    bn = cfg.batch_norm.resolve(world, local_batch)
    if local_batch % bn.groups or (bn.groups > 1 and local_batch // bn.groups < 2):
        raise HnmixError(f"per-rank batch {local_batch} does not split into {bn.groups} BN groups of 2 or more "
                         f"(--bn {bn})")
    if bn.mode == "sync" and world > 1 and device.type != "cuda":
        raise HnmixError("--bn sync needs GPUs (SyncBatchNorm has no CPU kernel); use --bn shuffle")
    return bn


def build_model(cfg, bn: BatchNorm, world: int, warn: Callable[[str], object]) -> MoCo:
    """The MoCo model of cfg with the batch-norm policy bn (resolved); warns where bn has no effect."""
    backbone = create_backbone(cfg.arch, cfg.cifar_stem, cfg.zero_init_residual, cfg.image_size)
    check_image_size(backbone, cfg.arch, cfg.image_size)
    plain, other = count_batchnorms(backbone)
    if bn.mode != "plain" and plain == 0:
        warn(f"[yellow]warning:[/] {cfg.arch} has no BatchNorm2d: --bn {bn} has no effect")
    if bn.mode == "shuffle" and world == 1:
        warn("[yellow]warning:[/] shuffle BN is a no-op in one process; --bn split:8 emulates it")
    if bn.groups > 1:
        convert_split_bn(backbone, bn.groups)
        if other:
            warn(f"[yellow]warning:[/] {other} non-plain batch-norm layers are not split")
    model = MoCo(backbone, dim=cfg.dim, K=cfg.queue_size, m=cfg.momentum, T=cfg.temperature, mlp=cfg.mlp,
                 shuffle_keys=bn.shuffles_keys, symmetric=cfg.symmetric)
    if bn.mode == "sync" and world > 1:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def build_strategy(cfg) -> Strategy | None:
    """The selected method's hard negatives (None: MoCo-v2's queue as it is)."""
    options = cfg.method_settings
    return None if options is None else METHODS[cfg.method].strategy(options)
