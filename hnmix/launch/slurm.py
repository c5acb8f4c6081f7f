"""Pretraining runs as SLURM jobs, through submitit (the launcher of MoCo v3, DINO and VISSL).

Each task of a job runs the same `pretrain` with the same settings; submitit's environment gives the ranks
(one task per GPU, or one per node on CPUs), so hnmix.core.dist sets up DDP as under torchrun. Preemption
and time limits lose nothing: SLURM sends USR2 `--signal-before-s` before the limit (and on preemption);
the run then finishes its step, saves last.pt (hnmix.train.stop) and requeues itself; the requeued job
resumes with `--resume auto`, bit-exactly. A plain SIGTERM (scancel, `scontrol requeue`) saves last.pt too
and ends the task; SLURM decides whether the job comes back, and if it does it resumes the same way.

submitit pickles PretrainJob (hnmix's own code and a settings object) into its folder; nothing here loads
code from a user's file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from hnmix.core import log
from hnmix.core.stop import SignalFlag, Stopped
from hnmix.errors import HnmixError
from hnmix.launch.config import SlurmSettings
from hnmix.train.run_dir import holds_run

# job states after which nothing more happens (squeue --states=all); the others mean "not yet"
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "SPECIAL_EXIT", "REVOKED", "GONE"}


def submitit():
    try:
        import submitit as module
    except ImportError:
        raise HnmixError("--launcher slurm needs submitit: pip install 'hnmix[cluster]'") from None
    return module


def continued(cfg):
    """The settings of a requeued job: --resume auto (a fresh start while the run has no checkpoint), except
    that a --resume FILE stays until the run has a checkpoint of its own (not dropped for a fresh start)."""
    if cfg.resume is None or holds_run(cfg.output):
        return cfg.model_copy(update={"resume": "auto"})
    return cfg


class PretrainJob:
    """What every task of the job runs: `hnmix pretrain` with these settings, on this task's rank."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self) -> str:
        from hnmix.eval.monitor import knn_monitor_hooks
        from hnmix.train.loop import pretrain

        sm = submitit()
        env = sm.JobEnvironment()
        if env.num_tasks > 1:  # MASTER_ADDR/PORT (the first node), RANK, WORLD_SIZE, LOCAL_RANK from SLURM
            sm.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = continued(self.cfg) if int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0 else self.cfg
        usr = signal.Signals[f"SIG{env.USR_SIG}"]
        requeue = signal.getsignal(usr)  # submitit's: pickle checkpoint(), scontrol requeue, exit
        preempted: list[int] = []

        def on_preemption(signum, frame):
            preempted.append(signum)
            if isinstance(getattr(signal.getsignal(signal.SIGTERM), "__self__", None), SignalFlag):
                os.kill(os.getpid(), signal.SIGTERM)  # the run's stop flag: finish the step, save last.pt
            else:  # not training yet, or done: nothing to save beyond what is on disk
                requeue(signum, frame)

        signal.signal(usr, on_preemption)
        try:
            pretrain(cfg, hooks=knn_monitor_hooks(cfg))
        except Stopped as e:
            print(f"stopped: {e}", file=sys.stderr, flush=True)
            if preempted:
                requeue(preempted[0], None)  # rank 0 requeues and exits; the others end here
            sys.exit(e.exit_code)  # no result file: SLURM's requeue or scancel decides what comes next
        return str(cfg.output)

    def checkpoint(self):
        """submitit calls this on USR2 before requeueing: the next start continues from last.pt."""
        return submitit().helpers.DelayedSubmission(PretrainJob(continued(self.cfg)))


def executor(settings: SlurmSettings, folder: Path, name: str):
    """A submitit SlurmExecutor asking for what settings say; the job runs this very Python (its venv)."""
    sm = submitit()
    ex = sm.SlurmExecutor(folder=folder / "%j", max_num_timeout=1000, python=sys.executable)
    gpus = settings.gpus_per_node
    params = {"job_name": name, "nodes": settings.nodes, "ntasks_per_node": max(gpus, 1),
              "time": settings.time_min, "signal_delay_s": settings.signal_before_s,
              "additional_parameters": {"requeue": True, **settings.extra_parameters()}}  # preemptible
    params.update({k: v for k, v in {"gpus_per_node": gpus or None, "cpus_per_task": settings.cpus_per_task,
                                     "partition": settings.partition, "account": settings.account,
                                     "qos": settings.qos, "constraint": settings.constraint}.items() if v})
    ex.update_parameters(**params)
    return ex


def submit(configs: list, settings: SlurmSettings, folder: Path, name: str = "hnmix") -> list:
    """One job per pretrain config; several go as one job array (submitit's batch)."""
    ex = executor(settings, folder, name)
    try:
        if len(configs) == 1:
            return [ex.submit(PretrainJob(configs[0]))]
        with ex.batch():
            jobs = [ex.submit(PretrainJob(cfg)) for cfg in configs]
        return jobs
    except (FileNotFoundError, subprocess.CalledProcessError) as e:  # no sbatch, or sbatch refused
        detail = getattr(e, "stderr", b"") or b""
        detail = detail.decode(errors="replace").strip() if isinstance(detail, bytes) else str(detail)
        raise HnmixError(f"could not submit to SLURM: {detail or e}") from None


def state(job_id: str) -> str:
    """The job's SLURM state (GONE once slurmctld has forgotten it); no accounting database needed."""
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", job_id, "-o", "%T"], capture_output=True,
                         text=True)
    states = out.stdout.split()
    if out.returncode != 0 and not states:
        return "GONE" if "Invalid job id" in out.stderr else "UNKNOWN"
    return states[0] if states else "GONE"


def wait(jobs: list, poll: Callable[[dict], None] | None = None, every: float = 1.0,
         confirm: float = 5.0) -> dict[str, str]:
    """Block until every job has ended; returns {job id: final state}. A requeued job is waited for: an end
    counts once it still holds `confirm` seconds later (a requeue passes through an ended task first)."""
    states: dict[str, str] = {}
    ended_at: dict[str, float] = {}
    while True:
        for job in jobs:
            if job.job_id not in ended_at or time.monotonic() - ended_at[job.job_id] < confirm:
                states[job.job_id] = state(job.job_id)
                if states[job.job_id] not in ENDED:
                    ended_at.pop(job.job_id, None)
                else:
                    ended_at.setdefault(job.job_id, time.monotonic())
        if poll:
            poll(states)
        if len(ended_at) == len(jobs) and all(time.monotonic() - t >= confirm for t in ended_at.values()):
            return states
        time.sleep(every)


def log_paths(job) -> tuple[Path, Path]:
    """The first task's stdout and stderr (rank 0 prints the run's table and progress)."""
    return Path(job.paths.stdout), Path(job.paths.stderr)


def last_line(path: Path) -> str:
    return log.last_line(path, skip="submitit")  # submitit's own lines say nothing of the run


class Follower:
    """Prints what a log file gained since the last call (`--wait`)."""

    def __init__(self, *paths: Path, write=print):
        self.offsets = dict.fromkeys(paths, 0)
        self.write = write

    def __call__(self, _states=None) -> None:
        for path in self.offsets:
            if path.is_file():
                with open(path, errors="replace") as f:
                    f.seek(self.offsets[path])
                    chunk = f.read()
                    self.offsets[path] = f.tell()
                if chunk:
                    self.write(chunk.rstrip("\n"))


def existing(folder: Path, job_id: str):
    """The submitit handle of a job submitted earlier into folder (its logs, its state)."""
    return submitit().SlurmJob(folder=folder / "%j", job_id=job_id)
