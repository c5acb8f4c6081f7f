"""timm backbone factory, the CIFAR stem, and the conversion to split batch norm (hnmix.models.split_bn)."""

from __future__ import annotations

import timm
import torch
from torch import nn

from hnmix.errors import HnmixError
from hnmix.models.split_bn import SplitBatchNorm2d

__all__ = ["SplitBatchNorm2d", "apply_cifar_stem", "check_arch", "check_image_size", "convert_split_bn",
           "count_batchnorms", "create_backbone"]


def check_arch(arch: str) -> str:
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('_')[0]}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise HnmixError(f"unknown timm architecture '{arch}'{hint}")
    return arch


def create_backbone(arch: str, cifar_stem: bool = False, zero_init_residual: bool = False,
                    image_size: int | None = None) -> nn.Module:
    """A randomly initialised timm model without classifier: ``model(x)`` returns pooled features.

    The default is the ResNet init of torchvision (and so of official MoCo): the last BN of each residual
    branch starts at weight 1; zero_init_residual=True gives timm's 0. A model built for one input size (a
    ViT's position embedding) is built for image_size. A family without one of these options (timm's
    TypeError names it) is built without it.
    """
    check_arch(arch)
    options = {**({} if zero_init_residual else {"zero_init_last": False}),
               **({"img_size": image_size} if image_size else {})}
    while True:
        try:
            model = timm.create_model(arch, pretrained=False, num_classes=0, **options)
            break
        except TypeError as e:
            unknown = [k for k in options if f"'{k}'" in str(e)]
            if not unknown:
                raise
            del options[unknown[0]]
    if cifar_stem:
        apply_cifar_stem(model, arch)
    return model


def check_image_size(model: nn.Module, arch: str, size: int) -> None:
    """Models with a fixed input size (ViTs, ...) would fail on the first batch; fail here, in one line."""
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size))
    except (AssertionError, RuntimeError, ValueError) as e:
        native = getattr(model, "pretrained_cfg", {}).get("input_size", (None,))[-1]
        hint = f"; try --image-size {native}" if native else ""
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HnmixError(f"{arch} does not take {size} px images ({reason}){hint}") from None
    finally:
        model.train(training)


def apply_cifar_stem(model: nn.Module, arch: str = "") -> None:
    """3x3 stride-1 first conv and no max-pool, so 32 px images keep their resolution (as in MoCo's CIFAR demo)."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise HnmixError(
            f"--cifar-stem needs a ResNet-style timm model with a single conv1 and a maxpool "
            f"(e.g. resnet18, resnet50); '{arch}' has neither"
        )
    model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()


def convert_split_bn(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every plain nn.BatchNorm2d (not subclasses such as timm's BatchNormAct2d) in place."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            split = SplitBatchNorm2d(
                child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                affine=child.affine, track_running_stats=child.track_running_stats,
            )
            split.load_state_dict(child.state_dict())
            setattr(module, name, split.to(child.weight.device))
        else:
            convert_split_bn(child, num_splits)
    return module


def count_batchnorms(module: nn.Module) -> tuple[int, int]:
    """(plain BatchNorm2d count, other batch-norm-like count) — to warn when a BN mode cannot apply."""
    plain = sum(type(m) is nn.BatchNorm2d or type(m) is SplitBatchNorm2d for m in module.modules())
    other = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()) - plain
    return plain, other
