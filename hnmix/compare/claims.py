"""The seed papers' claims, and which of them a comparison grid reproduces.

A claim names a method, what it is compared with (another method, or a threshold), a metric and a
direction, and the dataset and budget it was made on. A grid tests it when it holds both arms (same
settings but the method), measured the metric, ran on the claim's dataset (for claims about a number on that
dataset) and has at least two seeds per arm. Then the 95 % interval decides: reproduced when it excludes 0
on the claimed side, not reproduced otherwise (within noise, or the opposite direction).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from hnmix.compare.stats import Interval, difference, mean_interval

MOCHI = "Kalantidis et al., Hard Negative Mixing for Contrastive Learning (MoCHi), NeurIPS 2020"
SYNCO = ("Giakoumoglou & Stathaki, SynCo: Synthetic Hard Negatives for Contrastive Visual Representation "
         "Learning, arXiv 2410.02401")
RING = ("Wu et al., Conditional Negative Sampling for Contrastive Learning of Visual Representations, "
        "ICLR 2021")
KNN_FOR_LINEAR = "kNN top-1 stands in for the paper's linear probe (--probe fast measures one)"


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    source: str
    method: str
    metric: str  # top1 (linear probe; kNN stands in), uniformity, mochi_fn, voc_ap
    direction: int  # +1: the method's value is higher than the reference, -1: lower
    dataset: str  # as the paper names it
    datasets: tuple[str, ...]  # normalised names that count as that dataset
    paper_epochs: int | None
    baseline: str | None = None  # the method compared with; None: compared with `threshold`
    threshold: float | None = None
    paper_effect: str = ""
    data_bound: bool = True  # a number on that dataset; False: a property testable on any labelled data
    needs: str | None = None  # a measurement compare does not make


IMAGENET_100, IMAGENET = ("imagenet100", "in100"), ("imagenet", "imagenet1k", "in1k", "ilsvrc2012")
CLAIMS = (
    Claim("mochi-in100", "MoCHi beats MoCo-v2 by +1.0 top-1 (linear) on ImageNet-100", MOCHI, "mochi",
          "top1", +1, "ImageNet-100", IMAGENET_100, 100, baseline="moco", paper_effect="+1.0"),
    Claim("mochi-voc", "MoCHi beats MoCo-v2 by +0.5 to +1.1 AP on PASCAL VOC detection", MOCHI, "mochi",
          "voc_ap", +1, "ImageNet-1k -> VOC07+12", IMAGENET, 200, baseline="moco",
          paper_effect="+0.5 to +1.1",
          needs="PASCAL VOC detection transfer (hnmix transfer-detect voc), which compare does not run"),
    Claim("synco-moco", "SynCo beats MoCo-v2 by +0.4 top-1 (linear) on ImageNet-1k", SYNCO, "synco", "top1",
          +1, "ImageNet-1k", IMAGENET, 200, baseline="moco", paper_effect="+0.4"),
    Claim("synco-mochi", "SynCo beats MoCHi by +1.0 top-1 (linear) on ImageNet-1k", SYNCO, "synco", "top1",
          +1, "ImageNet-1k", IMAGENET, 200, baseline="mochi", paper_effect="+1.0"),
    Claim("ring-cifar", "Ring beats its base method by +2 to +5 points (linear) on CIFAR-10/100 and STL-10",
          RING, "ring", "top1", +1, "CIFAR-10, CIFAR-100, STL-10", ("cifar10", "cifar100", "stl10"), None,
          baseline="moco", paper_effect="+2 to +5"),
    Claim("mochi-uniformity", "MoCHi makes features more uniform than MoCo-v2 (lower uniformity loss)",
          MOCHI, "mochi", "uniformity", -1, "ImageNet-100", IMAGENET_100, 100, baseline="moco",
          data_bound=False),
    # chance alone gives about 1/classes^2 of such mixes: a number bound to the dataset's class count
    Claim("mochi-fn", "Fewer than 2 % of MoCHi's synthetic negatives are false negatives (both mixed "
          "negatives of the query's class)", MOCHI, "mochi", "mochi_fn", -1, "ImageNet-100", IMAGENET_100,
          100, threshold=0.02, paper_effect="< 2 %"),
)


@dataclass
class ArmData:
    """One arm as the claims see it: its grid point, its method (+oracle when the label oracle is on) and
    per metric its values by seed."""

    name: str
    point: dict[str, str]
    method: str
    values: dict[str, dict[str, float]] = field(default_factory=dict)


def normalise(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def counterpart(arm: ArmData, method: str, arms: list[ArmData]) -> ArmData | None:
    """The arm with the same settings as `arm` but the given method."""
    if "method" not in arm.point:
        return None
    wanted = {**arm.point, "method": method}
    return next((a for a in arms if a.point == wanted and a.method == method), None)


def resolve_metric(claim: Claim, arms: list[ArmData]) -> tuple[str, list[str]]:
    """(metric key in the arms, caveats): top-1 is the linear probe when measured, else kNN top-1."""
    if claim.metric != "top1":
        return claim.metric, []
    if all("probe_top1" in a.values for a in arms):
        return "probe_top1", []
    return "knn_top1", [KNN_FOR_LINEAR]


def budget_caveat(claim: Claim, epochs: int) -> str:
    if claim.paper_epochs is None:
        return f"budget: {epochs} epochs here; the paper's budget is not recorded in the registry"
    if epochs < claim.paper_epochs:
        return f"budget: {epochs} epochs here, {claim.paper_epochs} in the paper"
    return ""


def verdict(claim: Claim, interval: Interval, metric: str, dataset: str, epochs: int,
            caveats: list[str]) -> tuple[str, str, list[str]]:
    """(status, reason, caveats) for a measured interval of (method - reference)."""
    reference = "0" if claim.threshold is None else f"the threshold {claim.threshold:g}"
    if claim.threshold is None:
        observed = f"{metric} difference {interval.diff:+.3g}"
    else:
        observed = f"{metric} mean {interval.diff + claim.threshold:.3g}"
    if claim.data_bound and normalise(dataset) not in claim.datasets:
        return "not tested", f"needs {claim.dataset} (this grid ran on {dataset}); here: {observed}, " \
                             f"{_shifted(interval, claim)}", caveats
    caveats = [*caveats, c] if (c := budget_caveat(claim, epochs)) else caveats
    seeds = f"at {interval.n} seeds"
    if not interval.has_interval:
        return "not tested", f"{interval.note} ({observed})", caveats
    if interval.within_noise:
        return "not reproduced", f"within noise: {_shifted(interval, claim)} contains {reference} {seeds}", \
            caveats
    if interval.diff * claim.direction > 0:
        paper = f"(paper: {claim.paper_effect})"
        return "reproduced", f"{observed}, {_shifted(interval, claim)} {seeds} {paper}", caveats
    return "not reproduced", f"opposite direction: {observed}, {_shifted(interval, claim)} {seeds}", caveats


def _shifted(interval: Interval, claim: Claim) -> str:
    """The interval in the metric's own units (threshold claims test value - threshold)."""
    if not interval.has_interval:
        return interval.note
    shift = claim.threshold or 0.0
    return f"CI [{interval.low + shift:.3g}, {interval.high + shift:.3g}]"


