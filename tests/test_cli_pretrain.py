"""`hnmix pretrain` end to end, and every bad input: one clear line, non-zero exit, no traceback."""

import json
import re

import pytest
import timm
import torch
import yaml
from helpers import TINY, assert_clean_error, write_images

from hnmix.cli import app


def invoke(runner, *args):
    result = runner.invoke(app, ["pretrain", *args])
    return result


def test_the_cards_example_runs(runner, tmp_path):
    # the model card's command line, made small only by the flags appended after it
    card = ["--method", "mochi", "--N", "1024", "--s", "1024", "--s-prime", "128"]
    result = invoke(runner, *card, "--output", str(tmp_path / "run"), "--arch", "test_resnet", "--image-size",
                    "32", "--batch-size", "8", "--max-steps", "2", "--mochi-start-epoch", "0", "--workers", "0")
    assert result.exit_code == 0, result.output
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (cfg["mochi"]["n_hard"], cfg["mochi"]["s"], cfg["mochi"]["s_prime"]) == (1024, 1024, 128)
    assert cfg["queue_size"] == 65536 and cfg["data"] == "demo"


def test_demo_run_writes_a_complete_run_directory(runner, tmp_path):
    out = tmp_path / "run"
    result = invoke(runner, "--data", "demo", "--output", str(out), *TINY, "--epochs", "1", "--max-steps", "6",
                    "--method", "mochi", "--N", "8", "--s", "4", "--s-prime", "2")
    assert result.exit_code == 0, result.output
    assert "effective 0.0009375" in result.stdout and "1 x 8 per rank" in result.stdout  # 0.03 x 8/256
    assert {"config.yaml", "metrics.jsonl", "last.pt", "backbone.pt", "tb"} <= {p.name for p in out.iterdir()}
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "mochi" and cfg["mochi"]["n_hard"] == 8 and cfg["queue_size"] == 32
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "img_per_s", "acc", "logit_pos", "logit_neg", "logit_syn"} <= set(records[-1])
    assert list((out / "tb").iterdir())
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scaler", "rng", "epoch", "step", "config"} <= set(ckpt)
    assert {"queue", "queue_ptr"} <= set(ckpt["model"]) and ckpt["step"] == 6
    backbone = timm.create_model("test_resnet", num_classes=0)
    backbone.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
    q_keys = {k.removeprefix("encoder_q.backbone."): v for k, v in ckpt["model"].items()
              if k.startswith("encoder_q.backbone.")}
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, q_keys[k])


def test_mochi_start_epoch_gates_synthetic_negatives(runner, tmp_path):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])  # 2 steps per epoch
    result = invoke(runner, "--data", str(data), "--output", str(tmp_path / "r"), *TINY, "--epochs", "3",
                    "--method", "mochi", "--N", "4", "--s", "2", "--s-prime", "1", "--mochi-start-epoch", "1")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert ["logit_syn" in r for r in records] == [False, False, True, True, True, True]
    assert "holds more than half the dataset" in result.stdout  # K=32 for 16 images


def test_yaml_config_and_set_overrides(runner, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": "demo", "arch": "test_resnet", "image_size": 16, "batch_size": 8,
                                   "queue_size": 32, "dim": 16, "workers": 0, "epochs": 1, "max_steps": 2}))
    result = invoke(runner, "--config", str(cfg), "--output", str(tmp_path / "r"), "--set", "dim=8")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["dim"] == 8 and saved["max_steps"] == 2


@pytest.mark.parametrize(("args", "message"), [
    (["--data", "/no/such/dir"], "does not exist"),
    (["--queue-size", "36"], "must be a multiple of the global batch size 8"),
    (["--method", "mochi", "--N", "64"], "cannot exceed the queue size"),
    (["--method", "mochi", "--N", "1", "--s", "2"], "need N >= 2"),
    (["--arch", "resnet_nope"], "unknown timm architecture 'resnet_nope'"),
    (["--resume", "/no/such/last.pt"], "checkpoint not found"),
    (["--set", "qeueu_size=64"], "unknown setting 'qeueu_size'"),
    (["--bn", "split:3"], "does not split into 3"),
    (["--arch", "test_convnext"], "does not take 16 px images"),  # its 2x2 kernels outgrow a 16 px input
])
def test_bad_settings(runner, tmp_path, args, message):
    base = ["--data", "demo", "--output", str(tmp_path / "r"), *TINY]
    assert_clean_error(invoke(runner, *base, *args), message)
    assert not (tmp_path / "r").exists()


