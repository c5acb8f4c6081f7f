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
import yaml
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
    config_source: str = "the checkpoint's"  # whose arch, stem and image size these are: for messages


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
        cfg, where = run_config_beside(path)
        return BackboneWeights(dict(obj), "backbone", path, cfg.get("arch"), cfg.get("cifar_stem"), cfg, where)
    raise HnmixError(
        f"{path} is not an hnmix checkpoint, an hnmix backbone.pt, or an official MoCo checkpoint"
    )


def run_config_beside(path: Path) -> tuple[dict, str]:
    """The settings of the run a backbone.pt comes from: hnmix writes config.yaml beside it. ({}, "") if none."""
    config = path.parent / "config.yaml"
    try:
        cfg = yaml.safe_load(config.read_text()) if config.is_file() else None
    except (OSError, yaml.YAMLError):
        cfg = None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("arch"), str):
        return {}, ""
    return cfg, f"the run's ({config})"


def choose_image_size(flag: int | None, trained: int | None, source: str, console) -> int:
    """--image-size, else the size the weights were trained at (their checkpoint, or the config.yaml beside a
    backbone.pt), else 224; a flag that contradicts the run is honoured, with a warning."""
    if flag and trained and flag != trained:
        console.print(f"[yellow]warning:[/] --image-size {flag} differs from {source} image size {trained}; "
                      f"evaluating at {flag} px", soft_wrap=True)
    return flag or trained or 224


def resolve_arch(weights: BackboneWeights, arch: str | None, cifar_stem: bool | None) -> tuple[str, bool]:
    """The weights' own arch wins (checkpoint, or the run's config.yaml beside a backbone.pt); a conflicting
    --arch is an error (the weights could not load), a missing one for plain files too."""
    if weights.arch and arch and arch != weights.arch:
        raise HnmixError(f"--arch {arch} does not match {weights.config_source} arch {weights.arch} "
                         f"({weights.path})")
    if weights.cifar_stem is not None and cifar_stem is not None and cifar_stem != weights.cifar_stem:
        typed, saved = ("--cifar-stem", "--no-cifar-stem") if cifar_stem else ("--no-cifar-stem", "--cifar-stem")
        raise HnmixError(f"{typed} does not match {weights.config_source} stem ({saved}; {weights.path})")
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
    model = create_backbone(arch, cifar_stem=stem, image_size=weights.config.get("image_size"))  # a ViT's size
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
