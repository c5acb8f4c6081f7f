"""Settings of the launchers: where `pretrain` and `compare` runs go (here, or SLURM jobs through submitit)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import field_validator

from hnmix.core.settings import Settings, setting

SLURM = "Cluster (--launcher slurm)"


class SlurmSettings(Settings):
    """What one SLURM job asks for; every job of a grid asks for the same."""

    nodes: int = setting(1, "nodes per job; the ranks of all nodes train one run together (DDP)", ge=1,
                         flags=("--nodes",), panel=SLURM)
    gpus_per_node: int = setting(0, "GPUs per node, one task (rank) each; 0 = a CPU job: one task per node, "
                                 "gloo", ge=0, flags=("--gpus-per-node",), panel=SLURM)
    cpus_per_task: int | None = setting(None, "CPU cores per task (data workers and threads); default: the "
                                        "partition's", ge=1, flags=("--cpus-per-task",), panel=SLURM)
    partition: str | None = setting(None, "SLURM partition; default: the cluster's default partition",
                                    flags=("--partition",), panel=SLURM)
    time_min: int = setting(24 * 60, "time limit of one job in minutes; a run that needs longer saves last.pt "
                            "before the limit and requeues itself", ge=1, flags=("--time-min",), panel=SLURM)
    account: str | None = setting(None, "sbatch --account", flags=("--account",), panel=SLURM)
    qos: str | None = setting(None, "sbatch --qos", flags=("--qos",), panel=SLURM)
    constraint: str | None = setting(None, "sbatch --constraint (node features, e.g. a100)",
                                     flags=("--constraint",), panel=SLURM)
    slurm: list[str] = setting([], "any other sbatch parameter, e.g. mem=64G or exclusive=true (repeatable)",
                               flags=("--slurm",), metavar="KEY=VALUE", panel=SLURM)
    signal_before_s: int = setting(120, "seconds before the time limit at which SLURM signals the job "
                                   "(USR2): it saves last.pt and requeues itself", ge=10,
                                   flags=("--signal-before-s",), panel=SLURM)
    slurm_folder: str | None = setting(None, "where submitit writes the job scripts, logs and its own "
                                       "pickles; default: OUTPUT/slurm", flags=("--slurm-folder",),
                                       metavar="DIR", panel=SLURM)

    @field_validator("slurm")
    @classmethod
    def _pairs(cls, v: list[str]) -> list[str]:
        bad = [item for item in v if not item.partition("=")[0].strip() or "=" not in item]
        if bad:
            raise ValueError(f"expects KEY=VALUE, got '{bad[0]}'")
        return v

    def folder(self, output: str | Path) -> Path:
        """Where submitit's files go: --slurm-folder, or OUTPUT/slurm."""
        return Path(self.slurm_folder) if self.slurm_folder else Path(output) / "slurm"

    def extra_parameters(self) -> dict:
        """--slurm KEY=VALUE as sbatch parameters: mem=64G -> --mem=64G, exclusive=true -> --exclusive."""
        pairs = (item.partition("=") for item in self.slurm)
        return {key.strip().replace("-", "_"): True if value.strip().lower() in ("true", "") else value.strip()
                for key, _, value in pairs}


class LaunchSettings(SlurmSettings):
    """`hnmix pretrain`'s launcher flags."""

    launcher: Literal["local", "slurm"] = setting("local", "local = train in this process (or under "
                                                  "torchrun); slurm = submit the run as a SLURM job (needs "
                                                  "hnmix[cluster]) and return", flags=("--launcher",), panel=SLURM)
    wait: bool = setting(False, "with --launcher slurm: follow the job's log until it ends (its exit code "
                         "becomes this command's)", flags=("--wait",), panel=SLURM)
