"""Evaluation and analysis take the weights' own run settings: a backbone.pt reads the config.yaml beside it
(arch, CIFAR stem, image size), as a last.pt reads its own; flags that contradict it are refused or warned."""

import json

import pytest
import torch
from helpers import write_images

from hnmix.cli import app
from hnmix.config import PretrainConfig
from hnmix.models.backbone import create_backbone


@pytest.fixture
def run_dir(tmp_path):
    """What `hnmix pretrain --arch resnet18 --cifar-stem --image-size 16` leaves: backbone.pt + config.yaml."""
    run = tmp_path / "run"
    run.mkdir()
    torch.manual_seed(0)
    torch.save(create_backbone("resnet18", cifar_stem=True).state_dict(), run / "backbone.pt")
    PretrainConfig(arch="resnet18", cifar_stem=True, image_size=16, batch_size=8, queue_size=32).save_yaml(
        run / "config.yaml")
    return run


@pytest.fixture
def labelled(tmp_path):
    write_images(tmp_path / "d" / "train", 12, classes=["a", "b"], size=24)
    write_images(tmp_path / "d" / "val", 6, classes=["a", "b"], size=24, seed=1)
    return tmp_path / "d"


def test_lineval_of_a_backbone_uses_its_runs_arch_stem_and_size(runner, run_dir, labelled, tmp_path):
    out = tmp_path / "knn"
    result = runner.invoke(app, ["lineval", "--weights", str(run_dir / "backbone.pt"), "--data", str(labelled),
                                 "--protocol", "knn", "--workers", "0", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "resnet18 + CIFAR stem" in result.stdout and "16 px" in result.stdout
    assert json.loads((out / "lineval.json").read_text())["hyperparameters"]["image_size"] == 16


def test_flags_that_contradict_the_run(runner, run_dir, labelled, tmp_path):
    base = ["lineval", "--weights", str(run_dir / "backbone.pt"), "--data", str(labelled), "--protocol", "knn",
            "--workers", "0"]
    wrong = runner.invoke(app, [*base, "--arch", "resnet34", "--output", str(tmp_path / "a")])
    assert wrong.exit_code == 2 and "does not match the run's" in wrong.stderr and "config.yaml" in wrong.stderr
    bigger = runner.invoke(app, [*base, "--image-size", "24", "--output", str(tmp_path / "b")])
    assert bigger.exit_code == 0, bigger.output
    assert "--image-size 24 differs from the run's" in " ".join(bigger.stdout.split())
    assert json.loads((tmp_path / "b" / "lineval.json").read_text())["hyperparameters"]["image_size"] == 24


def test_analyze_of_a_backbone_uses_its_runs_size(runner, run_dir, labelled, tmp_path):
    result = runner.invoke(app, ["analyze", "uniformity", "--weights", str(run_dir / "backbone.pt"), "--data",
                                 str(labelled), "--split", "val", "--features", "backbone", "--workers", "0",
                                 "--output", str(tmp_path / "an")])
    assert result.exit_code == 0, result.output
    (r,) = json.loads((tmp_path / "an" / "analysis.json").read_text())["results"]
    assert r["image_size"] == 16 and r["arch"] == "resnet18"


def test_a_contradicting_switch_is_named_as_typed(runner, run_dir, labelled, tmp_path):
    result = runner.invoke(app, ["lineval", "--weights", str(run_dir / "backbone.pt"), "--data", str(labelled),
                                 "--protocol", "knn", "--workers", "0", "--no-cifar-stem", "--output", str(tmp_path)])
    assert result.exit_code == 2 and "--no-cifar-stem does not match the run's" in result.stderr, result.output
    assert "(--cifar-stem;" in result.stderr and "=False" not in result.stderr
