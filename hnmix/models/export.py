"""`hnmix convert`: export pretrained backbones to detectron2 (.pkl), timm or torchvision state dicts.

The detectron2 mapping is the one of MoCo's ``convert-pretrain-to-detectron2.py`` (stem.*, layerN ->
res(N+1), bnK -> convK.norm, downsample.0/1 -> shortcut / shortcut.norm), applied to the torchvision /
timm ResNet names that every input format shares. Never imports detectron2: converting must work on
machines without it.
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from hnmix.errors import HnmixError
from hnmix.models.weights import BackboneWeights, build_backbone, load_backbone_weights, resolve_arch

# torchvision ImageNet normalisation in 0-255 RGB: what torchvision/timm-style pretraining feeds the network
PIXEL_MEAN_RGB = [123.675, 116.280, 103.530]
PIXEL_STD_RGB = [58.395, 57.120, 57.375]

# block counts of the depths detectron2's ResNet builder knows (build_resnet_backbone)
_DEPTHS = {(2, 2, 2, 2, False): 18, (3, 4, 6, 3, False): 34, (3, 4, 6, 3, True): 50,
           (3, 4, 23, 3, True): 101, (3, 8, 36, 3, True): 152}
# (depth, groups, width per group) -> the torchvision/timm name of that ResNet
_NAMES = {(18, 1, 64): "resnet18", (34, 1, 64): "resnet34", (50, 1, 64): "resnet50",
          (101, 1, 64): "resnet101", (152, 1, 64): "resnet152", (50, 32, 4): "resnext50_32x4d",
          (101, 32, 8): "resnext101_32x8d", (101, 64, 4): "resnext101_64x4d",
          (50, 1, 128): "wide_resnet50_2", (101, 1, 128): "wide_resnet101_2"}
_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


@dataclass(frozen=True)
class ResNetSpec:
    """What detectron2 needs to rebuild a torchvision-layout ResNet (v1.5: stride in the 3x3 conv)."""

    depth: int
    blocks: tuple[int, int, int, int]
    bottleneck: bool
    groups: int = 1
    width_per_group: int = 64

    @property
    def name(self) -> str | None:
        return _NAMES.get((self.depth, self.groups, self.width_per_group))

    @property
    def res2_out_channels(self) -> int:
        return 256 if self.bottleneck else 64


def _strip(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Backbone tensors only: no classifier/projection head, no BN step counters."""
    return {k: v for k, v in state_dict.items()
            if not k.startswith(("fc.", "head.")) and not k.endswith("num_batches_tracked")}


def resnet_keys(spec: ResNetSpec) -> list[str]:
    """Every tensor name (params + BN buffers) of a torchvision ResNet without fc and step counters."""
    keys = ["conv1.weight", *(f"bn1.{s}" for s in _BN_SUFFIXES)]
    convs = (1, 2, 3) if spec.bottleneck else (1, 2)
    for stage, n in enumerate(spec.blocks, start=1):
        for b in range(n):
            p = f"layer{stage}.{b}."
            for c in convs:
                keys += [f"{p}conv{c}.weight", *(f"{p}bn{c}.{s}" for s in _BN_SUFFIXES)]
            if b == 0 and (stage > 1 or spec.bottleneck):
                keys += [f"{p}downsample.0.weight", *(f"{p}downsample.1.{s}" for s in _BN_SUFFIXES)]
    return keys


