"""The query/key encoders (and queue) of a weights file, for analysis in head or backbone feature space.

hnmix checkpoints and official MoCo checkpoints hold the whole MoCo model (heads, key encoder, queue);
a plain backbone.pt holds only the backbone, so it serves backbone features with one encoder for both views.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hnmix.config import PretrainConfig
from hnmix.core.io import load_torch_dict
from hnmix.core.settings import migrate_values
from hnmix.data.augment.settings import AugmentSettings
from hnmix.errors import HnmixError
from hnmix.models.moco import MoCo
from hnmix.models.weights import CHECKPOINT_FORMAT, build_backbone, load_backbone_weights

# buffers a checkpoint may or may not carry, depending on the hnmix version that wrote it
OPTIONAL_KEYS = ("queue_labels",)
_MOCO = "module."


@dataclass
class Encoders:
    path: Path
    source: str  # hnmix-checkpoint | moco | backbone
    arch: str
    query: nn.Module  # image -> unnormalised features
    key: nn.Module
    queue: torch.Tensor | None  # (K, D) unit rows, head space only
    queue_labels: torch.Tensor | None  # (K,) long, -1 = unknown
    temperature: float | None
    mochi: dict | None  # the checkpoint's MoCHi N, s, s' when it trained with MoCHi
    image_size: int | None
    epoch: int | None
    config_source: str = "the checkpoint's"
    augment: AugmentSettings | None = None  # the run's augmentations (None: MoCo v2's)
    eval_transform: str | None = None  # the eval transform the run recorded (None: not recorded)


def official_to_hnmix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """facebookresearch/moco keys -> hnmix MoCo keys: fc.* is the projection head, the queue is (dim, K)."""
    out = {}
    for key, value in sd.items():
        name = key.removeprefix(_MOCO)
        for enc in ("encoder_q.", "encoder_k."):
            if name.startswith(enc):
                rest = name[len(enc):]
                name = enc + ("head." + rest[3:] if rest.startswith("fc.") else "backbone." + rest)
        if name == "queue":
            value = value.T.contiguous()
        if name == "queue_ptr":
            value = value.reshape(())
        out[name] = value
    return out


def _moco_shape(sd: dict[str, torch.Tensor], path: Path) -> tuple[int, int, bool]:
    """(dim, K, mlp) read off the state dict itself."""
    if "queue" not in sd:
        raise HnmixError(f"{path} holds no MoCo queue")
    K, dim = sd["queue"].shape
    return dim, K, "encoder_q.head.0.weight" in sd


def load_encoders(path: str | Path, features: str, arch: str | None = None,
                  cifar_stem: bool | None = None) -> Encoders:
    weights = load_backbone_weights(path)
    backbone, arch, _ = build_backbone(weights, arch, cifar_stem)  # strict: clear errors on arch mismatch
    if weights.source == "backbone":
        if features == "head":
            raise HnmixError(f"{weights.path} holds only a backbone (no projection head, no queue): "
                             f"use --features backbone")
        backbone.eval()
        return Encoders(weights.path, "backbone", arch, backbone, backbone, None, None, None, None,
                        weights.config.get("image_size"), None, weights.config_source,
                        eval_transform=weights.config.get("eval_transform"))

    obj = load_torch_dict(path)
    if weights.source == CHECKPOINT_FORMAT:
        sd, cfg, epoch = dict(obj["model"]), obj.get("config", {}), obj.get("epoch")
    else:
        sd, cfg, epoch = official_to_hnmix(obj["state_dict"]), {}, obj.get("epoch")
    dim, K, mlp = _moco_shape(sd, weights.path)
    model = MoCo(backbone, dim=dim, K=K, mlp=mlp)
    optional = {k: sd.pop(k) for k in OPTIONAL_KEYS if k in sd and k not in model.state_dict()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in OPTIONAL_KEYS]
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise HnmixError(f"{weights.path} does not fit a MoCo model on {arch} (dim {dim}, K {K}): "
                         f"{len(missing)} missing, {len(unexpected)} unexpected keys (e.g. {bad})")
    model.eval()
    labels = optional.get("queue_labels", getattr(model, "queue_labels", None))
    if labels is not None and bool((labels < 0).all()):
        labels = None  # nothing known: as if absent
    cfg = migrate_values(PretrainConfig, cfg)  # runs of older versions saved MoCHi's options flat
    mochi = {k: cfg["mochi"][k] for k in ("n_hard", "s", "s_prime")} if cfg.get("method") == "mochi" else None
    if features == "head":
        query, key, queue = model.encoder_q, model.encoder_k, model.queue
    else:
        query, key, queue, labels = model.encoder_q.backbone, model.encoder_k.backbone, None, None
    augment = AugmentSettings.model_validate(cfg["augment"]) if "augment" in cfg else None
    return Encoders(weights.path, weights.source, arch, query, key, queue, labels, cfg.get("temperature"), mochi,
                    cfg.get("image_size"), epoch, augment=augment, eval_transform=cfg.get("eval_transform"))


def mochi_defaults() -> dict:
    defaults = PretrainConfig().mochi
    return {k: getattr(defaults, k) for k in ("n_hard", "s", "s_prime")}
