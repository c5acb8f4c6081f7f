"""The comparison's figures (matplotlib, Agg): kNN top-1 by epoch per arm, alignment against uniformity."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from hnmix.compare.stats import mean, sample_std  # noqa: E402


def _colours(arms: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {arm: cmap(i % 10) for i, arm in enumerate(arms)}


def knn_by_epoch(runs: list[dict], arms: list[str], path: Path) -> Path | None:
    """Mean kNN top-1 per arm over the epochs every seed of the arm measured, with a +- std band."""
    curves = {arm: [r["curve"] for r in runs if r["arm"] == arm and r.get("curve")] for arm in arms}
    if not any(curves.values()):
        return None
    colours = _colours(arms)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm, arm_curves in curves.items():
        if not arm_curves:
            continue
        epochs = sorted(set.intersection(*(set(p["epoch"] for p in c) for c in arm_curves)))
        by_epoch = [[next(p["knn_top1"] for p in c if p["epoch"] == e) for c in arm_curves] for e in epochs]
        means = [mean(v) for v in by_epoch]
        ax.plot(epochs, means, marker="o", color=colours[arm], label=f"{arm} (n={len(arm_curves)})")
        if len(arm_curves) > 1:
            stds = [sample_std(v) for v in by_epoch]
            ax.fill_between(epochs, [m - s for m, s in zip(means, stds, strict=True)],
                            [m + s for m, s in zip(means, stds, strict=True)], color=colours[arm], alpha=0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _finish(fig, ax, path, "epoch", "kNN top-1 (%)", "kNN monitor: mean over seeds, band = +- sample std")


def alignment_uniformity(runs: list[dict], arms: list[str], path: Path) -> Path | None:
    """One point per run, coloured by arm; a cross marks each arm's mean. Lower-left is better (Wang &
    Isola: views close together, features spread over the sphere)."""
    measured = [r for r in runs if "uniformity" in r["metrics"] and "alignment" in r["metrics"]]
    if not measured:
        return None
    colours = _colours(arms)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for arm in arms:
        points = [(r["metrics"]["uniformity"], r["metrics"]["alignment"]) for r in measured
                  if r["arm"] == arm]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.scatter(xs, ys, color=colours[arm], alpha=0.6, s=30, label=arm)
        ax.scatter([mean(xs)], [mean(ys)], color=colours[arm], marker="X", s=140, edgecolors="black")
    return _finish(fig, ax, path, "uniformity loss (lower = more uniform)", "alignment loss (lower = better aligned)",
                   "alignment vs uniformity: one dot per run, X = arm mean")


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
