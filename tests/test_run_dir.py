"""Runs you can trust: a resume cannot silently change the experiment, one process per run directory, and a
damaged or unwritable checkpoint never costs the previous one."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml
from helpers import TINY, assert_clean_error, write_images
from pydantic import Field

from hnmix.cli import app
from hnmix.config import PretrainConfig
from hnmix.core.lock import DirectoryLock
from hnmix.core.settings import RESUME_POLICIES, Settings, dotted, field_extra, known_paths, setting
from hnmix.train.run_dir import recorded_changes

# what a resumed run may change without --allow-change: how the run is carried out, never what it learns
FREE = {"workers", "pipeline", "skip_corrupt", "channels_last", "compile", "compile_mode", "device", "output",
        "resume", "allow_change", "save_every", "keep_every", "log_every", "knn_every", "knn_data",
        "zero_init_residual"}  # the init only shapes step 0: a resumed run never uses it


def pretrain(runner, data, out, *extra):
    return runner.invoke(app, ["pretrain", "--data", str(data), "--output", str(out), *TINY, *extra])


def files(directory):
    """Every file's bytes, the lock aside (a refused process opens it to learn whether the run is in use)."""
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def history(out):
    return [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]


def same_state(a, b):
    assert a["step"] == b["step"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


# ------------------------------------------------------------------------------- 1. resume policy


def test_every_setting_has_the_resume_policy_intended():
    policies = {dotted(p): field_extra(f)["resume"] for p, f in known_paths(PretrainConfig).items()}
    assert set(policies.values()) <= set(RESUME_POLICIES)
    assert {k for k, v in policies.items() if v == "free"} == FREE
    # the experiment: among the fixed ones, every method option and augmentation, the schedule, the seed
    for key in ("method", "mochi.s", "synco.counts", "ring.anneal", "augment.blur_p", "arch", "data", "epochs",
                "lr", "cos", "schedule", "batch_size", "bn", "queue_size", "seed", "oracle_labels", "symmetric"):
        assert policies[key] == "fixed", key

    class Declared(Settings):  # a setting declared without a policy is fixed: the safe default
        a: int = Field(1)
        b: int = setting(1)
        c: int = setting(1, resume="free")

    assert [field_extra(f)["resume"] for f in Declared.model_fields.values()] == ["fixed", "fixed", "free"]
    with pytest.raises(ValueError, match="resume policy"):
        setting(1, resume="sometimes")


@pytest.fixture
def small_run(runner, tmp_path):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])  # 2 steps per epoch
    out = tmp_path / "run"
    first = pretrain(runner, data, out, "--epochs", "1", "--save-every", "1")  # last.prev.pt: step 1, last.pt: 2
    assert first.exit_code == 0, first.output
    return data, out


@pytest.mark.parametrize(("change", "said", "key"), [
    (["--epochs", "2"], "--epochs 1 -> 2", "epochs"),
    (["--method", "mochi", "--N", "4", "--s", "2", "--s-prime", "1"], "--method moco -> mochi", "method"),
    (["--set", "augment.blur_p=0.1"], "--augment-blur-p 0.5 -> 0.1", "augment.blur_p"),
])
def test_a_resume_that_changes_the_experiment_is_refused_and_writes_nothing(runner, small_run, change, said, key):
    data, out = small_run
    before = files(out)
    result = pretrain(runner, data, out, "--epochs", "1", "--resume", "auto", *change)
    assert_clean_error(result, said)
    assert f"--allow-change {key}" in result.stderr
    assert files(out) == before  # config.yaml, metrics, history and checkpoints byte-identical


def test_allow_change_is_recorded_and_config_yaml_keeps_the_original(runner, small_run):
    data, out = small_run
    original = (out / "config.yaml").read_bytes()
    unknown = pretrain(runner, data, out, "--epochs", "2", "--resume", "auto", "--allow-change", "epoch")
    assert_clean_error(unknown, "--allow-change: unknown setting 'epoch' (did you mean 'epochs'?)")
    result = pretrain(runner, data, out, "--epochs", "2", "--resume", "auto", "--allow-change", "epochs",
                      "--workers", "1")
    assert result.exit_code == 0, result.output
    assert (out / "config.yaml").read_bytes() == original
    first, resumed = history(out)
    assert (first["event"], first["step"], first["changed"]) == ("start", 0, {})
    assert (resumed["event"], resumed["step"], resumed["from"]) == ("resume", 2, str(out / "last.pt"))
    assert resumed["changed"] == {"epochs": {"old": 1, "new": 2}}
    # free settings: allowed, still on record
    assert resumed["free_changed"] == {"workers": {"old": 0, "new": 1}, "save_every": {"old": 1, "new": 0}}
    assert resumed["host"] == socket.gethostname() and resumed["hnmix"] and resumed["time"].endswith("Z")
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 4
    assert recorded_changes(out) == [{"key": "epochs", "old": 1, "new": 2, "step": 2}]
    # the checkpoint now carries the changed value: continuing with it needs no second permission
    again = pretrain(runner, data, out, "--epochs", "2", "--resume", "auto")
    assert again.exit_code == 0, again.output
    assert len(history(out)) == 3 and history(out)[-1]["changed"] == {}


