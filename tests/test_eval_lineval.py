"""`hnmix lineval`: protocols end to end on toy data, the classifier against a control, strict loading."""

import hashlib
import json

import pytest
import torch
from helpers import (
    assert_clean_error,
    save_backbone,
    save_hnmix_checkpoint,
    save_official_moco,
    tiny_moco,
    write_brightness_dataset,
    write_images,
)

from hnmix.cli import app
from hnmix.core.log import MetricsLog
from hnmix.errors import HnmixError
from hnmix.eval.config import LinevalConfig
from hnmix.eval.lineval import assert_backbone_unchanged, batched_topk, linear_classifier, train_linear
from hnmix.models.backbone import create_backbone

SMALL = ["--workers", "0", "--batch-size", "16", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _one_thread():
    # in-process torch on a small shared machine: tiny ops are 30x slower when threads oversubscribe the cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_lineval(runner, *args):
    return runner.invoke(app, ["lineval", *SMALL, *args])


def report(out):
    return json.loads((out / "lineval.json").read_text())


@pytest.fixture
def checkpoint(tmp_path):
    return save_hnmix_checkpoint(tmp_path / "last.pt", tiny_moco())


# ------------------------------------------------------------------ the classifier alone, on fixed features


def fit(train_x, train_y, val_x, val_y, tmp_path, epochs=30, lr=0.5, console=None):
    cfg = LinevalConfig.model_construct(epochs=epochs, batch_size=32, lr=lr, sgd_momentum=0.9, wd=0.0,
                                        schedule=[20], eval_every=10)
    torch.manual_seed(0)
    fc = linear_classifier(train_x.shape[1], int(train_y.max()) + 1)

    def batches(epoch):
        perm = torch.randperm(len(train_y))
        for i in range(0, len(perm), 32):
            yield train_x[perm[i:i + 32]], train_y[perm[i:i + 32]]

    from rich.console import Console
    from rich.progress import Progress

    log = MetricsLog(tmp_path, False)
    history = train_linear(fc, batches, lambda: batched_topk(fc, val_x, val_y), -(-len(train_y) // 32), cfg, log,
                           console or Console(quiet=True), Progress(disable=True))
    return history


def test_separable_features_reach_high_accuracy_and_random_features_do_not(tmp_path):
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 3
    y_train, y_val = torch.arange(400) % 4, torch.arange(200) % 4
    x_train = centers[y_train] + torch.randn(400, 32, generator=g)
    x_val = centers[y_val] + torch.randn(200, 32, generator=g)
    separable = fit(x_train, y_train, x_val, y_val, tmp_path)
    assert separable[-1]["top1"] > 95
    # control: the same labels on features that carry no information about them
    control = fit(torch.randn(400, 32, generator=g), y_train, torch.randn(200, 32, generator=g), y_val, tmp_path)
    assert control[-1]["top1"] < 40  # chance is 25 %
    assert [r["epoch"] for r in separable if "top1" in r] == [10, 20, 30]
    assert separable[-1]["lr"] == pytest.approx(0.5 * 32 / 256 * 0.1)  # effective lr, x0.1 after epoch 20


def test_an_lr_far_too_large_for_the_feature_scale_is_flagged(tmp_path):
    from rich.console import Console

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.arange(64) % 2
    quiet = Console(record=True, width=200)
    fit(x, y, x, y, tmp_path, epochs=1, lr=0.5, console=quiet)
    assert "warning" not in quiet.export_text()
    loud = Console(record=True, width=200)
    fit(x * 1000, y, x * 1000, y, tmp_path, epochs=1, lr=30, console=loud)
    assert "consider a lower --lr" in loud.export_text()


def test_classifier_init_is_moco_normal_001():
    torch.manual_seed(0)
    fc = linear_classifier(512, 1000)
    assert abs(fc.weight.std().item() - 0.01) < 5e-4 and fc.bias.abs().max() == 0


def test_backbone_check_catches_moved_bn_statistics():
    backbone = create_backbone("test_resnet")
    reference = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.eval()
    with torch.no_grad():
        backbone(torch.randn(4, 3, 16, 16))
    assert_backbone_unchanged(backbone, reference)  # eval mode: nothing moves
    backbone.train()
    with torch.no_grad():
        backbone(torch.randn(4, 3, 16, 16))  # train-mode BN updates running statistics even without grad
    with pytest.raises(AssertionError, match="backbone changed"):
        assert_backbone_unchanged(backbone, reference)


# ------------------------------------------------------------------ end to end


@pytest.mark.parametrize("protocol", ["fast", "knn", "moco"])
def test_protocols_separate_a_separable_toy_set(runner, tmp_path, checkpoint, protocol):
    data = write_brightness_dataset(tmp_path / "toy")
    out = tmp_path / protocol
    extra = ["--epochs", "6", "--lr", "3", "--set", "schedule=[4]", "--set", "eval_every=3"]
    result = run_lineval(runner, "--weights", str(checkpoint), "--data", str(data), "--protocol", protocol,
                         "-o", str(out), *([] if protocol == "knn" else extra), "--knn-k", "10")
    assert result.exit_code == 0, result.output
    assert "effective" in result.stdout or protocol == "knn"
    r = report(out)
    assert r["protocol"] == protocol and r["top1"] >= 90, r
    assert r["weights"]["sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert r["weights"]["format"] == "hnmix-checkpoint" and r["weights"]["arch"] == "test_resnet"
    assert r["data"] == {"train": str(data / "train"), "val": str(data / "val"), "train_images": 48,
                         "val_images": 24, "classes": 2}
    hp = r["hyperparameters"]
    assert hp["image_size"] == 16 and hp["knn_k"] == 10  # the checkpoint's crop size
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if protocol == "knn":
        assert hp["knn_t"] == 0.1 and records[0]["top1"] == r["top1"]
    else:
        assert hp["lr"] == 3 and hp["effective_lr"] == pytest.approx(3 * 16 / 256) and hp["schedule"] == [4]
        assert [rec["epoch"] for rec in records] == [1, 2, 3, 4, 5, 6]
        assert [("top1" in rec) for rec in records] == [False, False, True, False, False, True]
        assert records[4]["lr"] == pytest.approx(3 * 16 / 256 * 0.1)
    assert list((out / "tb").iterdir())


def test_random_labels_control_stays_near_chance(runner, tmp_path, checkpoint):
    data = write_brightness_dataset(tmp_path / "toy", n_train=32, n_val=32, random_labels=True)
    result = run_lineval(runner, "--weights", str(checkpoint), "--data", str(data), "--protocol", "fast",
                         "--epochs", "6", "--lr", "3", "-o", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert report(tmp_path / "o")["top1"] < 75  # chance 50 %; the separable set above reaches >= 90


def test_demo_data_and_train_val_flags(runner, tmp_path, checkpoint):
    result = run_lineval(runner, "--weights", str(checkpoint), "--data", "demo", "--protocol", "knn",
                         "-o", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    r = report(tmp_path / "d")
    assert r["data"]["train_images"] == 2000 and r["data"]["val_images"] == 500 and r["data"]["classes"] == 10
    data = write_brightness_dataset(tmp_path / "toy")
    result = run_lineval(runner, "--weights", str(checkpoint), "--train", str(data / "train"), "--val",
                         str(data / "val"), "--protocol", "knn", "-o", str(tmp_path / "tv"))
    assert result.exit_code == 0, result.output


def test_the_three_weight_formats_give_the_same_features(runner, tmp_path):
    model = tiny_moco(seed=3)
    files = [save_hnmix_checkpoint(tmp_path / "last.pt", model), save_backbone(tmp_path / "backbone.pt", model),
             save_official_moco(tmp_path / "moco.pth.tar", model)]
    data = write_brightness_dataset(tmp_path / "toy", random_labels=True)  # accuracy far from 100: informative
    results = []
    for i, path in enumerate(files):
        out = tmp_path / f"o{i}"
        extra = ["--arch", "test_resnet", "--image-size", "16"] if i else []
        result = run_lineval(runner, "--weights", str(path), "--data", str(data), "--protocol", "knn",
                             "--knn-k", "5", "-o", str(out), *extra)
        assert result.exit_code == 0, result.output
        results.append(report(out))
    assert [r["weights"]["format"] for r in results] == ["hnmix-checkpoint", "backbone", "moco"]
    assert len({(r["top1"], r["top5"]) for r in results}) == 1
    assert len({r["weights"]["sha256"] for r in results}) == 3


# ------------------------------------------------------------------ bad input


def test_strict_loading_failures(runner, tmp_path, checkpoint):
    data = write_brightness_dataset(tmp_path / "toy")
    base = ["--data", str(data), "--protocol", "knn", "-o", str(tmp_path / "o")]
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    assert_clean_error(run_lineval(runner, "--weights", str(garbage), *base), "not a readable PyTorch checkpoint")
    torch.save({"epoch": 3, "weights": [1, 2]}, tmp_path / "other.pt")
    assert_clean_error(run_lineval(runner, "--weights", str(tmp_path / "other.pt"), *base),
                       "is not an hnmix checkpoint, an hnmix backbone.pt, or an official MoCo checkpoint")
    assert_clean_error(run_lineval(runner, "--weights", str(checkpoint), "--arch", "resnet18", *base),
                       "--arch resnet18 does not match the checkpoint's arch test_resnet")
    backbone = save_backbone(tmp_path / "backbone.pt", tiny_moco())
    assert_clean_error(run_lineval(runner, "--weights", str(backbone), *base), "pass --arch")
    assert_clean_error(run_lineval(runner, "--weights", str(backbone), "--arch", "resnet18", *base),
                       "does not fit resnet18")
    sd = torch.load(backbone, weights_only=True)
    del sd["fc.weight" if "fc.weight" in sd else next(iter(sd))]
    torch.save(sd, tmp_path / "partial.pt")
    assert_clean_error(run_lineval(runner, "--weights", str(tmp_path / "partial.pt"), "--arch", "test_resnet",
                                   *base), "1 missing")
    assert not (tmp_path / "o").exists()


def test_data_problems(runner, tmp_path, checkpoint):
    w = ["--weights", str(checkpoint), "--protocol", "knn", "-o", str(tmp_path / "o")]
    data = write_brightness_dataset(tmp_path / "toy")
    write_images(data / "val" / "zebra", 2)
    assert_clean_error(run_lineval(runner, *w, "--data", str(data)), "val classes differ from train classes")
    write_images(tmp_path / "flat" / "train", 4)
    write_images(tmp_path / "flat" / "val", 4)
    assert_clean_error(run_lineval(runner, *w, "--data", str(tmp_path / "flat")), "needs labelled images")
    write_images(tmp_path / "noval" / "train", 4, classes=["a", "b"])
    assert_clean_error(run_lineval(runner, *w, "--data", str(tmp_path / "noval")), "has no val/ or test/ folder")
    assert_clean_error(run_lineval(runner, *w), "give --data DIR")
    assert_clean_error(run_lineval(runner, *w, "--train", str(data / "train")), "--train and --val go together")
    assert_clean_error(run_lineval(runner, "--data", "demo"), "weights: Field required")
    assert_clean_error(run_lineval(runner, *w, "--data", "demo", "--protocol", "svm"), "protocol")


def test_protocols_never_share_an_output(runner, tmp_path, checkpoint):
    out = ["-o", str(tmp_path / "o"), "--weights", str(checkpoint), "--data", str(write_brightness_dataset(tmp_path))]
    assert run_lineval(runner, *out, "--protocol", "knn").exit_code == 0
    assert_clean_error(run_lineval(runner, *out, "--protocol", "fast"), "holds results of the knn protocol")
    assert run_lineval(runner, *out, "--protocol", "knn").exit_code == 0  # same protocol: rerun in place


def test_backbone_check_is_wired_in(runner, tmp_path, checkpoint, monkeypatch):
    # a backbone left in train mode would move its BN statistics: the run must refuse to report
    from hnmix.eval import lineval as module

    monkeypatch.setattr(module.FrozenBackboneClassifier, "features",
                        lambda self, x: self.backbone.train()(x).detach())
    data = write_brightness_dataset(tmp_path / "toy")
    with pytest.raises(AssertionError, match="backbone changed"):
        cfg = LinevalConfig(weights=str(checkpoint), data=str(data), protocol="moco", epochs=1, workers=0,
                            batch_size=16, output=str(tmp_path / "o"), device="cpu")
        module.lineval(cfg)
    assert not (tmp_path / "o" / "lineval.json").exists()


def test_missing_weights_file_is_a_settings_error():
    with pytest.raises(HnmixError, match="weights file not found"):
        from hnmix.core.settings import load_config

        load_config(LinevalConfig, overrides={"weights": "/no/such.pt", "data": "demo"})
