"""Launchers: the sbatch script submitit writes from hnmix's flags, bad launcher flags in one line, and (slow)
real jobs on a real one-node SLURM cluster (scripts/slurm-cluster.sh start; skipped without one): a 2-run grid
through `compare --launcher slurm`, a run requeued twice mid-way (by `scontrol requeue` and by its own USR2
before a time limit) that ends bit-identical to an uninterrupted one, a two-task job under DDP against
torchrun; and `compare --launcher local --parallel 2`, Ctrl-C included."""

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_clean_error, write_images

from hnmix.cli import app
from hnmix.config import PretrainConfig
from hnmix.launch.config import SlurmSettings

submitit = pytest.importorskip("submitit", reason="the cluster extra is not installed (pip install hnmix[cluster])")


def cluster_up() -> str | None:
    """None when a SLURM cluster answers, else why not."""
    if shutil.which("sinfo") is None:
        return "no SLURM here (apt-get install slurm-wlm munge; scripts/slurm-cluster.sh start)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        out = None
    if out is None or out.returncode != 0 or not out.stdout.split():
        return "no SLURM cluster answers (scripts/slurm-cluster.sh start)"
    return None


NO_CLUSTER = cluster_up()
needs_cluster = pytest.mark.skipif(NO_CLUSTER is not None, reason=str(NO_CLUSTER))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY_BASE = {"arch": "test_resnet", "image_size": 16, "batch_size": 8, "queue_size": 32, "dim": 16, "epochs": 1,
             "workers": 0, "knn_every": 1, "log_every": 1}


def sbatch_text(settings: SlurmSettings, tmp_path) -> str:
    from hnmix.launch.slurm import executor

    ex = executor(settings, tmp_path, "t")
    return ex._make_submission_file_text(ex._submitit_command_str, "uid")


def test_flags_become_the_sbatch_request(tmp_path):
    text = sbatch_text(SlurmSettings(nodes=2, gpus_per_node=4, partition="gpu", account="lab", qos="high",
                                     constraint="a100", time_min=90, signal_before_s=300,
                                     slurm=["mem=64G", "exclude=node7", "exclusive=true"]), tmp_path)
    for line in ["--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=lab",
                 "--qos=high", "--constraint=a100", "--time=90", "--signal=USR2@300", "--mem=64G",
                 "--exclude=node7", "--exclusive", "--requeue"]:
        assert f"#SBATCH {line}\n" in text, line
    assert f"{sys.executable} -u -m submitit" in text  # the job runs this very Python, its venv and all
    cpu = sbatch_text(SlurmSettings(), tmp_path)
    assert "#SBATCH --ntasks-per-node=1\n" in cpu and "gpus" not in cpu and "--partition" not in cpu


def test_the_job_requeues_as_a_resume_of_the_same_run(tmp_path):
    from hnmix.launch.slurm import PretrainJob

    cfg = PretrainConfig(data="demo", output=str(tmp_path / "r"), method="mochi")
    job = pickle.loads(pickle.dumps(PretrainJob(cfg)))  # what submitit writes into its folder
    again = job.checkpoint()
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert again.function.cfg == cfg.model_copy(update={"resume": "auto"}) and job.cfg.resume is None


def test_bad_launcher_flags_are_one_line(runner, tmp_path):
    assert_clean_error(runner.invoke(app, ["pretrain", "--data", "demo", "--launcher", "slurm", "--slurm", "mem"]),
                       "--slurm: expects KEY=VALUE, got 'mem'")
    assert_clean_error(runner.invoke(app, ["pretrain", "--data", "demo", "--launcher", "pbs"]), "--launcher")
    assert_clean_error(runner.invoke(app, ["compare", "--grid", "seed=0,1", "-o", str(tmp_path / "c"),
                                           "--launcher", "slurm", "--parallel", "2"]),
                       "--parallel applies to --launcher local")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "last.pt").write_bytes(b"")
    assert_clean_error(runner.invoke(app, ["pretrain", "--data", "demo", "-o", str(tmp_path / "done"),
                                           "--launcher", "slurm"]), "already holds a run (last.pt)")


# ------------------------------------------------------------------------------------------ real jobs


def hnmix(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hnmix", *args], env=ENV, capture_output=True, text=True,
                          timeout=300, **kwargs)


@pytest.fixture
def tiny_base(tmp_path) -> Path:
    write_images(tmp_path / "data" / "train", 32, classes=["a", "b"])
    write_images(tmp_path / "data" / "val", 16, classes=["a", "b"], seed=1)
    base = tmp_path / "B.yaml"
    base.write_text(yaml.safe_dump({"data": str(tmp_path / "data"), **TINY_BASE, "max_steps": 8}))
    return base