def test_allow_change_takes_a_setting_by_its_flag_name(runner, tmp_path):
    # --allow-change s names the setting --s sets (mochi.s), as the flag reads; it used to pass validation
    # and then match nothing
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])
    out, mochi = tmp_path / "run", ["--method", "mochi", "--N", "4", "--s-prime", "1"]
    assert pretrain(runner, data, out, "--epochs", "1", *mochi, "--s", "2").exit_code == 0
    result = pretrain(runner, data, out, "--epochs", "1", *mochi, "--s", "3", "--resume", "auto",
                      "--allow-change", "s")
    assert result.exit_code == 0, result.output
    assert history(out)[-1]["changed"] == {"mochi.s": {"old": 2, "new": 3}}


# ------------------------------------------------------------------------------- 2. one process per directory


def pretrain_cmd(data, out, *extra):
    return [sys.executable, "-m", "hnmix", "pretrain", "--data", str(data), "--output", str(out), *TINY, *extra]


def test_a_second_process_on_a_run_in_use_is_refused_and_the_first_finishes_untouched(tmp_path):
    data = write_images(tmp_path / "d", 48, classes=["a", "b", "c"])  # 6 steps per epoch
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--epochs", "3", "--save-every", "4"]
    reference = subprocess.run(pretrain_cmd(data, tmp_path / "reference", *args), env=env, capture_output=True)
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    first = subprocess.Popen(pretrain_cmd(data, out, *args), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() and time.time() < deadline and first.poll() is None:
        time.sleep(0.01)
    first.send_signal(signal.SIGSTOP)  # held mid-run, however slow the second process is to start
    try:
        assert first.poll() is None, "the first run ended before a second could try"
        holder = f"pid {first.pid} on host {socket.gethostname()}"
        for extra in (["--resume", "auto"], []):  # a scheduler's retry, a double click
            second = subprocess.run(pretrain_cmd(data, out, *args, *extra), env=env, capture_output=True,
                                    text=True)
            err = " ".join(second.stderr.split())
            assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1, second.stderr
            assert "is in use by another hnmix run" in err and holder in err, err
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    same_state(torch.load(tmp_path / "reference" / "last.pt", weights_only=True),
               torch.load(out / "last.pt", weights_only=True))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 19)) and [h["event"] for h in history(out)] == ["start"]