def inspect_resnet(state_dict: dict[str, torch.Tensor], what: str = "these weights") -> ResNetSpec:
    """The ResNet variant a state dict holds, or a clear refusal for what detectron2 cannot rebuild."""
    sd = _strip(state_dict)
    if "conv1.weight" not in sd or not any(k.startswith("layer1.") for k in sd):
        stem = " (deep 3-conv stem: timm 'c'/'d' variant)" if "conv1.0.weight" in sd else ""
        raise HnmixError(f"{what} are not a torchvision-style ResNet{stem}; detectron2 takes plain "
                         f"ResNet/ResNeXt backbones (resnet50, resnet101, resnext50_32x4d, ...)")
    kernel = tuple(sd["conv1.weight"].shape[2:])
    if kernel != (7, 7):
        raise HnmixError(f"{what} have a {kernel[0]}x{kernel[1]} first conv (CIFAR stem?); detectron2's "
                         "ResNet stem is 7x7 stride 2 with max-pool: pretrain without --cifar-stem")
    blocks = tuple(len({k.split(".")[1] for k in sd if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    bottleneck = "layer1.0.conv3.weight" in sd
    depth = _DEPTHS.get((*blocks, bottleneck))
    if depth is None:
        raise HnmixError(f"{what} are a ResNet with {list(blocks)} blocks per stage; detectron2 builds "
                         "only depths 18, 34, 50, 101 and 152")
    groups, wpg = 1, 64
    if bottleneck:
        width = sd["layer1.0.conv2.weight"].shape[0]
        groups = width // sd["layer1.0.conv2.weight"].shape[1]
        wpg = width // groups
    spec = ResNetSpec(depth, blocks, bottleneck, groups, wpg)
    expected = resnet_keys(spec)
    extra = sorted(set(sd) - set(expected))
    missing = [k for k in expected if k not in sd]
    if extra or missing:
        # e.g. squeeze-excite blocks, avg-pool shortcuts ("d" variants), or a truncated file
        example = f"unexpected {extra[0]}" if extra else f"missing {missing[0]}"
        raise HnmixError(f"{what} are not a plain ResNet-{depth} ({len(extra)} unexpected, {len(missing)} "
                         f"missing tensors, e.g. {example}); timm 'd'/SE variants cannot go to detectron2")
    return spec


def detectron2_name(key: str) -> str:
    """torchvision ResNet name -> detectron2 ResNet name (MoCo's converter, one rule per pattern)."""
    if not key.startswith("layer"):
        key = "stem." + key
    key = re.sub(r"^layer(\d)", lambda m: f"res{int(m.group(1)) + 1}", key)
    key = re.sub(r"(^|\.)bn(\d)\.", r"\1conv\2.norm.", key)
    return key.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def to_detectron2(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {detectron2_name(k): v.detach().cpu().numpy() for k, v in _strip(state_dict).items()}


def detectron2_settings(spec: ResNetSpec) -> dict:
    """Config keys the converted weights need: torchvision conventions, not detectron2's caffe defaults."""
    return {
        "MODEL": {
            "PIXEL_MEAN": PIXEL_MEAN_RGB, "PIXEL_STD": PIXEL_STD_RGB,
            "RESNETS": {"DEPTH": spec.depth, "STRIDE_IN_1X1": False, "NUM_GROUPS": spec.groups,
                        "WIDTH_PER_GROUP": spec.width_per_group,
                        "RES2_OUT_CHANNELS": spec.res2_out_channels},
        },
        "INPUT": {"FORMAT": "RGB"},
    }


def settings_path(pkl_path: str | Path) -> Path:
    return Path(pkl_path).with_suffix(".yaml")


def write_detectron2(weights: BackboneWeights, output: str | Path,
                     arch: str | None = None) -> tuple[Path, dict, ResNetSpec]:
    """Write the detectron2 pickle and, beside it, the YAML of config keys it needs."""
    if weights.cifar_stem:
        raise HnmixError(f"{weights.path} was pretrained with the CIFAR stem; detectron2's ResNet stem is "
                         "7x7 stride 2 with max-pool: pretrain without --cifar-stem")
    if arch and arch.split(".")[0] not in _NAMES.values():  # "resnet50.tv_in1k": timm's pretrained tag
        raise HnmixError(f"detectron2 conversion needs a ResNet ({', '.join(_NAMES.values())}), not --arch {arch}")
    if arch:
        resolve_arch(weights, arch, None)  # --arch against the checkpoint's own
    spec = inspect_resnet(weights.state_dict, str(weights.path))
    if arch and arch.split(".")[0] != spec.name:
        # the depth (and groups, width) detectron2 rebuilds come from the tensors: --arch must agree with them
        raise HnmixError(f"--arch {arch} does not match {weights.path}, which holds a "
                         f"{spec.name or f'ResNet-{spec.depth}'}")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": to_detectron2(weights.state_dict), "__author__": "hnmix", "matching_heuristics": True}
    with output.open("wb") as f:
        pickle.dump(payload, f)
    settings = detectron2_settings(spec)
    settings["MODEL"]["WEIGHTS"] = str(output.resolve())
    settings_path(output).write_text(yaml.safe_dump(settings, sort_keys=False, default_flow_style=None))
    return settings_path(output), settings, spec


def export_arch(weights: BackboneWeights, arch: str | None) -> str:
    """The checkpoint's arch or --arch (conflicts refused); for a bare backbone.pt, the ResNet it describes."""
    if weights.arch or arch:
        return resolve_arch(weights, arch, None)[0]
    try:
        name = inspect_resnet(weights.state_dict, str(weights.path)).name
    except HnmixError:
        name = None
    if not name:
        raise HnmixError(f"{weights.path} does not say its architecture: pass --arch")
    return name


def _refuse_cifar_stem(weights: BackboneWeights, library: str) -> None:
    if weights.cifar_stem:
        raise HnmixError(f"{weights.path} has the CIFAR stem (3x3 conv, no max-pool), which no stock "
                         f"{library} model has; pretrain without --cifar-stem to export it")


def export_timm(weights: BackboneWeights, output: str | Path, arch: str | None = None) -> str:
    """A state dict that loads strictly into ``timm.create_model(arch, num_classes=0)``."""
    _refuse_cifar_stem(weights, "timm")
    model, name, _ = build_backbone(weights, export_arch(weights, arch), None)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), output)
    return name


def export_torchvision(weights: BackboneWeights, output: str | Path, arch: str | None = None) -> str:
    """A state dict that loads strictly into ``torchvision.models.<arch>()`` once ``fc`` is removed."""
    import torchvision

    _refuse_cifar_stem(weights, "torchvision")
    name = export_arch(weights, arch)
    if not hasattr(torchvision.models, name) or name not in _NAMES.values():
        raise HnmixError(f"torchvision has no '{name}': torchvision export takes ResNet, ResNeXt and "
                         f"Wide-ResNet backbones ({', '.join(_NAMES.values())})")
    spec = inspect_resnet(weights.state_dict, str(weights.path))
    if spec.name != name:
        raise HnmixError(f"{weights.path} holds a {spec.name or f'ResNet-{spec.depth}'}, not torchvision's {name}")
    net = getattr(torchvision.models, name)(weights=None)
    net.fc = torch.nn.Identity()  # "minus fc": the head-less state dict then loads strictly
    sd = _strip(weights.state_dict)
    wrong = [k for k, v in net.state_dict().items() if k in sd and sd[k].shape != v.shape]
    if wrong:
        raise HnmixError(f"{weights.path}: {len(wrong)} tensors do not fit torchvision's {name} (e.g. {wrong[0]})")
    counters = {k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")}
    net.load_state_dict({**counters, **sd}, strict=True)  # strict: every other tensor must come from sd
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), output)
    return name


@dataclass
class ConvertResult:
    output: Path
    target: str
    arch: str | None
    source: str
    settings_file: Path | None = None
    settings: dict | None = None


def convert(weights_path: str | Path, target: str, output: str | Path, arch: str | None = None) -> ConvertResult:
    weights = load_backbone_weights(weights_path)
    if target == "detectron2":
        sfile, settings, spec = write_detectron2(weights, output, arch)
        return ConvertResult(Path(output), target, weights.arch or spec.name, weights.source, sfile, settings)
    exporter = export_timm if target == "timm" else export_torchvision
    name = exporter(weights, output, arch)
    return ConvertResult(Path(output), target, name, weights.source)
