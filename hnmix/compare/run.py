"""`hnmix compare`: every grid point pretrained at the same budget, measured, and reported with its noise."""

from __future__ import annotations

import json
import shlex
import signal
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from hnmix import __version__
from hnmix.compare import evaluate, plots
from hnmix.compare.claims import ArmData, GridBudget, judge_all
from hnmix.compare.config import CompareConfig
from hnmix.compare.grid import BUDGET_KEYS, Point, cross, parse_baseline, parse_grid
from hnmix.compare.launchers import JobRecord, run_parallel
from hnmix.compare.report import METRICS, print_console, write_files
from hnmix.compare.runs import (
    Interrupted,
    Run,
    check_drift,
    launch,
    plan_runs,
    pretrain_command,
    shell_line,
)
from hnmix.compare.stats import difference, holm_family, summary
from hnmix.config import PretrainConfig
from hnmix.core.log import eval_progress, last_line
from hnmix.core.settings import setting_names
from hnmix.data.demo import DEMO
from hnmix.errors import HnmixError
from hnmix.launch import slurm
from hnmix.train.run_dir import recorded_changes

PROBE_KEYS = {"fast": "probe", "moco": "linear"}  # --probe -> metric key prefix
BUDGET_SHOWN = ("epochs", "max_steps", "batch_size", "data", "arch", "image_size")
CONTINUE = ("rerun the same command to continue: finished runs are skipped, an interrupted one resumes from "
            "last.pt")


def command_line(cfg: CompareConfig) -> str:
    """The compare command that reproduces this report."""
    parts = ["hnmix", "compare"] + (["--config", cfg.config] if cfg.config else [])
    parts += [x for g in cfg.grid for x in ("--grid", g)] + [x for s in cfg.sets for x in ("--set", s)]
    parts += ["--output", cfg.output] + (["--baseline", cfg.baseline] if cfg.baseline else [])
    parts += ["--probe", cfg.probe] if cfg.probe != "none" else []
    parts += [] if cfg.analyze else ["--no-analyze"]
    parts += [x for s in cfg.analyze_sets for x in ("--analyze-set", s)]
    parts += ["--allow-budget-grid"] if cfg.allow_budget_grid else []
    parts += ["--dataset-name", cfg.dataset_name] if cfg.dataset_name else []
    parts += ["--results-doc", cfg.results_doc] if cfg.results_doc else []
    return shlex.join(parts)


def dataset_name(cfg: CompareConfig, run: Run) -> str:
    if cfg.dataset_name:
        return cfg.dataset_name
    data = run.config.data
    if data == DEMO:
        return DEMO
    path = Path(data).resolve()
    return path.parent.name if path.name in ("train", "val", "test") else path.name  # imagenet100/train


def method_of(run: Run) -> str:
    return run.config.method + ("+oracle" if run.config.oracle_labels else "")


# ------------------------------------------------------------------------------------------ running


def measure(run: Run, cfg: CompareConfig) -> dict:
    """kNN (monitor or lineval) and the optional probe of a finished run."""
    records = evaluate.read_records(run.dir)
    knn = evaluate.final_knn(run, records)
    metrics = {"knn_top1": knn["top1"], "knn_top5": knn["top5"]}
    if cfg.probe != "none":  # the fast probe's numbers and MoCo's protocol's are kept apart
        probe, key = evaluate.lineval(run, cfg.probe), PROBE_KEYS[cfg.probe]
        metrics.update({f"{key}_top1": probe["top1"], f"{key}_top5": probe["top5"]})
    return {"metrics": metrics, "knn_source": knn["source"], "curve": evaluate.knn_curve(records)}


def measure_and_say(run: Run, cfg: CompareConfig, console: Console, tag: str) -> dict:
    m = measure(run, cfg)
    probe = "".join(f"  {key} top-1 {m['metrics'][key + '_top1']:.2f}" for key in PROBE_KEYS.values()
                    if key + "_top1" in m["metrics"])
    console.print(f"{tag}: kNN top-1 {m['metrics']['knn_top1']:.2f}  top-5 {m['metrics']['knn_top5']:.2f} "
                  f"({m['knn_source']}){probe}", highlight=False, soft_wrap=True)
    return m


