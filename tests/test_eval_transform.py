"""The eval transform: one rule (small images at their own size, larger ones resize 256/224 + centre crop),
checked against PIL done by hand on a small folder at 32 px and at 224 px, on both kNN-monitor paths, recorded
in config.yaml, and used by `lineval --protocol knn`, whose accuracy matches an independent weighted kNN."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import TINY, save_hnmix_checkpoint, tiny_moco
from PIL import Image

from hnmix.cli import app
from hnmix.config import PretrainConfig
from hnmix.data.folder import ImageFiles
from hnmix.data.labelled import choose_eval_transform, eval_transform
from hnmix.eval.config import LinevalConfig
from hnmix.eval.features import resize_center_crop

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def write_folder(root, sizes: list[tuple[int, int]], classes: int = 2, seed: int = 0):
    """PNG images of the given (width, height), class folders c0, c1, ...: a colour per class plus noise."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(40, 216, (classes, 3))
    for i, (w, h) in enumerate(sizes):
        c = i % classes
        pixels = np.clip(colours[c] + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / f"c{c}" / f"{i:04d}.png")
    return root


def by_hand(img: Image.Image, short: int, crop: int) -> torch.Tensor:
    """PIL alone: the short side to `short` (bilinear; the long side as int(short * long / short_side), as
    torchvision), then the central crop x crop box (offsets int(round((side - crop) / 2)))."""
    w, h = img.size
    new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    if new != (w, h):
        img = img.resize(new, Image.BILINEAR)
    left, top = int(round((new[0] - crop) / 2)), int(round((new[1] - crop) / 2))
    array = np.asarray(img.crop((left, top, left + crop, top + crop)))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


@pytest.mark.parametrize("size, image_sizes, choice, short", [
    (32, [(32, 32)] * 4, "at-size", 32),  # CIFAR: the images themselves, no resize, no crop
    (32, [(40, 36), (36, 48)], "at-size", 32),  # other small images: short side to 32, centre crop
    (64, [(64, 64), (80, 70)], "at-size", 64),
    (224, [(300, 260), (250, 320)], "resize-crop", 256),  # ImageNet: 256 then the central 224
    (96, [(96, 96)], "resize-crop", 110),
])
def test_eval_transform_against_pil_by_hand(tmp_path, size, image_sizes, choice, short):
    images = ImageFiles(write_folder(tmp_path / "data", image_sizes))
    assert choose_eval_transform(size) == choice
    tf = eval_transform(size)
    for i in range(len(images)):
        img = images.load(i)
        assert torch.equal(tf(img), by_hand(img, short, size)), (i, img.size)
        if choice == "at-size" and img.size == (size, size):
            assert torch.equal(tf(img), torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))


@pytest.mark.parametrize("size, image_size", [(32, 32), (224, 260)])
def test_device_path_uses_the_same_rule(tmp_path, size, image_size):
    images = ImageFiles(write_folder(tmp_path / "data", [(image_size, image_size)] * 3))
    pil = torch.stack([eval_transform(size)(images.load(i)) for i in range(3)])
    batch = torch.stack([torch.from_numpy(np.asarray(images.load(i)).copy()).permute(2, 0, 1) for i in range(3)])
    short = 32 if size == 32 else 256
    device = resize_center_crop(batch, size, short)
    if size == 32:
        assert torch.equal(device, pil.float())  # nothing to resize: exactly the pixels
    else:  # antialiased bilinear on the device vs PIL's: a few grey levels apart at most
        assert (device - pil.float()).abs().mean() < 2.0


def test_the_choice_is_a_setting_recorded_in_config_yaml(runner, tmp_path):
    assert PretrainConfig(image_size=32).eval_transform == "at-size"
    assert PretrainConfig(image_size=224).eval_transform == "resize-crop"
    assert PretrainConfig(image_size=32, eval_transform="resize-crop").eval_transform == "resize-crop"
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", *TINY, "--data", "demo", "--epochs", "1", "--max-steps", "1",
                                 "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["eval_transform"] == "at-size"  # 16 px


def independent_knn(backbone, bank: ImageFiles, queries: ImageFiles, k: int = 200, t: float = 0.1) -> float:
    """Top-1 % of a weighted kNN written out from the pixels: no hnmix transform, loader or kNN code."""
    def features(images):
        x = np.stack([np.asarray(images.load(i), np.float64) / 255 for i in range(len(images))])
        x = torch.from_numpy(((x - MEAN) / STD).transpose(0, 3, 1, 2)).float()
        with torch.no_grad():
            return F.normalize(backbone.eval()(x), dim=1)

    fb, fq = features(bank), features(queries)
    bank_labels = torch.tensor(bank.labels)
    correct = 0
    for q, label in zip(fq, queries.labels, strict=True):
        sim = fb @ q
        top = sim.topk(min(k, len(sim)))
        votes = torch.zeros(len(bank.classes)).index_add_(0, bank_labels[top.indices], (top.values / t).exp())
        correct += int(votes.argmax()) == label
    return 100.0 * correct / len(queries)


def test_lineval_knn_of_a_32px_run_equals_an_independent_knn_at_32px(runner, tmp_path):
    root = tmp_path / "data"
    write_folder(root / "train", [(32, 32)] * 100, classes=10, seed=1)
    write_folder(root / "val", [(32, 32)] * 50, classes=10, seed=2)
    model = tiny_moco()
    weights = save_hnmix_checkpoint(tmp_path / "last.pt", model, image_size=32)
    out = tmp_path / "knn"
    result = runner.invoke(app, ["lineval", "--weights", str(weights), "--protocol", "knn", "--data", str(root),
                                 "--workers", "0", "--batch-size", "64", "--device", "cpu", "--output", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "lineval.json").read_text())
    assert report["hyperparameters"]["eval_transform"] == "at-size"
    expected = independent_knn(model.encoder_q.backbone, ImageFiles(root / "train"), ImageFiles(root / "val"))
    assert abs(report["top1"] - expected) <= 1.0, (report["top1"], expected)
    assert 10 < expected < 100  # the colours make it a real test: neither chance nor trivially perfect


def test_lineval_runs_in_fp32_unless_bf16_is_asked(tmp_path):
    weights = save_hnmix_checkpoint(tmp_path / "last.pt", tiny_moco())
    assert LinevalConfig(weights=str(weights), data="demo").precision == "fp32"  # MoCo's protocol, GPU too
    assert LinevalConfig(weights=str(weights), data="demo", precision="bf16").precision == "bf16"
