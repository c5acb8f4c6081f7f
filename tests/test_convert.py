"""hnmix convert: detectron2 key mapping, refusals, timm/torchvision exports (detectron2 optional)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torchvision
import yaml
from typer.testing import CliRunner

from hnmix.cli import app
from hnmix.errors import HnmixError
from hnmix.models.backbone import create_backbone
from hnmix.models.export import convert

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def detectron2_r50_names() -> list[str]:
    """detectron2's ResNet-50 tensor names (stable since 2019), written out independently of hnmix."""
    norm = ["weight", "bias", "running_mean", "running_var"]
    names = ["stem.conv1.weight", *(f"stem.conv1.norm.{n}" for n in norm)]
    for stage, blocks in zip((2, 3, 4, 5), (3, 4, 6, 3), strict=True):
        for b in range(blocks):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if b == 0 else [])
            for c in convs:
                names += [f"res{stage}.{b}.{c}.weight", *(f"res{stage}.{b}.{c}.norm.{n}" for n in norm)]
    return names


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """A random timm resnet50 saved in the three input formats."""
    torch.manual_seed(0)
    model = timm.create_model("resnet50", num_classes=0)
    for m in model.modules():  # non-trivial BN statistics, so a wrong mapping changes outputs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = model.state_dict()
    d = tmp_path_factory.mktemp("r50")
    torch.save(sd, d / "backbone.pt")
    torch.save({"format": "hnmix-checkpoint", "model": {"encoder_q.backbone." + k: v for k, v in sd.items()}
                | {"encoder_q.head.0.weight": torch.zeros(2048, 2048)},
                "config": {"arch": "resnet50", "cifar_stem": False}}, d / "ckpt.pt")
    fc = {"fc.weight": torch.zeros(128, 2048), "fc.bias": torch.zeros(128)}
    torch.save({"state_dict": {"module.encoder_q." + k: v for k, v in (sd | fc).items()}, "arch": "resnet50"},
               d / "moco.pth.tar")
    return model.eval(), sd, d


def test_detectron2_pickle_has_every_r50_tensor_once(r50, tmp_path):
    _, sd, d = r50
    convert(d / "backbone.pt", "detectron2", tmp_path / "r50.pkl")
    with open(tmp_path / "r50.pkl", "rb") as f:
        obj = pickle.load(f)
    assert obj["__author__"] == "hnmix" and obj["matching_heuristics"] is True
    model = obj["model"]
    assert sorted(model) == sorted(detectron2_r50_names())  # each exactly once, nothing else (no fc, counters)
    assert all(isinstance(v, np.ndarray) for v in model.values())
    # values travel with their names: a few hand-checked pairs
    for d2, tv in [("stem.conv1.weight", "conv1.weight"), ("stem.conv1.norm.running_var", "bn1.running_var"),
                   ("res2.0.shortcut.weight", "layer1.0.downsample.0.weight"),
                   ("res3.1.conv2.norm.bias", "layer2.1.bn2.bias"),
                   ("res5.0.shortcut.norm.running_mean", "layer4.0.downsample.1.running_mean"),
                   ("res5.2.conv3.weight", "layer4.2.conv3.weight")]:
        np.testing.assert_array_equal(model[d2], sd[tv].numpy())
    try:  # with detectron2 present, its own R50 must agree on names and shapes
        from detectron2.config import get_cfg
        from detectron2.layers import ShapeSpec
        from detectron2.modeling.backbone.resnet import build_resnet_backbone
    except ImportError:
        return
    cfg = get_cfg()
    cfg.MODEL.RESNETS.OUT_FEATURES, cfg.MODEL.RESNETS.NORM = ["res5"], "BN"
    ref = {k: v.shape for k, v in build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict().items()
           if not k.endswith("num_batches_tracked")}
    assert sorted(ref) == sorted(model)
    assert all(tuple(ref[k]) == model[k].shape for k in ref)


def test_sidecar_yaml_and_printed_keys(r50, tmp_path):
    _, _, d = r50
    res = runner.invoke(app, ["convert", "--weights", str(d / "ckpt.pt"), "--to", "detectron2",
                              "--output", str(tmp_path / "w.pkl")])
    assert res.exit_code == 0, res.output
    keys = yaml.safe_load((tmp_path / "w.yaml").read_text())
    assert keys["INPUT"]["FORMAT"] == "RGB"
    assert keys["MODEL"]["RESNETS"]["STRIDE_IN_1X1"] is False and keys["MODEL"]["RESNETS"]["DEPTH"] == 50
    assert keys["MODEL"]["PIXEL_MEAN"] == [123.675, 116.28, 103.53]
    assert keys["MODEL"]["PIXEL_STD"] == [58.395, 57.12, 57.375]
    assert "STRIDE_IN_1X1" in res.output and "RGB" in res.output


def test_detectron2_output_must_be_a_pkl(r50, tmp_path):
    _, _, d = r50
    res = runner.invoke(app, ["convert", "-w", str(d / "backbone.pt"), "-o", str(tmp_path / "w.pth")])
    assert res.exit_code == 2 and ".pkl" in res.output and not (tmp_path / "w.pth").exists()


