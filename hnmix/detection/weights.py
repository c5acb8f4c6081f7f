"""`--weights` of transfer-detect: what file detectron2 loads, and which input convention it needs.

Weights pretrained the torchvision way need RGB input, ImageNet mean/std in 0-255 and the stride in the
3x3 conv; detectron2's defaults are the opposite (BGR caffe MSRA weights). Getting this wrong silently
costs several AP, so every source says which convention it needs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hnmix.core.io import load_arrays_pickle, load_torch_dict
from hnmix.errors import HnmixError
from hnmix.models.export import ResNetSpec, detectron2_settings, settings_path, write_detectron2
from hnmix.models.weights import load_backbone_weights

CONVENTION_KEYS = ("MODEL.PIXEL_MEAN", "MODEL.PIXEL_STD", "INPUT.FORMAT", "MODEL.RESNETS.DEPTH",
                   "MODEL.RESNETS.STRIDE_IN_1X1", "MODEL.RESNETS.NUM_GROUPS", "MODEL.RESNETS.WIDTH_PER_GROUP",
                   "MODEL.RESNETS.RES2_OUT_CHANNELS")
_TORCHVISION_AUTHORS = ("hnmix", "MOCO")
_D2_DEPTH_FROM_RES4 = {6: 50, 23: 101, 36: 152}


@dataclass
class DetectionWeights:
    path: str  # what MODEL.WEIGHTS gets; "" = random init
    description: str
    settings: dict[str, Any] = field(default_factory=dict)  # flat detectron2 keys
    notes: list[str] = field(default_factory=list)


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _convention(tree: dict) -> dict[str, Any]:
    flat = flatten(tree)
    return {k: flat[k] for k in CONVENTION_KEYS if k in flat}


def _torchvision_convention(depth: int = 50) -> dict[str, Any]:
    return _convention(detectron2_settings(ResNetSpec(depth, (3, 4, 6, 3), True)))


def _read_yaml(path: Path) -> dict:
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HnmixError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    return tree if isinstance(tree, dict) else {}


def _from_pkl(path: Path) -> DetectionWeights:
    data = load_arrays_pickle(path)  # arrays and plain containers only: never runs code from the file
    author = data.get("__author__", "unknown")
    sidecar = settings_path(path)
    if sidecar.is_file():
        return DetectionWeights(str(path), f"{path.name} (settings from {sidecar.name})", _convention(_read_yaml(sidecar)))
    if author in _TORCHVISION_AUTHORS:
        blocks = {m.group(1) for k in data.get("model", {}) if (m := re.match(r"res4\.(\d+)\.", k))}
        depth = _D2_DEPTH_FROM_RES4.get(len(blocks), 50)
        return DetectionWeights(str(path), f"{path.name} ({author} conversion, R{depth})", _torchvision_convention(depth))
    return DetectionWeights(str(path), f"{path.name} (author {author})", {},
                            [f"{path.name} has no {sidecar.name} beside it and is not an hnmix/MoCo conversion: "
                             "detectron2's default input convention (BGR, caffe mean/std) is assumed"])


def _from_detectron2_checkpoint(path: Path) -> DetectionWeights:
    data = load_torch_dict(path)  # weights_only: tensors and plain containers, never code
    if not isinstance(data.get("model"), dict):
        raise HnmixError(f"{path} is neither an hnmix/MoCo checkpoint nor a detectron2 checkpoint")
    run_config = path.parent / "config.yaml"  # a transfer-detect (or train_net) run directory
    settings = _convention(_read_yaml(run_config)) if run_config.is_file() else {}
    notes = [] if settings else [f"no config.yaml beside {path.name}: detectron2's default input convention assumed"]
    return DetectionWeights(str(path), f"{path.name} (detectron2 checkpoint)", settings, notes)


def resolve_weights(spec: str, output: Path) -> DetectionWeights:
    if spec.lower() == "none":
        return DetectionWeights("", "none (random init baseline)", _torchvision_convention())
    path = Path(spec)
    if path.suffix == ".pkl":
        return _from_pkl(path)
    try:
        weights = load_backbone_weights(path)
    except HnmixError:
        if path.suffix == ".pth":
            return _from_detectron2_checkpoint(path)
        raise
    target = output / "pretrained_backbone.pkl"
    _, settings, spec_ = write_detectron2(weights, target)
    return DetectionWeights(str(target), f"{path.name} ({weights.source}, R{spec_.depth}, converted on the fly)",
                            _convention(settings), [f"converted {path} -> {target}"])