def test_a_vit_is_built_for_the_image_size(runner, tmp_path):
    # timm's vit_tiny is made for 224 px; at --image-size 32 its position embedding has (32/16)^2 + 1 tokens
    out = tmp_path / "r"
    result = invoke(runner, "--data", "demo", "--output", str(out), *TINY, "--arch", "vit_tiny_patch16_224",
                    "--image-size", "32", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    state = torch.load(out / "backbone.pt", weights_only=True)
    assert state["pos_embed"].shape == (1, 2 * 2 + 1, 192)
    from hnmix.models.weights import build_backbone, load_backbone_weights

    backbone, arch, _ = build_backbone(load_backbone_weights(out / "last.pt"))  # what lineval and analyze load
    assert arch == "vit_tiny_patch16_224" and backbone.pos_embed.shape == (1, 5, 192)
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 192)


def test_a_resume_that_changes_a_switch_names_the_flag_typed(runner, tmp_path):
    out = tmp_path / "r"
    assert invoke(runner, "--data", "demo", "--output", str(out), *TINY, "--max-steps", "1").exit_code == 0
    result = invoke(runner, "--data", "demo", "--output", str(out), *TINY, "--resume", str(out / "last.pt"),
                    "--no-mlp")
    assert_clean_error(result, "--no-mlp")  # the flag typed, and the checkpoint's side as a flag too
    assert "--mlp" in result.stderr.replace("--no-mlp", "") and not re.search(r"\b(True|False)\b", result.stderr)


def test_empty_data_dir(runner, tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert_clean_error(invoke(runner, "--data", str(tmp_path / "empty"), *TINY), "no images")


def test_resume_from_a_file_that_is_not_a_checkpoint(runner, tmp_path):
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"\x00garbage")
    assert_clean_error(invoke(runner, "--data", "demo", *TINY, "--resume", str(bogus),
                              "--output", str(tmp_path / "r")), "not a readable PyTorch checkpoint")
    torch.save({"a": torch.zeros(1)}, bogus)
    assert_clean_error(invoke(runner, "--data", "demo", *TINY, "--resume", str(bogus),
                              "--output", str(tmp_path / "r")), "not an hnmix training checkpoint")


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
@pytest.mark.parametrize("workers", ["0", "1"])
def test_corrupt_image_is_named_and_can_be_skipped(runner, tmp_path, workers):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])
    bad = data / "a" / "img0002.jpg"
    bad.write_bytes(b"truncated")
    args = ["--data", str(data), *TINY, "--workers", workers, "--epochs", "1"]
    assert_clean_error(invoke(runner, *args, "--output", str(tmp_path / "r1")), f"cannot read image {bad}")
    assert not (tmp_path / "r1" / "last.pt").exists()
    result = invoke(runner, *args, "--output", str(tmp_path / "r2"), "--skip-corrupt")
    assert result.exit_code == 0, result.output
    assert "skipped 1 unreadable images" in " ".join(result.stdout.split())  # rich wraps at 80 columns


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(runner, tmp_path):
    out = tmp_path / "r"
    args = ["--data", "demo", *TINY, "--epochs", "1", "--max-steps", "40", "--save-every", "1", "--output", str(out)]
    ok = invoke(runner, *args[:-4], "--max-steps", "1", "--save-every", "1", "--output", str(out))
    assert ok.exit_code == 0
    good = torch.load(out / "last.pt", weights_only=True)
    result = invoke(runner, *args, "--resume", "auto", "--lr", "1e30", "--set", "max_steps=40",
                    "--allow-change", "lr", "--allow-change", "max_steps")  # a blow-up on purpose
    assert_clean_error(result, "non-finite loss at step")
    assert "lr" in result.stderr and "the last good checkpoint is" in result.stderr
    kept = torch.load(out / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert kept["step"] >= good["step"]


def test_output_that_is_a_file_or_under_one(runner, tmp_path):
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    assert_clean_error(invoke(runner, "--data", "demo", *TINY, "--output", str(afile)), "is a file")
    assert_clean_error(invoke(runner, "--data", "demo", *TINY, "--max-steps", "1", "--output", str(afile / "sub")),
                       "Not a directory")
    assert afile.read_text() == "x"