def _epoch_now(run: Run) -> str:
    """The epoch the running run has reached, from the tail of its metrics.jsonl."""
    path = run.dir / "metrics.jsonl"
    if not path.is_file():
        return "starting"
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 4096))
        lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
    try:
        return f"epoch {json.loads(lines[-1])['epoch']:.2f}/{run.config.epochs}" if lines else "starting"
    except (ValueError, KeyError):  # a line being written
        return "running"


def train_one(run: Run, cfg: CompareConfig, console: Console, tag: str, on_poll) -> str | None:
    """Start or resume one run, its output into RUN/pretrain.log; returns why it failed, or None."""
    resuming = (run.dir / "last.pt").is_file()
    console.print(f"{tag}: {'resumed from its last.pt' if resuming else 'starting'} "
                  f"(log: {run.dir / 'pretrain.log'})", highlight=False, soft_wrap=True)
    start = time.perf_counter()
    log = run.dir / "pretrain.log"
    code = launch(pretrain_command(run, cfg.config, cfg.sets), log, what=f"run {run.name}", poll=on_poll)
    if code != 0 or not run.finished:
        failure = f"failed (exit {code}): {last_line(log)}"
        console.print("[red]" + escape(f"{tag}: {failure}") + "[/]", highlight=False, soft_wrap=True)
        return failure
    console.print(f"{tag}: done in {time.perf_counter() - start:.0f} s", highlight=False)
    return None


def train_all(runs: list[Run], cfg: CompareConfig, console: Console) -> tuple[dict, dict]:
    """Launch what is not finished, one run at a time (or --parallel, or as SLURM jobs); returns
    ({name: measurement}, {name: failure})."""
    if cfg.launcher == "slurm":
        return train_slurm(runs, cfg, console)
    if cfg.parallel > 1:
        return train_parallel(runs, cfg, console)
    measured, failed = {}, {}
    with eval_progress(console) as progress:
        task = progress.add_task("runs", total=len(runs), info="")
        for i, run in enumerate(runs, 1):
            tag = f"[{i}/{len(runs)}] {run.name}"
            if run.finished:
                console.print(f"{tag}: skipped (finished)", highlight=False, soft_wrap=True)
            else:
                progress.update(task, info=run.name)
                failure = train_one(run, cfg, console, tag, on_poll=lambda run=run: progress.update(
                    task, info=f"{run.name}: {_epoch_now(run)}"))
                if failure:
                    failed[run.name] = failure
            if run.name not in failed:
                measured[run.name] = measure_and_say(run, cfg, console, tag)
            progress.advance(task)
    return measured, failed


def _skip_finished(runs: list[Run], console: Console) -> list[Run]:
    for run in runs:
        if run.finished:
            console.print(f"{run.name}: skipped (finished)", highlight=False, soft_wrap=True)
    return [run for run in runs if not run.finished]


def _outcome(runs: list[Run], cfg: CompareConfig, console: Console, why_failed) -> tuple[dict, dict]:
    """Measure the finished runs in grid order; the others failed for why_failed(run)."""
    measured, failed = {}, {}
    for run in runs:
        if run.finished:
            measured[run.name] = measure_and_say(run, cfg, console, run.name)
        else:
            failed[run.name] = why_failed(run)
            console.print("[red]" + escape(f"{run.name}: {failed[run.name]}") + "[/]", highlight=False,
                          soft_wrap=True)
    return measured, failed


def train_parallel(runs: list[Run], cfg: CompareConfig, console: Console) -> tuple[dict, dict]:
    """--parallel N: N runs at once (launchers.run_parallel), then each measured."""
    todo, codes = _skip_finished(runs, console), {}
    started = {}

    def on_start(name: str, env: dict) -> None:
        started[name] = time.perf_counter()
        console.print(f"{name}: starting ({', '.join(f'{k}={v}' for k, v in env.items())}; log: "
                      f"{cfg.output}/{name}/pretrain.log)", highlight=False, soft_wrap=True)

    def on_end(name: str, code: int) -> None:
        codes[name] = code
        console.print(f"{name}: exit {code} after {time.perf_counter() - started[name]:.0f} s", highlight=False)

    with eval_progress(console) as progress:
        task = progress.add_task("runs", total=None, info="")
        run_parallel([(r.name, pretrain_command(r, cfg.config, cfg.sets), r.dir / "pretrain.log") for r in todo],
                     cfg.parallel, on_start, on_end,
                     lambda names: progress.update(task, info="; ".join(
                         f"{r.name}: {_epoch_now(r)}" for r in todo if r.name in names)))
    return _outcome(runs, cfg, console, lambda run: f"failed (exit {codes.get(run.name)}): "
                    f"{last_line(run.dir / 'pretrain.log')}")


