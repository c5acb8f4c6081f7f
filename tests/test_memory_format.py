"""Channels-last survives the whole network, forward and backward: every 4-D module output of a timm ResNet
(CIFAR stem too) is channels-last, and so is every gradient flowing back into one and the input's gradient,
with split BN and with plain BN. A layer that returned NCHW would make every later conv transpose its input."""

import pytest
import torch

from hnmix.models.backbone import convert_split_bn, create_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CASES = {"resnet18": ("resnet18", False, 32), "resnet18-cifar-stem": ("resnet18", True, 32),
         "resnet50": ("resnet50", False, 64)}


def not_channels_last(t: torch.Tensor) -> bool:
    # a broadcast (stride-0) gradient, as the global pool's backward hands back, stores no layout to lose
    return not t.is_contiguous(memory_format=torch.channels_last) and 0 not in t.stride()


def leaving_channels_last(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Names of modules whose 4-D output, or the gradient flowing back into that output, is not channels-last;
    '<input grad>' if the input's gradient is not. The global pool's input is left out of the gradient check:
    the CPU pool backward hands back NCHW whatever the format (a torch kernel matter, plain BN alike)."""
    found: list[str] = []
    outputs: list[tuple[str, torch.Tensor]] = []

    def watch(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor) and out.dim() == 4:
                outputs.append((name, out))
                if not_channels_last(out):
                    found.append(name)
        return hook

    pooled = []
    handles = [m.register_forward_hook(watch(name)) for name, m in model.named_modules() if name]
    handles.append(model.global_pool.register_forward_pre_hook(lambda m, args: pooled.append(args[0])))
    try:
        loss = model(x).square().sum()
    finally:
        for h in handles:
            h.remove()
    for name, out in outputs:
        if out.requires_grad and all(out is not p for p in pooled):
            out.register_hook(lambda g, name=name: found.append(f"{name} (grad)") if not_channels_last(g) else None)
    loss.backward()
    if not_channels_last(x.grad):
        found.append("<input grad>")
    return found


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU"))])
@pytest.mark.parametrize("bn", ["split:2", "plain"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_channels_last_in_gives_channels_last_everywhere(case, bn, device):
    arch, cifar_stem, size = CASES[case]
    torch.manual_seed(0)
    model = create_backbone(arch, cifar_stem)
    if bn == "split:2":
        convert_split_bn(model, 2)
    model = model.to(device, memory_format=torch.channels_last).train()
    x = torch.randn(4, 3, size, size, device=device).to(memory_format=torch.channels_last).requires_grad_()
    assert leaving_channels_last(model, x) == []
