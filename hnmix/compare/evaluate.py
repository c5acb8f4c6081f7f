"""What each finished run measured: kNN (its monitor, or `hnmix lineval --protocol knn`), the optional fast
probe, and alignment / uniformity / false negatives from one `hnmix analyze all` over every run.

Evaluations run as subprocesses (their output goes to a log, not the console) and are cached: a result is
reused while the sha256 of the run's last.pt matches the one recorded beside it and it was measured with the
run's eval transform (hnmix.data.labelled.choose_eval_transform). The monitor's kNN counts only when the
monitor used that transform too (runs made before hnmix recorded it used resize-crop at every size).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from hnmix.compare.runs import Run, launch
from hnmix.core.log import last_line
from hnmix.errors import HnmixError
from hnmix.eval.lineval import sha256_file


def read_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def knn_curve(records: list[dict]) -> list[dict]:
    """The kNN monitor's records: [{epoch, knn_top1, knn_top5, step}]."""
    return [{k: r[k] for k in ("step", "epoch", "knn_top1", "knn_top5")} for r in records if "knn_top1" in r]


def eval_data(run: Run) -> str:
    """The labelled data a run is evaluated on: its kNN monitor's (--knn-data, else --data)."""
    return run.config.knn_data or run.config.data


def monitor_eval_transform(run: Run) -> str:
    """The eval transform the run's kNN monitor used: the one its config.yaml records; resize-crop for runs
    of hnmix versions that did not record it (they used it at every size)."""
    path = run.dir / "config.yaml"
    saved = (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}
    return saved.get("eval_transform", "resize-crop")


def final_monitor_knn(records: list[dict]) -> dict | None:
    """The monitor's result at the run's last step, if it measured there (epochs a multiple of knn_every)."""
    curve = knn_curve(records)
    last_step = max((r["step"] for r in records), default=None)
    if curve and curve[-1]["step"] == last_step:
        return {"top1": curve[-1]["knn_top1"], "top5": curve[-1]["knn_top5"], "source": "monitor"}
    return None


def lineval(run: Run, protocol: str, python: str = sys.executable) -> dict:
    """`hnmix lineval --protocol P` on the run's last.pt, cached in RUN/lineval-P/lineval.json."""
    weights, out = run.dir / "last.pt", run.dir / f"lineval-{protocol}"
    cached = out / "lineval.json"
    sha = sha256_file(weights)
    if not (cached.is_file() and _same_lineval(json.loads(cached.read_text()), sha, run.config.eval_transform)):
        cached.unlink(missing_ok=True)  # lineval refuses to overwrite another protocol only; this is ours
        cmd = [python, "-m", "hnmix", "lineval", "--weights", str(weights), "--protocol", protocol,
               "--data", eval_data(run), "--output", str(out), "--workers", str(run.config.workers),
               "--device", run.config.device, "--eval-transform", run.config.eval_transform]
        log = run.dir / "eval.log"
        if launch(cmd, log, what=f"lineval {protocol} of {run.name}") != 0:
            raise HnmixError(f"hnmix lineval --protocol {protocol} failed on {weights}: {last_line(log)} "
                             f"(see {log})")
    report = json.loads(cached.read_text())
    return {"top1": report["top1"], "top5": report["top5"], "source": f"lineval {protocol}"}


def _same_lineval(report: dict, sha: str, eval_choice: str) -> bool:
    return report["weights"]["sha256"] == sha and report["hyperparameters"].get("eval_transform") == eval_choice


def final_knn(run: Run, records: list[dict], python: str = sys.executable) -> dict:
    """The monitor's last kNN when it used the run's eval transform, else `lineval --protocol knn`."""
    monitor = final_monitor_knn(records) if monitor_eval_transform(run) == run.config.eval_transform else None
    return monitor or lineval(run, "knn", python)


def analysis_metrics(result: dict, method: str) -> dict:
    """The numbers compare reports from one analysis.json result."""
    out = {k: result[k] for k in ("uniformity", "alignment", "class_alignment") if k in result}
    fn = result.get("false_negatives")
    if fn:
        out["fn_share"], out["fn_chance"] = fn["share"], fn["chance"]
        if method == "mochi" and fn["mochi"].get("mixed_share") is not None:  # other methods mix nothing
            out["mochi_fn"] = fn["mochi"]["mixed_share"]
    return out


def analyze(runs: list[Run], out: Path, sets: list[str], python: str = sys.executable) -> dict[str, dict]:
    """{run name: analysis metrics} from `hnmix analyze all` over every run of each evaluation dataset:
    one call, so every run sees the same images, augmented views and MoCHi draws."""
    results: dict[str, dict] = {}
    by_data: dict[str, list[Run]] = {}
    for run in runs:
        by_data.setdefault(eval_data(run), []).append(run)
    for i, (data, group) in enumerate(by_data.items()):
        target = out if len(by_data) == 1 else out.with_name(f"{out.name}-{i}")
        shas = {run.name: sha256_file(run.dir / "last.pt") for run in group}
        cached = _cached_results(target / "analysis.json")
        if not all(cached.get(shas[r.name], {}).get("eval_transform") == r.config.eval_transform for r in group):
            weights = [str(r.dir / "last.pt") for r in group]
            cmd = [python, "-m", "hnmix", "analyze", "all", "--weights", *weights, "--data", data,
                   "--output", str(target), "--json", "--workers", str(group[0].config.workers),
                   "--device", group[0].config.device, *(x for item in sets for x in ("--set", item))]
            log = target.with_suffix(".log")
            if launch(cmd, log, what="hnmix analyze") != 0:
                raise HnmixError(f"hnmix analyze failed: {last_line(log)} (see {log})")
            cached = _cached_results(target / "analysis.json")
        for run in group:
            results[run.name] = analysis_metrics(cached[shas[run.name]], run.config.method)
    return results


def _cached_results(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    return {r["sha256"]: r for r in json.loads(path.read_text())["results"]}