def test_a_killed_holder_never_blocks_a_resume(runner, small_run):
    data, out = small_run
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom hnmix.core.lock import DirectoryLock\n"
                               "DirectoryLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)",
                               str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    busy = pretrain(runner, data, out, "--epochs", "1", "--resume", "auto")
    assert_clean_error(busy, f"pid {holder.pid} on host")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert f"{holder.pid} " in (out / ".lock").read_text()  # the file is left; the kernel dropped the lock
    resumed = pretrain(runner, data, out, "--epochs", "1", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output


def test_a_filesystem_without_flock_warns_and_runs(runner, tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    result = pretrain(runner, "demo", tmp_path / "run", "--epochs", "1", "--max-steps", "1")
    assert result.exit_code == 0, result.output
    assert "no flock on this filesystem" in " ".join(result.stdout.split())


@pytest.mark.slow
def test_under_ddp_rank_0_holds_the_lock_and_every_rank_refuses(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m", "hnmix",
           "pretrain", "--data", "demo", "--output", str(out), *TINY, "--epochs", "1", "--max-steps", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out.mkdir()
    lock = DirectoryLock(out)
    lock.acquire()
    refused = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert refused.returncode != 0 and f"pid {os.getpid()} on host" in refused.stdout + refused.stderr
    assert not (out / "config.yaml").exists()
    lock.release()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert [h["event"] for h in history(out)] == ["start"]  # one history line: rank 0 writes, alone


# ------------------------------------------------------------------------------- 3. checkpoint fallback


def test_a_truncated_last_pt_resumes_from_the_previous_bit_exactly(runner, tmp_path):
    data = write_images(tmp_path / "d", 48, classes=["a", "b", "c"])  # 6 steps per epoch: saves at 4, 6, 8, 12
    args = ["--epochs", "2", "--save-every", "4", "--method", "mochi", "--N", "8", "--s", "4", "--s-prime", "2"]
    full, out = tmp_path / "full", tmp_path / "run"
    assert pretrain(runner, data, full, *args).exit_code == 0
    assert pretrain(runner, data, out, *args).exit_code == 0
    assert torch.load(out / "last.prev.pt", weights_only=True)["step"] == 8  # the save before the last
    last = out / "last.pt"
    damaged = last.read_bytes()[: last.stat().st_size // 2]
    last.write_bytes(damaged)
    (out / "backbone.pt").unlink()
    result = pretrain(runner, data, out, *args, "--resume", "auto")
    assert result.exit_code == 0, result.output
    said = [line for line in result.stdout.splitlines() if line.startswith("warning:") and "queue" not in line]
    assert len(said) == 1 and str(last) in said[0] and str(out / "last.prev.pt") in said[0], result.stdout
    assert f"resumed from {out / 'last.prev.pt'} at step 8" in " ".join(result.stdout.split())
    same_state(torch.load(full / "last.pt", weights_only=True), torch.load(last, weights_only=True))
    assert (out / "last.unreadable.pt").read_bytes() == damaged  # kept aside, not rotated into last.prev.pt
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_save_never_leaves_the_run_without_last_pt(tmp_path, monkeypatch, hard_links):
    # a SIGKILL can land between any two file operations of a save: last.pt must exist at each of them
    from hnmix.core.io import atomic_save

    last, prev = tmp_path / "last.pt", tmp_path / "last.prev.pt"
    atomic_save({"step": 1}, last, previous=prev)
    seen = []
    real_replace, real_link = os.replace, os.link

    def replace(src, dst):
        seen.append(last.exists())
        real_replace(src, dst)

    def link(src, dst):
        if not hard_links:
            raise OSError(1, "Operation not permitted")
        seen.append(last.exists())
        real_link(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    atomic_save({"step": 2}, last, previous=prev)
    monkeypatch.undo()
    assert torch.load(last, weights_only=True) == {"step": 2}
    assert torch.load(prev, weights_only=True) == {"step": 1}
    assert not list(tmp_path.glob(".*tmp*"))
    if hard_links:
        assert seen and all(seen), seen
    else:  # the rename fallback: one moment without last.pt, which --resume auto covers with last.prev.pt
        assert seen == [True, False], seen


def _limit_file_size():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # a checkpoint here is ~4.7 MB


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoints_and_stops_in_one_line(runner, small_run):
    data, out = small_run  # checkpoints of steps 1 (last.prev.pt) and 2 (last.pt)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "last.prev.pt", "backbone.pt")}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = pretrain_cmd(data, out, "--epochs", "4", "--allow-change", "epochs", "--save-every", "1", "--resume",
                       "auto")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=300)
    err = " ".join(done.stderr.split())
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"could not write {out / 'last.pt'} (File too large)" in err
    assert f"{out / 'last.pt'} still holds step 2" in err
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not list(out.glob(".*tmp*"))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) <= 4, "the failed write stops the run at the next step"
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 1


def test_compare_marks_a_run_changed_on_resume(runner, small_run):
    from hnmix.compare.grid import Point
    from hnmix.compare.report import runs_section
    from hnmix.compare.run import run_record
    from hnmix.compare.runs import Run

    data, out = small_run
    resumed = pretrain(runner, data, out, "--epochs", "2", "--resume", "auto", "--allow-change", "epochs")
    assert resumed.exit_code == 0, resumed.output
    cfg = PretrainConfig(data=str(data), output=str(out))
    measured = {"knn_source": "monitor", "metrics": {"knn_top1": 50.0}, "curve": []}
    changed = run_record(Run(Point((("seed", "0"),)), out, cfg), measured, {})
    plain = run_record(Run(Point((("seed", "1"),)), out.parent / "other", cfg), measured, {})
    assert changed["changed_on_resume"] == [{"key": "epochs", "old": 1, "new": 2, "step": 2}]
    assert plain["changed_on_resume"] == []
    json.dumps(changed)  # compare.json carries the field as it is
    lines = runs_section({"runs": [changed, plain], "missing": []})
    marked = [line for line in lines if "changed on resume" in line]
    assert any(line.startswith(f"| {changed['name']} (⚠ changed on resume)") for line in marked), lines
    assert not any(plain["name"] + " (" in line for line in lines)
    assert f"- `{changed['name']}`: epochs 1 -> 2 at step 2" in lines


def test_a_run_that_fails_early_removes_only_what_it_made_never_a_neighbour(tmp_path):
    # run A makes exp/ and exp/a; B runs in exp/b; A failing before its first checkpoint must not take B along
    import torch
    from rich.console import Console

    from hnmix.config import PretrainConfig
    from hnmix.core.dist import DistInfo
    from hnmix.train.run_dir import RunDirectory

    info, quiet = DistInfo(0, 1, 0, torch.device("cpu")), Console(quiet=True)
    a = RunDirectory(PretrainConfig(data="demo", output=str(tmp_path / "exp" / "a")), info, quiet)
    b = RunDirectory(PretrainConfig(data="demo", output=str(tmp_path / "exp" / "b")), info, quiet)
    (tmp_path / "exp" / "b" / "last.pt").write_bytes(b"B's checkpoint")
    a.release()
    a.abandon()
    assert not (tmp_path / "exp" / "a").exists()
    assert (tmp_path / "exp" / "b" / "last.pt").read_bytes() == b"B's checkpoint"
    b.release()
    alone = RunDirectory(PretrainConfig(data="demo", output=str(tmp_path / "new" / "deep" / "c")), info, quiet)
    alone.release()
    alone.abandon()
    assert not (tmp_path / "new").exists()  # the folders it made, all empty, go with it