@pytest.mark.slow
@needs_cluster
def test_compare_runs_the_grid_as_slurm_jobs_and_resubmits_what_failed(tmp_path, tiny_base):
    out = tmp_path / "cmp"
    cmd = ["compare", "--config", str(tiny_base), "--grid", "method=moco", "--grid", "seed=0,1",
           "--launcher", "slurm", "-o", str(out), "--no-analyze"]
    first = hnmix(*cmd)
    assert first.returncode == 0, first.stdout + first.stderr
    jobs = json.loads((out / "slurm" / "jobs.json").read_text())
    names = ["method-moco_seed-0", "method-moco_seed-1"]
    array = {job_id.split("_")[0] for job_id in jobs.values()}
    assert sorted(jobs) == names and len(array) == 1, jobs  # one job array, a task per run
    for name in names:
        assert (out / name / "backbone.pt").is_file() and not (out / name / "pretrain.log").exists()
        log = (out / "slurm" / jobs[name] / f"{jobs[name]}_0_log.out").read_text()
        assert "hnmix pretrain" in log and "Job completed successfully" in log  # trained inside the job
    report = (out / "compare.md").read_text()
    assert "method-moco" in report and "n=2" in report

    (out / names[1] / "backbone.pt").unlink()  # as a run whose job died after its last checkpoint
    again = hnmix(*cmd)  # the finished run is skipped, the other one submitted again
    assert again.returncode == 0, again.stdout + again.stderr
    now = json.loads((out / "slurm" / "jobs.json").read_text())
    assert now[names[0]] == jobs[names[0]] and f"{names[0]}: skipped (finished)" in again.stdout
    assert now[names[1]] != jobs[names[1]] and f"{names[1]}: SLURM job {now[names[1]]} (resumes its last.pt)" in \
        again.stdout
    assert (out / names[1] / "backbone.pt").is_file()


def last_step(metrics: Path) -> int:
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    return json.loads(lines[-1])["step"] if lines else 0


def slurm_state(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True,
                          text=True).stdout.strip()


def until(condition, what: str, timeout: float = 90):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def interrupt(job_id: str, out: Path, at_step: int, command: list[str]) -> None:
    """At at_step, interrupt the running job with command; have it start again at once once requeued
    (SLURM holds a requeued job for about two minutes before it may start again)."""
    until(lambda: last_step(out / "metrics.jsonl") >= at_step, f"step {at_step}")
    subprocess.run(command, check=True)
    until(lambda: slurm_state(job_id) == "PENDING", "the requeued job")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


