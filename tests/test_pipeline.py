"""The data pipeline switch end to end (on the CPU): the choice is recorded and kept by a resumed run, the
GPU-decode path resumes bit-identically, and a bad file never loses the run."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import TINY, write_images

import hnmix.data.folder as folder
from hnmix.cli import app
from hnmix.errors import CorruptImageError


def pretrain(runner, data, out, *extra):
    return runner.invoke(app, ["pretrain", "--data", str(data), "--output", str(out), *TINY, *extra])


def test_auto_is_resolved_saved_and_kept_on_resume(runner, tmp_path):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])
    out = tmp_path / "run"
    first = pretrain(runner, data, out, "--epochs", "1")
    assert first.exit_code == 0, first.output
    assert "pil: " in first.stdout and "(auto: PIL DataLoader workers: not a CUDA device)" in first.stdout
    assert yaml.safe_load((out / "config.yaml").read_text())["pipeline"] == "pil"
    assert torch.load(out / "last.pt", weights_only=True)["config"]["pipeline"] == "pil"
    # the checkpoint says pil: a resume with auto keeps it; an explicit other pipeline is honoured, with a warning
    (out / "backbone.pt").unlink()
    again = pretrain(runner, data, out, "--epochs", "2", "--resume", "auto", "--allow-change", "epochs")
    assert again.exit_code == 0 and "pil: " in again.stdout and "auto:" not in again.stdout, again.output
    other = pretrain(runner, data, out, "--epochs", "3", "--resume", "auto", "--pipeline", "resident",
                     "--allow-change", "epochs")
    assert other.exit_code == 0, other.output
    assert "resuming a run trained with --pipeline pil on --pipeline resident" in " ".join(other.stdout.split())


def test_a_bad_file_mid_run_saves_the_step_and_says_how_to_continue(runner, tmp_path, monkeypatch):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])  # 2 steps per epoch
    bad = data / "a" / "img0004.jpg"
    loads = {"n": 0}
    real = folder.open_image

    def flaky(path):  # readable during the first epoch (16 loads), unreadable after
        loads["n"] += 1
        if path == bad and loads["n"] > 16:
            raise CorruptImageError(f"cannot read image {path}: truncated")
        return real(path)

    monkeypatch.setattr(folder, "open_image", flaky)
    out = tmp_path / "run"
    result = pretrain(runner, data, out, "--epochs", "4", "--pipeline", "pil", "--save-every", "0")
    err = " ".join(result.stderr.split())
    assert result.exit_code == 2 and f"cannot read image {bad}" in err, result.output
    saved = torch.load(out / "last.pt", weights_only=True)["step"]
    assert saved >= 2 and f"holds step {saved}: continue with --skip-corrupt --resume auto" in err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, saved + 1))  # logged up to the saved step, nothing lost
    with pytest.warns(UserWarning, match=re.escape(f"skipping unreadable image {bad}")):
        resumed = pretrain(runner, data, out, "--epochs", "4", "--pipeline", "pil", "--skip-corrupt", "--resume",
                           "auto")
    assert resumed.exit_code == 0, resumed.output
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 8


def test_a_run_that_fails_at_its_first_batch_leaves_no_directory(runner, tmp_path):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])
    for f in (data / "a").iterdir():
        f.write_bytes(f.read_bytes()[:40])  # every image of class a truncated
    out = tmp_path / "run"
    result = pretrain(runner, data, out, "--epochs", "1", "--pipeline", "pil")
    assert result.exit_code == 2 and "use --skip-corrupt" in result.stderr, result.output
    assert not out.exists()


@pytest.mark.slow
def test_decode_pipeline_kill_and_resume_is_bit_identical(tmp_path):
    data = write_images(tmp_path / "d", 48, classes=["a", "b", "c"], size=40)  # 6 steps per epoch

    def cmd(out, *extra):
        return [sys.executable, "-m", "hnmix", "pretrain", "--data", str(data), "--output", str(out), *TINY,
                "--workers", "1", "--epochs", "3", "--save-every", "4", "--pipeline", "decode", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "full"), check=True, env=env, capture_output=True)
    part = tmp_path / "part"
    proc = subprocess.Popen(cmd(part), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while last_step(part / "metrics.jsonl") < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)  # saves the step it is on
    assert proc.wait(timeout=120) == 143, proc.stderr.read()
    stopped = torch.load(part / "last.pt", weights_only=True)["step"]
    assert 3 <= stopped < 18
    resumed = subprocess.run(cmd(part, "--resume", "auto"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(part / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 18 and b["config"]["pipeline"] == "decode"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def last_step(metrics):
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


def test_resident_training_holds_the_knn_splits_on_the_device_too(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("HNMIX_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "d"
    write_images(data / "train", 16, classes=["a", "b"])
    write_images(data / "val", 6, classes=["a", "b"], seed=1)
    result = pretrain(runner, data, tmp_path / "run", "--epochs", "1", "--pipeline", "resident", "--knn-every", "1")
    assert result.exit_code == 0, result.output
    assert "kNN monitor: both splits held on the device" in result.stdout and "kNN top-1" in result.stdout
