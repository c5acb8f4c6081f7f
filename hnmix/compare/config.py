"""Settings of `hnmix compare`: one pydantic model, every field described (the descriptions are `--help`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hnmix.core.settings import setting
from hnmix.launch.config import SLURM, SlurmSettings


class CompareConfig(SlurmSettings):  # the SLURM settings apply to every job of --launcher slurm
    config: str | None = setting(None, flags=("--config",), metavar="FILE.yaml", description="YAML file of pretrain settings every run starts from "
                               "(epochs, batch and data come from here: the same budget for every run)")
    grid: list[str] = setting(..., flags=("--grid",), metavar="KEY=V1,V2", min_length=1, description="a setting and its comma-separated values, e.g. "
                            "method=moco,mochi or seed=0,1,2 (YAML values; repeatable, grids are crossed)")
    sets: list[str] = setting([], flags=("--set",), metavar="KEY=VALUE", description="key=value applied to every run, as pretrain --set")
    output: str = setting(..., flags=("--output", "-o"), metavar="DIR", description="directory of the comparison: one pretrain run directory per grid "
                        "point (e.g. method-mochi_seed-1) and the report (compare.md, compare.json, PNGs)")
    baseline: str | None = setting(None, metavar="KEY=VALUE", description="the arm every other arm is compared with, e.g. "
                                 "method=moco; default: the first value of the first grid that is not seed")
    probe: Literal["none", "fast", "moco"] = Field(
        "none", description="also measure each run with a linear probe: fast = hnmix lineval --protocol fast "
        "(minutes); moco = --protocol moco, MoCo's linear classification (what linear top-1 claims need)")
    analyze: bool = setting(True, flags=("--analyze/--no-analyze",), description="measure alignment, uniformity and false-negative rates with "
                          "hnmix analyze all (one call for all runs: the same images and views for each)")
    analyze_sets: list[str] = setting([], flags=("--analyze-set",), metavar="KEY=VALUE", description="key=value settings for hnmix analyze, e.g. top_k=100 "
                                    "(keep top_k well below the queue size)")
    allow_budget_grid: bool = setting(False, flags=("--allow-budget-grid",), description="allow a grid over data, epochs, batch_size or "
                                    "max_steps (the arms then differ in budget, not only in method)")
    dry_run: bool = setting(False, flags=("--dry-run",), description="print the pretrain command of every run that would start (one "
                          "per line; replace 'python' by 'torchrun --nproc_per_node=N') and exit")
    report_only: bool = setting(False, flags=("--report-only",), description="run nothing but evaluations: report the finished runs in "
                              "--output and list the others as missing")
    launcher: Literal["local", "slurm"] = setting("local", "local = run here (--parallel at once); slurm = "
                                                  "submit every unfinished run as a SLURM job (a job array), "
                                                  "wait, report", flags=("--launcher",), panel=SLURM)
    parallel: int = setting(1, "with --launcher local: runs at once, one GPU each (CUDA_VISIBLE_DEVICES), "
                            "else a share of the CPU cores each (OMP_NUM_THREADS)", ge=1, flags=("--parallel",))
    results_doc: str | None = Field(None, description="also write the claims and numbers as a standalone "
                                    "Markdown page (e.g. docs/results.md; generated, never edited by hand)")
    dataset_name: str | None = Field(None, description="what the data is, for the claims (e.g. imagenet-100, "
                                     "cifar-10); default: 'demo', or the data folder's name")

    @field_validator("config")
    @classmethod
    def _config_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).is_file():
            raise ValueError(f"config file not found: {v}")
        return v

    @model_validator(mode="after")
    def _one_mode(self) -> CompareConfig:
        if self.dry_run and self.report_only:
            raise ValueError("--dry-run and --report-only exclude each other")
        if self.parallel > 1 and self.launcher != "local":
            raise ValueError("--parallel applies to --launcher local (a cluster runs every job at once)")
        if Path(self.output).is_file():
            raise ValueError(f"--output {self.output} is a file, not a directory")
        return self