def train_slurm(runs: list[Run], cfg: CompareConfig, console: Console) -> tuple[dict, dict]:
    """Every unfinished run as a SLURM job (one job array); a job of an earlier call still queued or running
    is waited for, not submitted twice; a failed one is submitted again and resumes from its last.pt."""
    folder = cfg.folder(cfg.output)
    record, todo = JobRecord(folder), _skip_finished(runs, console)
    jobs, recorded = {}, record.read()
    for run in todo:
        job_id = recorded.get(run.name)
        if job_id and slurm.state(job_id) not in slurm.ENDED:
            jobs[run.name] = slurm.existing(folder, job_id)
            console.print(f"{run.name}: SLURM job {job_id} of an earlier call still active: waiting for it",
                          highlight=False, soft_wrap=True)
    new = [r for r in todo if r.name not in jobs]
    configs = [r.config.model_copy(update={"resume": "auto" if r.state == "unfinished" else None}) for r in new]
    submitted = slurm.submit(configs, cfg, folder, name=f"hnmix-{Path(cfg.output).name}") if new else []
    record.write({r.name: job.job_id for r, job in zip(new, submitted, strict=True)})
    for run, job in zip(new, submitted, strict=True):
        jobs[run.name] = job
        console.print(f"{run.name}: SLURM job {job.job_id}{' (resumes its last.pt)' if run.state == 'unfinished' else ''}"
                      f", log {slurm.log_paths(job)[0]}", highlight=False, soft_wrap=True)
    states = {}
    if jobs:
        console.print(f"waiting for {len(jobs)} job(s): squeue -j {','.join(j.job_id for j in jobs.values())}",
                      highlight=False, soft_wrap=True)
        try:
            with eval_progress(console) as progress:
                task = progress.add_task("jobs", total=None, info="")
                states = slurm.wait(list(jobs.values()), poll=lambda st: progress.update(task, info=", ".join(
                    f"{name} {st.get(job.job_id, '?')}" for name, job in jobs.items())))
        except KeyboardInterrupt:  # the jobs go on; a rerun waits for them (JobRecord) instead of resubmitting
            raise Interrupted("interrupted while waiting; the SLURM jobs go on (squeue)", signal.SIGINT) from None
    return _outcome(runs, cfg, console, lambda run: f"SLURM job {jobs[run.name].job_id} "
                    f"{states.get(jobs[run.name].job_id)}: {slurm.last_line(slurm.log_paths(jobs[run.name])[1])}")


def print_commands(runs: list[Run], cfg: CompareConfig) -> list[str]:
    """One runnable line per run still to do (stdout); finished runs are noted on stderr."""
    lines = []
    for run in runs:
        if run.finished:
            Console(stderr=True).print(f"# {run.name}: finished, skipped", highlight=False, soft_wrap=True)
            continue
        lines.append(shell_line(pretrain_command(run, cfg.config, cfg.sets, python="python")))
    for line in lines:
        print(line)
    return lines


# ------------------------------------------------------------------------------------------ report


def run_record(run: Run, measurement: dict, analysis: dict) -> dict:
    return {"name": run.name, "arm": run.point.arm.name, "seed": run.config.seed,
            "point": dict(run.point.items), "method": method_of(run), "dir": str(run.dir),
            "knn_source": measurement["knn_source"], "metrics": {**measurement["metrics"], **analysis},
            "curve": measurement["curve"], "changed_on_resume": recorded_changes(run.dir)}


def arms_of(records: list[dict], points: list[Point]) -> list[ArmData]:
    """The arms in grid order, each with its per-seed values of every metric."""
    arms: dict[str, ArmData] = {}
    for point in points:
        arms.setdefault(point.arm.name, ArmData(point.arm.name, dict(point.arm.items), ""))
    for r in records:
        arm = arms[r["arm"]]
        arm.method = r["method"]
        for key, value in r["metrics"].items():
            arm.values.setdefault(key, {})[r["seed"]] = value
    return [a for a in arms.values() if a.method]  # arms without a finished run drop out