@pytest.mark.slow
@needs_cluster
def test_a_job_requeued_mid_run_resumes_bit_identically(tmp_path, tiny_base):
    args = ["pretrain", "--config", str(tiny_base), "--set", "max_steps=60", "--set", "epochs=15",
            "--set", "knn_every=0"]
    out = tmp_path / "job"
    log = tmp_path / "wait.log"
    with open(log, "w") as f:
        waiting = subprocess.Popen([sys.executable, "-m", "hnmix", *args, "-o", str(out), "--launcher", "slurm",
                                    "--wait"], env={**ENV, "PYTHONUNBUFFERED": "1"}, stdout=f, stderr=f)
    until(lambda: "submitted SLURM job" in log.read_text(), "the submission")
    job_id = re.search(r"submitted SLURM job (\d+)", log.read_text())[1]
    full = subprocess.Popen([sys.executable, "-m", "hnmix", *args, "-o", str(tmp_path / "full")], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    interrupt(job_id, out, 12, ["scontrol", "requeue", job_id])  # preemption: SIGTERM, SLURM requeues
    until(lambda: slurm_state(job_id) == "RUNNING", "the restart")
    interrupt(job_id, out, 35, ["scancel", "--signal=USR2", job_id])  # the time limit's warning: it requeues itself
    until(lambda: slurm_state(job_id) in ("COMPLETED", "FAILED"), "the end of the job", timeout=120)
    assert full.wait(timeout=120) == 0, full.stderr.read()
    waiting.wait(timeout=60)  # --wait followed the job through both requeues
    followed = log.read_text()
    assert waiting.returncode == 0 and f"tail -f {out}/slurm/{job_id}/{job_id}_0_log.out" in followed, followed
    assert followed.count("hnmix pretrain") == 3 and f"job {job_id}: COMPLETED" in followed, followed

    assert slurm_state(job_id) == "COMPLETED"
    errors = (out / "slurm" / job_id / f"{job_id}_0_log.err").read_text()
    stops = [int(s) for s in re.findall(r"terminated after step (\d+): saved", errors)]
    assert len(stops) == 2 and 12 <= stops[0] < stops[1] < 60, errors  # both stops saved mid-run
    assert "Caught signal SIGUSR2" in errors
    a = torch.load(tmp_path / "full" / "backbone.pt", weights_only=True)
    b = torch.load(out / "backbone.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61)), "each step logged once across both requeues"


@pytest.mark.slow
def test_local_parallel_runs_two_grid_points_at_once(tmp_path, tiny_base):
    out = tmp_path / "cmp"
    result = hnmix("compare", "--config", str(tiny_base), "--grid", "seed=0,1", "--launcher", "local",
                   "--parallel", "2", "-o", str(out), "--no-analyze")
    assert result.returncode == 0, result.stdout + result.stderr
    events = [line.split(":")[0] + (" start" if ": starting" in line else " end") for line in
              result.stdout.splitlines() if ": starting (" in line or ": exit " in line]
    assert events[:2] == ["seed-0 start", "seed-1 start"] and sorted(events[2:]) == ["seed-0 end", "seed-1 end"]
    assert "OMP_NUM_THREADS=1" in result.stdout  # ENV's one thread each (2 cores / 2 runs otherwise)
    for name in ("seed-0", "seed-1"):
        assert (out / name / "backbone.pt").is_file() and "hnmix pretrain" in (out / name / "pretrain.log").read_text()
    assert "n=2" in (out / "compare.md").read_text()


@pytest.mark.slow
def test_ctrl_c_reaches_every_parallel_run_which_saves_its_step(tmp_path, tiny_base):
    out = tmp_path / "cmp"
    proc = subprocess.Popen([sys.executable, "-m", "hnmix", "compare", "--config", str(tiny_base), "--grid",
                             "seed=0,1", "--set", "epochs=50", "--set", "max_steps=200", "--set", "knn_every=0",
                             "--parallel", "2", "-o", str(out), "--no-analyze"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    until(lambda: all(last_step(out / f"seed-{s}" / "metrics.jsonl") >= 2 for s in (0, 1)), "both runs training")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted during seed-0, seed-1" in " ".join(stderr.split()), stderr
    for s in (0, 1):
        saved = torch.load(out / f"seed-{s}" / "last.pt", weights_only=True)["step"]
        assert 2 <= saved < 200 and not (out / f"seed-{s}" / "backbone.pt").exists()


@pytest.mark.slow
@needs_cluster
def test_a_two_task_job_trains_under_ddp_as_torchrun_does(tmp_path, tiny_base):
    """Two tasks on the node (as two GPUs would be): ranks from SLURM's environment, gloo; the weights equal
    those of `torchrun --nproc_per_node=2` with the same settings."""
    from hnmix.core.settings import load_config
    from hnmix.launch import slurm

    cfg = load_config(PretrainConfig, tiny_base, {"output": str(tmp_path / "job"), "max_steps": 6,
                                                  "knn_every": 0})
    ex = slurm.executor(SlurmSettings(), tmp_path / "slurm", "ddp")
    ex.update_parameters(ntasks_per_node=2)  # --gpus-per-node 2 asks for this, with GPUs
    job = ex.submit(slurm.PretrainJob(cfg))
    assert slurm.wait([job]) == {job.job_id: "COMPLETED"}
    assert "global 8 = 2 x 4 per rank" in slurm.log_paths(job)[0].read_text()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "hnmix", "pretrain",
                    "--config", str(tiny_base), "--set", "max_steps=6", "--set", "knn_every=0", "-o",
                    str(tmp_path / "torchrun")], env=ENV, check=True, capture_output=True, timeout=300)
    a = torch.load(tmp_path / "torchrun" / "backbone.pt", weights_only=True)
    b = torch.load(tmp_path / "job" / "backbone.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_requeued_job_keeps_its_resume_file_until_it_has_a_checkpoint_of_its_own(tmp_path):
    from hnmix.launch.slurm import continued

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "last.pt").write_bytes(b"")  # settings check only that it exists
    cfg = PretrainConfig(data="demo", output=str(tmp_path / "run"), resume=str(tmp_path / "other" / "last.pt"))
    assert continued(cfg).resume == cfg.resume  # preempted before its first save: start as asked
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    assert continued(cfg).resume == "auto"
    assert continued(cfg.model_copy(update={"resume": None})).resume == "auto"