def judge(claim: Claim, arms: list[ArmData], dataset: str, epochs: int) -> list[dict]:
    """One verdict per arm of the claim's method (with its counterpart), or one 'not tested'."""
    base = {"id": claim.id, "text": claim.text, "source": claim.source, "dataset": claim.dataset,
            "paper_epochs": claim.paper_epochs, "arm": None, "reference": None, "interval": None,
            "caveats": []}

    def untested(reason: str) -> list[dict]:
        return [{**base, "status": "not tested", "reason": reason}]

    if claim.needs:
        return untested(f"needs {claim.needs}")
    mine = [a for a in arms if a.method == claim.method]
    if not mine:
        return untested(f"the grid has no method={claim.method} arm")
    out = []
    for arm in mine:
        other = counterpart(arm, claim.baseline, arms) if claim.baseline else arm
        if other is None:
            out += untested(f"the grid has no method={claim.baseline} arm beside {arm.name}")
            continue
        metric, caveats = resolve_metric(claim, [arm, other])
        mine_values, other_values = arm.values.get(metric), other.values.get(metric)
        if not mine_values or not other_values:
            out += untested(f"no {metric} measured (analysis switched off, or no labels)")
            continue
        if claim.threshold is None:
            interval = difference(mine_values, other_values)
        else:
            interval = mean_interval([v - claim.threshold for v in mine_values.values()])
        status, reason, caveats = verdict(claim, interval, metric, dataset, epochs, caveats)
        reference = other.name if claim.baseline else f"{claim.threshold:g}"
        out.append({**base, "arm": arm.name, "reference": reference,
                    "metric": metric, "interval": interval.as_dict(), "status": status, "reason": reason,
                    "caveats": caveats})
    return out


def judge_all(arms: list[ArmData], dataset: str, epochs: int,
              claims: tuple[Claim, ...] = CLAIMS) -> list[dict]:
    return [v for claim in claims for v in judge(claim, arms, dataset, epochs)]