def differences(arms: list[ArmData], baseline: dict[str, str]) -> list[dict]:
    """Each arm against its baseline arm: the baseline's values, the arm's values elsewhere."""
    by_point = {tuple(a.point.items()): a for a in arms}
    out = []
    for arm in arms:
        base = by_point.get(tuple({**arm.point, **baseline}.items()))
        if base is None or base is arm:
            continue
        for metric in METRICS:
            if metric.key in arm.values and metric.key in base.values:
                interval = difference(arm.values[metric.key], base.values[metric.key])
                out.append({"arm": arm.name, "baseline": base.name, "metric": metric.key,
                            **interval.as_dict()})
    return holm_family(out)  # better/worse controlled over the family of arm x metric


def missing_reason(run: Run) -> str:
    return "unfinished (no backbone.pt)" if run.dir.exists() else "not started"


def build_report(cfg: CompareConfig, runs: list[Run], records: list[dict], missing: list[dict],
                 baseline: dict, axes) -> dict:
    points = [run.point for run in runs]
    arms = arms_of(records, points)
    first = runs[0].config
    budget = {k: getattr(first, k) for k in BUDGET_SHOWN}
    budget["varies"] = [axis.key for axis in axes if axis.key in BUDGET_KEYS]
    epochs = min(run.config.epochs for run in runs)
    return {
        "command": command_line(cfg), "generated": time.strftime("%Y-%m-%d %H:%M"),
        "hnmix_version": __version__,
        "settings": cfg.model_dump(mode="json"), "budget": budget, "dataset": dataset_name(cfg, runs[0]),
        "grid": {axis.key: list(axis.texts) for axis in axes}, "baseline": baseline, "planned": len(runs),
        "runs": records, "missing": missing,
        "arms": [{"name": a.name, "point": a.point, "method": a.method,
                  "seeds": sorted(next(iter(a.values.values()))),
                  "metrics": {k: {**summary([v[s] for s in sorted(v)]), "by_seed": {str(s): v[s] for s in sorted(v)}}
                              for k, v in a.values.items()}}
                 for a in arms],
        "differences": differences(arms, baseline),
        "claims": judge_all(arms, GridBudget(dataset_name(cfg, runs[0]), epochs, cfg.probe,
                                             max(run.config.max_steps or 0 for run in runs) or None)),
        "plots": [],
    }


def run_compare(cfg: CompareConfig, console: Console | None = None) -> dict:
    console = console or Console()
    axes = parse_grid(cfg.grid, setting_names(PretrainConfig), cfg.sets, cfg.allow_budget_grid)
    baseline = parse_baseline(cfg.baseline, axes)
    out = Path(cfg.output)
    runs = plan_runs(cross(axes), out, cfg.config, cfg.sets)
    check_drift(runs)
    if cfg.dry_run:
        return {"commands": print_commands(runs, cfg)}
    try:
        if cfg.report_only:
            measured = {r.name: measure_and_say(r, cfg, console, r.name) for r in runs if r.finished}
            failed = {}
        else:
            measured, failed = train_all(runs, cfg, console)
        done = [r for r in runs if r.name in measured]
        analysis = evaluate.analyze(done, out / "analysis", cfg.analyze_sets) if cfg.analyze and done else {}
    except Interrupted as e:
        raise Interrupted(f"{e}; {CONTINUE}", e.signum) from None
    records = [run_record(r, measured[r.name], analysis.get(r.name, {})) for r in done]
    missing = [{"name": r.name, "reason": failed.get(r.name) or missing_reason(r)}
               for r in runs if r.name not in measured]
    report = build_report(cfg, runs, records, missing, baseline, axes)
    arm_names = [a["name"] for a in report["arms"]]
    figures = [plots.knn_by_epoch(records, arm_names, out / "knn_by_epoch.png"),
               plots.alignment_uniformity(records, arm_names, out / "alignment_uniformity.png")]
    report["plots"] = [str(p) for p in figures if p]
    write_files(report, out, cfg.results_doc)
    print_console(report, console)
    console.print(f"-> {out / 'compare.md'}, {out / 'compare.json'}"
                  + (f", {cfg.results_doc}" if cfg.results_doc else ""), highlight=False, soft_wrap=True)
    if failed:  # the report covers the others; a script must still see that the grid is incomplete
        raise HnmixError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}): see their "
                         "pretrain.log; the report covers the others")
    return report

