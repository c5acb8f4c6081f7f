"""Read backbone weights from the three formats users bring.

- an hnmix checkpoint (``last.pt`` ...): ``{"format": "hnmix-checkpoint", "model": MoCo state dict, "config": ...}``
- an hnmix ``backbone.pt``: a plain timm state dict (no prefix, no head)
- an official MoCo checkpoint: ``{"state_dict": {"module.encoder_q.<torchvision resnet keys>", ...}, "arch": ...}``
  (torchvision and timm ResNets share parameter names, so these load into timm ResNets as they are)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hnmix.core.io import load_torch_dict
from hnmix.errors import HnmixError

CHECKPOINT_FORMAT = "hnmix-checkpoint"
_Q_BACKBONE = "encoder_q.backbone."
_MOCO_Q = "module.encoder_q."


@dataclass
class BackboneWeights:
    state_dict: dict[str, torch.Tensor]
    source: str  # "hnmix-checkpoint" | "backbone" | "moco"
    path: Path
    arch: str | None = None
    cifar_stem: bool | None = None
    config: dict = field(default_factory=dict)


def load_backbone_weights(path: str | Path) -> BackboneWeights:
    obj = load_torch_dict(path)
    path = Path(path)
    if obj.get("format") == CHECKPOINT_FORMAT:
        cfg = obj.get("config", {})
        sd = {k[len(_Q_BACKBONE):]: v for k, v in obj["model"].items() if k.startswith(_Q_BACKBONE)}
        return BackboneWeights(sd, "hnmix-checkpoint", path, cfg.get("arch"), cfg.get("cifar_stem"), cfg)
    if isinstance(obj.get("state_dict"), dict) and any(k.startswith(_MOCO_Q) for k in obj["state_dict"]):
        sd = {
            k[len(_MOCO_Q):]: v for k, v in obj["state_dict"].items()
            if k.startswith(_MOCO_Q) and not k.startswith(_MOCO_Q + "fc.")
        }
        return BackboneWeights(sd, "moco", path, obj.get("arch"))
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return BackboneWeights(dict(obj), "backbone", path)
    raise HnmixError(
        f"{path} is not an hnmix checkpoint, an hnmix backbone.pt, or an official MoCo checkpoint"
    )


def resolve_arch(weights: BackboneWeights, arch: str | None, cifar_stem: bool | None) -> tuple[str, bool]:
    """The checkpoint's own arch wins; a conflicting --arch is an error, a missing one for plain files too."""
    if weights.arch and arch and arch != weights.arch:
        raise HnmixError(f"--arch {arch} does not match the checkpoint's arch {weights.arch} ({weights.path})")
    if weights.cifar_stem is not None and cifar_stem is not None and cifar_stem != weights.cifar_stem:
        raise HnmixError(f"--cifar-stem={cifar_stem} does not match the checkpoint ({weights.path})")
    final = weights.arch or arch
    if not final:
        raise HnmixError(f"{weights.path} does not say its architecture: pass --arch")
    stem = weights.cifar_stem if weights.cifar_stem is not None else bool(cifar_stem)
    return final, stem


def build_backbone(
    weights: BackboneWeights, arch: str | None = None, cifar_stem: bool | None = None
) -> tuple[nn.Module, str, bool]:
    """A timm backbone (no classifier) holding these weights, loaded strictly."""
    from hnmix.models.backbone import create_backbone

    arch, stem = resolve_arch(weights, arch, cifar_stem)
    model = create_backbone(arch, cifar_stem=stem)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights.state_dict))
    unexpected = sorted(set(weights.state_dict) - set(expected))
    wrong = [k for k in expected if k in weights.state_dict and weights.state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} of another shape (e.g. {wrong[0]})")
        raise HnmixError(
            f"{weights.path} does not fit {arch}{' with CIFAR stem' if stem else ''}: " + ", ".join(parts)
        )
    model.load_state_dict(weights.state_dict, strict=True)
    return model, arch, stem
