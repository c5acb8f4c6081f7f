"""A run killed with SIGKILL mid-epoch and resumed with --resume auto ends bit-identical to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import TINY, write_images


def pretrain_cmd(data, out, *extra):
    return [sys.executable, "-m", "hnmix", "pretrain", "--data", str(data), "--output", str(out), *TINY,
            "--epochs", "6", "--save-every", "4", "--method", "mochi", "--N", "8", "--s", "4", "--s-prime", "2",
            *extra]


def last_step(metrics):
    if not metrics.exists():
        return 0
    lines = [line for line in metrics.read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])["step"] if lines else 0


def kill_after_step(cmd, out, step, env):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while last_step(out / "metrics.jsonl") < step and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "backbone.pt").exists(), "the run finished before it could be killed"
    return torch.load(out / "last.pt", weights_only=True)["step"]


@pytest.mark.slow
def test_kill_and_resume_is_bit_identical(tmp_path):
    data = write_images(tmp_path / "data", 48, classes=["a", "b", "c"])  # 6 steps per epoch, 36 in all
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(pretrain_cmd(data, tmp_path / "full"), check=True, env=env, capture_output=True)

    # a starved poller may overshoot onto an epoch boundary (step 12); kill again then, since the point is a
    # resume from mid-epoch
    for attempt in range(3):
        killed = tmp_path / f"killed{attempt}"
        stopped_at = kill_after_step(pretrain_cmd(data, killed), killed, 9, env)
        if stopped_at % 6:
            break
    assert 8 <= stopped_at < 36 and stopped_at % 6, stopped_at  # killed mid-epoch, after a checkpoint
    (killed / f".last.pt.tmp-{2 ** 22 + 1}").write_bytes(b"half a checkpoint")  # as a kill mid-save leaves

    resumed = subprocess.run(pretrain_cmd(data, killed, "--resume", "auto"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {killed / 'last.pt'}" in resumed.stdout.replace("\n", "")
    assert not list(killed.glob(".*tmp*")), "the resume sweeps what a cut-short save left"

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(killed / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 36
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 37)), "each step logged exactly once across the kill"


@pytest.mark.slow
def test_ctrl_c_and_sigterm_save_the_step_and_resume_bit_identically(tmp_path):
    # the first signal stops after the current step with a checkpoint of it; loader workers survive it
    data = write_images(tmp_path / "data", 48, classes=["a", "b", "c"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(pretrain_cmd(data, tmp_path / "full", "--workers", "1"), check=True, env=env, capture_output=True)
    for sig, code, word in [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")]:
        out = tmp_path / word
        proc = subprocess.Popen(pretrain_cmd(data, out, "--workers", "1"), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while last_step(out / "metrics.jsonl") < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == code, stdout + stderr
        stopped_at = torch.load(out / "last.pt", weights_only=True)["step"]
        assert 3 <= stopped_at < 36
        assert f"{word} after step {stopped_at}: saved" in " ".join(stderr.split()), stderr
        again = subprocess.run(pretrain_cmd(data, out), env=env, capture_output=True, text=True)
        assert again.returncode == 2 and "already holds a run" in again.stderr  # no silent overwrite
        resumed = subprocess.run(pretrain_cmd(data, out, "--workers", "1", "--resume", "auto"), env=env,
                                 capture_output=True, text=True)
        assert resumed.returncode == 0, resumed.stderr
        a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
        b = torch.load(out / "last.pt", weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 37))