def test_three_input_formats_give_the_same_pickle(r50, tmp_path):
    _, _, d = r50
    outs = []
    for name in ("backbone.pt", "ckpt.pt", "moco.pth.tar"):
        convert(d / name, "detectron2", tmp_path / f"{name}.pkl")
        with open(tmp_path / f"{name}.pkl", "rb") as f:
            outs.append(pickle.load(f)["model"])
    for other in outs[1:]:
        assert sorted(other) == sorted(outs[0])
        assert all(np.array_equal(other[k], outs[0][k]) for k in outs[0])


def test_resnext_settings(tmp_path):
    torch.save(timm.create_model("resnext50_32x4d", num_classes=0).state_dict(), tmp_path / "x.pt")
    res = convert(tmp_path / "x.pt", "detectron2", tmp_path / "x.pkl")
    assert res.arch == "resnext50_32x4d"
    resnets = res.settings["MODEL"]["RESNETS"]
    assert (resnets["DEPTH"], resnets["NUM_GROUPS"], resnets["WIDTH_PER_GROUP"]) == (50, 32, 4)


@pytest.mark.parametrize("arch, cifar, needle", [
    ("resnet18d", False, "deep 3-conv stem"),
    ("seresnet18", False, "not a plain ResNet-18"),
    ("resnet26", False, "only depths 18, 34, 50, 101 and 152"),
    ("mobilenetv3_small_050", False, "not a torchvision-style ResNet"),
    ("resnet18", True, "CIFAR stem"),
])
def test_refuses_what_detectron2_cannot_take(tmp_path, arch, cifar, needle):
    sd = create_backbone(arch, cifar_stem=cifar).state_dict()
    path = tmp_path / "w.pt"
    if cifar:  # both ways a CIFAR stem reaches convert: a checkpoint that says so, and a bare backbone.pt
        torch.save({"format": "hnmix-checkpoint", "model": {"encoder_q.backbone." + k: v for k, v in sd.items()},
                    "config": {"arch": arch, "cifar_stem": True}}, path)
        torch.save(sd, tmp_path / "bare.pt")
        with pytest.raises(HnmixError, match="CIFAR stem"):
            convert(tmp_path / "bare.pt", "detectron2", tmp_path / "bare.pkl")
    else:
        torch.save(sd, path)
    res = runner.invoke(app, ["convert", "--weights", str(path), "--output", str(tmp_path / "o.pkl")])
    assert res.exit_code == 2
    assert needle in " ".join(res.output.split())
    assert "Traceback" not in res.output and not (tmp_path / "o.pkl").exists()


@pytest.mark.parametrize("name, arch, needle", [
    ("backbone.pt", "resnet50", "--arch resnet50 does not match"),  # depth read from the tensors
    ("last.pt", "resnet50", "does not match the checkpoint's arch resnet18"),
    ("backbone.pt", "resnext50_32x4d", "which holds a resnet18"),
    ("last.pt", "vit_tiny_patch16_224", "detectron2 conversion needs a ResNet"),
])
def test_detectron2_refuses_an_arch_the_weights_contradict(tmp_path, name, arch, needle):
    sd = create_backbone("resnet18").state_dict()
    torch.save(sd, tmp_path / "backbone.pt")
    torch.save({"format": "hnmix-checkpoint", "model": {"encoder_q.backbone." + k: v for k, v in sd.items()},
                "config": {"arch": "resnet18", "cifar_stem": False}}, tmp_path / "last.pt")
    res = runner.invoke(app, ["convert", "-w", str(tmp_path / name), "--arch", arch, "-o", str(tmp_path / "o.pkl")])
    assert res.exit_code == 2 and needle in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output and not (tmp_path / "o.pkl").exists()
    assert convert(tmp_path / name, "detectron2", tmp_path / "ok.pkl", arch="resnet18").arch == "resnet18"


def test_timm_and_torchvision_exports_give_identical_outputs(r50, tmp_path):
    model, _, d = r50
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    convert(d / "moco.pth.tar", "timm", tmp_path / "timm.pth")
    convert(d / "backbone.pt", "torchvision", tmp_path / "tv.pth", arch="resnet50")
    tm = timm.create_model("resnet50", num_classes=0)
    tm.load_state_dict(torch.load(tmp_path / "timm.pth"), strict=True)
    tv = torchvision.models.resnet50()
    tv.fc = torch.nn.Identity()
    tv.load_state_dict(torch.load(tmp_path / "tv.pth"), strict=True)
    with torch.no_grad():
        ref, a, b = model(x), tm.eval()(x), tv.eval()(x)
    assert ref.shape == (2, 2048)
    torch.testing.assert_close(a, ref)
    torch.testing.assert_close(b, ref, rtol=1e-4, atol=1e-5)


def test_torchvision_export_refuses_timm_only_archs(tmp_path):
    torch.save(create_backbone("resnet18d").state_dict(), tmp_path / "d.pt")
    with pytest.raises(HnmixError, match="torchvision has no 'resnet18d'"):
        convert(tmp_path / "d.pt", "torchvision", tmp_path / "o.pth", arch="resnet18d")


@pytest.mark.slow
def test_convert_never_imports_detectron2(r50, tmp_path):
    _, _, d = r50
    code = ("import sys; from hnmix.models.export import convert; "
            f"convert({str(d / 'backbone.pt')!r}, 'detectron2', {str(tmp_path / 'o.pkl')!r}); "
            "import hnmix.cli; assert 'detectron2' not in sys.modules, 'detectron2 imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
