"""One PNG per metric, one series per weights file, so runs and epochs compare on one figure.

Figures are built on matplotlib.figure.Figure (Agg canvas), so no global pyplot state or display is involved.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

FILE_NAMES = {m: f"{m}.png" for m in ("uniformity", "alignment", "false-negatives", "hardness", "proxy-accuracy",
                                      "separation")}


def series_labels(paths: list[Path], epochs: list[int | None]) -> list[str]:
    """The shortest trailing path parts (at least folder/file) that tell the files apart, plus the epoch."""
    parts = [Path(p).resolve().parts for p in paths]
    depth = 2  # the run directory says more than "last.pt"
    distinct = len(set(parts))  # the same file twice stays ambiguous at any depth: numbered below
    while depth < max(len(p) for p in parts) and len({p[-depth:] for p in parts}) < distinct:
        depth += 1
    labels = ["/".join(p[-depth:]) for p in parts]
    labels = [f"{label} (epoch {e})" if e is not None else label for label, e in zip(labels, epochs, strict=True)]
    return [f"{label} #{i + 1}" if labels.count(label) > 1 else label for i, label in enumerate(labels)]


def _colors(results: list[dict]) -> list:
    """A sequential colormap for a sweep over epochs, distinct colors otherwise."""
    epochs = [r.get("epoch") for r in results]
    if len(results) > 2 and all(e is not None for e in epochs) and len(set(epochs)) == len(epochs):
        order = np.argsort(np.argsort(epochs))
        return [colormaps["viridis"](0.9 * i / (len(results) - 1)) for i in order]
    return [f"C{i % 10}" for i in range(len(results))]


def _figure(title: str, xlabel: str, ylabel: str):
    fig = Figure(figsize=(6.4, 4.2), dpi=100, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _hist(ax, values, color, label, bins):
    ax.hist(np.asarray(values.cpu(), dtype=np.float64), bins=bins, density=True, histtype="step", linewidth=1.6,
            color=color, label=label)


def _distance_bins(arrays) -> np.ndarray:
    """Squared distances of unit vectors lie in [0, 4]; zoom in when every series sits low (a collapse)."""
    top = max(float(np.quantile(np.asarray(a.cpu(), dtype=np.float64), 0.999)) for a in arrays)
    return np.linspace(0, min(4.0, max(0.05, 1.1 * top)), 61)


def plot_uniformity(results, colors, cfg_t: float):
    fig, ax = _figure(f"Uniformity: log E exp(-{cfg_t:g}·||f(x)-f(y)||²), lower = more uniform",
                      "squared distance between random pairs of images", "density")
    bins = _distance_bins([r["_pair_sq"] for r in results])
    for r, c in zip(results, colors, strict=True):
        _hist(ax, r["_pair_sq"], c, f"{r['label']}: {r['uniformity']:.3f}", bins)
    return fig, ax


def plot_alignment(results, colors):
    fig, ax = _figure("Alignment: E ||f(x)-f(x')||² over two views, lower = better aligned",
                      "squared distance between two augmentations of an image", "density")
    bins = _distance_bins([r["_positive_sq"] for r in results])
    for r, c in zip(results, colors, strict=True):
        extra = f", same-class {r['class_alignment']:.3f}" if "class_alignment" in r else ""
        _hist(ax, r["_positive_sq"], c, f"{r['label']}: {r['alignment']:.3f}{extra}", bins)
    return fig, ax


def plot_false_negatives(results, colors):
    fig, ax = _figure("False negatives: same-class share among the k hardest negatives",
                      "k (hardest negatives, by logit)", "same-class share")
    for r, c in zip(results, colors, strict=True):
        fn = r["false_negatives"]
        mixed = fn["mochi"]["mixed_share"]
        extra = f", MoCHi mixes {mixed:.3f}" if mixed is not None else ""
        ax.plot(np.arange(1, len(fn["curve"]) + 1), fn["curve"], color=c, linewidth=1.6,
                label=f"{r['label']}: {fn['share']:.3f} at k={fn['top_k']}{extra}")
        ax.axhline(fn["chance"], color=c, linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.text(0.01, 0.01, "dotted: share in the whole memory (chance)", transform=ax.transAxes, fontsize=8)
    return fig, ax


def plot_hardness(results, colors):
    fig, ax = _figure("Hardness: probabilities of the hardest negatives",
                      "rank of the negative", "softmax probability (mean over queries)")
    for r, c in zip(results, colors, strict=True):
        h = r["hardness"]
        ax.plot(np.arange(1, len(h["curve"]) + 1), h["curve"], color=c, linewidth=1.6,
                label=f"{r['label']} (T={h['temperature']:g}, {h['memory']})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    return fig, ax


def plot_proxy_accuracy(results, colors):
    fig, ax = _figure("Proxy task: share of queries whose key outranks every negative", "", "accuracy")
    x = np.arange(len(results))
    width = 0.38
    for offset, key, hatch, name in ((-width / 2, "without_synthetic", "", "memory negatives"),
                                     (width / 2, "with_synthetic", "//", "+ MoCHi synthetic")):
        values = [r["proxy_accuracy"][key] or 0.0 for r in results]
        bars = ax.bar(x + offset, values, width, color=colors, hatch=hatch, edgecolor="black", linewidth=0.6)
        ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
        ax.bar(0, 0, color="white", hatch=hatch, edgecolor="black", label=name)  # legend entry only
    ax.set_xticks(x, [r["label"] for r in results], rotation=15 if len(results) > 2 else 0, fontsize=8)
    ax.set_ylim(0, 1.1)
    return fig, ax


def plot_separation(results, colors):
    fig, ax = _figure("Separation: mean inter-class / intra-class distance, per image",
                      "ratio (> 1: closer to its own class)", "density")
    values = np.concatenate([np.asarray(r["_ratios"].cpu()) for r in results])
    bins = np.linspace(min(0.8, values.min()), max(1.2, np.quantile(values, 0.995)), 61)
    for r, c in zip(results, colors, strict=True):
        _hist(ax, r["_ratios"], c, f"{r['label']}: median {r['separation']['quartiles'][1]:.3f}", bins)
    ax.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    return fig, ax


def plot_all(metrics: tuple[str, ...], results: list[dict], out: Path, t: float = 2.0) -> list[Path]:
    colors = _colors(results)
    makers = {"uniformity": lambda: plot_uniformity(results, colors, t),
              "alignment": lambda: plot_alignment(results, colors),
              "false-negatives": lambda: plot_false_negatives(results, colors),
              "hardness": lambda: plot_hardness(results, colors),
              "proxy-accuracy": lambda: plot_proxy_accuracy(results, colors),
              "separation": lambda: plot_separation(results, colors)}
    written = []
    for metric in metrics:
        fig, ax = makers[metric]()
        ax.legend(fontsize=8, loc="best")
        path = out / FILE_NAMES[metric]
        fig.savefig(path)
        written.append(path)
    return written
