"""`hnmix pretrain --launcher slurm`: submit the run as one SLURM job, say where it logs, optionally follow it."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from rich.console import Console

from hnmix.cliopts import collect_flags, option_parameter, parse_value
from hnmix.core.settings import load_settings
from hnmix.errors import HnmixError
from hnmix.launch import slurm
from hnmix.launch.config import LaunchSettings
from hnmix.train.run_dir import refuse_overwrite


def _flags(cls):
    return [dataclasses.replace(f, name="launch_" + f.name) for f in collect_flags(cls)]


def launch_options(cls=LaunchSettings) -> dict:
    """The launcher's flags, as settings_command's `extra` parameters (name -> (annotation, default))."""
    return {f.name: (option_parameter(f).annotation, None) for f in _flags(cls)}


def launch_settings(values: dict, cls=LaunchSettings) -> LaunchSettings:
    """The launcher settings from those parameters' values; errors name the flag."""
    given = {}
    for flag in _flags(cls):
        value = parse_value(flag, values.get(flag.name))
        if value is not None:
            given[flag.paths[0]] = (flag.decls[0].split("/")[0], value)
    return load_settings(cls, None, given)


def submit_pretrain(cfg, launch: LaunchSettings, console: Console | None = None) -> int:
    """Submit; print the job id, its logs and how to follow it; with --wait follow it. Returns an exit code."""
    console = console or Console()
    out = Path(cfg.output)
    refuse_overwrite(out, cfg.resume)  # now: the job would refuse it anyway, minutes later
    job = slurm.submit([cfg], launch, launch.folder(out), name=f"hnmix-{out.name}")[0]
    stdout, stderr = slurm.log_paths(job)
    ranks = launch.nodes * max(launch.gpus_per_node, 1)
    console.print(f"submitted SLURM job {job.job_id}: {launch.nodes} node(s) x {max(launch.gpus_per_node, 1)} "
                  f"task(s) = {ranks} rank(s), run directory {out}", highlight=False, soft_wrap=True)
    console.print(f"log: {stdout}\nerrors: {stderr}\nfollow: tail -f {shlex.quote(str(stdout))}   "
                  f"state: squeue -j {job.job_id}   cancel: scancel {job.job_id}", highlight=False,
                  soft_wrap=True)
    if not launch.wait:
        return 0
    follow = slurm.Follower(stdout, stderr, write=lambda text: console.out(text, highlight=False))
    try:
        final = slurm.wait([job], poll=follow)[job.job_id]
    except KeyboardInterrupt:
        raise HnmixError(f"stopped following job {job.job_id}; it goes on (squeue -j {job.job_id}, scancel "
                         f"{job.job_id})") from None
    follow()
    done = (out / "backbone.pt").is_file()
    console.print(f"job {job.job_id}: {final}" + ("" if done else f" without backbone.pt: {slurm.last_line(stderr)}"),
                  highlight=False, soft_wrap=True)
    return 0 if done and final == "COMPLETED" else 1
