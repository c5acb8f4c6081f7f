"""The seed papers' claims, and which of them a comparison grid reproduces.

A claim names a method, what it is compared with (another method, or a threshold), a metric and a
direction, and the dataset, budget (pretraining epochs) and evaluation protocol it was made with, each with
its source. A grid measures it when it holds both arms (same settings but the method), measured the metric
and has at least two seeds per arm. It *judges* it only at the claim's own terms: on the claim's dataset (or
a name the registry accepts for it), at >= the paper's epochs, and with the paper's protocol (MoCo's linear
probe for a linear top-1 claim). Then the 95 % interval decides: reproduced when it excludes 0 on the claimed
side, not reproduced otherwise. Short of those terms the verdict is "indicative": the direction and interval
are shown with what falls short ("4 of 100 epochs"), and nothing is claimed. Top-1 numbers on another dataset
say nothing about the paper's: "not tested".
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
# protocols: linear = MoCo's linear classification on frozen features (compare --probe moco);
# features = a measurement of the pretrained features themselves (hnmix analyze); detection = VOC transfer
LINEAR, FEATURES, DETECTION = "linear", "features", "detection"
PROTOCOL_METRIC = {"linear_top1": "MoCo's linear probe", "probe_top1": "the fast probe (features cached "
                   "without augmentation)", "knn_top1": "kNN top-1"}
REPRODUCED, NOT_REPRODUCED, INDICATIVE, NOT_TESTED = "reproduced", "not reproduced", "indicative", "not tested"


@dataclass(frozen=True)
class Claim:
    id: str
    text: str
    source: str
    method: str
    metric: str  # top1 (linear probe; kNN or the fast probe stand in), uniformity, mochi_fn, voc_ap
    direction: int  # +1: the method's value is higher than the reference, -1: lower
    dataset: str  # as the paper names it
    datasets: tuple[str, ...]  # normalised names that count as that dataset (its declared stand-ins)
    paper_epochs: int | None  # pretraining epochs of the claim's runs; None: not recorded
    protocol: str  # linear, features or detection (above)
    budget_source: str  # where in the paper the epochs and protocol are stated
    baseline: str | None = None  # the method compared with; None: compared with `threshold`
    threshold: float | None = None
    paper_effect: str = ""
    data_bound: bool = True  # a number on that dataset; False: a property measurable on any labelled data
    needs: str | None = None  # a measurement compare does not make


@dataclass(frozen=True)
class GridBudget:
    """What a grid ran: the dataset's name, the epochs of its shortest run, its linear probe (none, fast or
    moco) and its step cap."""

    dataset: str
    epochs: int
    probe: str = "none"
    max_steps: int | None = None


IMAGENET_100, IMAGENET = ("imagenet100", "in100"), ("imagenet", "imagenet1k", "in1k", "ilsvrc2012")
MOCHI_IN100 = "MoCHi sec. 4, Table 1: ImageNet-100, 100 pretraining epochs, MoCo's linear classification"
CLAIMS = (
    Claim("mochi-in100", "MoCHi beats MoCo-v2 by +1.0 top-1 (linear) on ImageNet-100", MOCHI, "mochi",
          "top1", +1, "ImageNet-100", IMAGENET_100, 100, LINEAR, MOCHI_IN100, baseline="moco",
          paper_effect="+1.0"),
    Claim("mochi-voc", "MoCHi beats MoCo-v2 by +0.5 to +1.1 AP on PASCAL VOC detection", MOCHI, "mochi",
          "voc_ap", +1, "ImageNet-1k -> VOC07+12", IMAGENET, 200, DETECTION,
          "MoCHi Table 2: ImageNet-1k models of 200 (and 800) epochs, Faster R-CNN R50-C4 on VOC07+12",
          baseline="moco", paper_effect="+0.5 to +1.1",
          needs="PASCAL VOC detection transfer (hnmix transfer-detect voc), which compare does not run"),
    Claim("synco-moco", "SynCo beats MoCo-v2 by +0.4 top-1 (linear) on ImageNet-1k", SYNCO, "synco", "top1",
          +1, "ImageNet-1k", IMAGENET, 200, LINEAR,
          "SynCo abstract and Table 1: ResNet-50, 200 pretraining epochs, linear evaluation (67.9 vs 67.5)",
          baseline="moco", paper_effect="+0.4"),
    Claim("synco-mochi", "SynCo beats MoCHi by +1.0 top-1 (linear) on ImageNet-1k", SYNCO, "synco", "top1",
          +1, "ImageNet-1k", IMAGENET, 200, LINEAR,
          "SynCo Table 1: ResNet-50, 200 pretraining epochs, linear evaluation", baseline="mochi",
          paper_effect="+1.0"),
    Claim("ring-cifar", "Ring beats its base method by +2 to +5 points (linear) on CIFAR-10/100 and STL-10",
          RING, "ring", "top1", +1, "CIFAR-10, CIFAR-100, STL-10", ("cifar10", "cifar100", "stl10"), None,
          LINEAR, "Ring sec. 5 (linear evaluation); its pretraining epochs are not in this registry",
          baseline="moco", paper_effect="+2 to +5"),
    Claim("mochi-uniformity", "MoCHi makes features more uniform than MoCo-v2 (lower uniformity loss)",
          MOCHI, "mochi", "uniformity", -1, "ImageNet-100", IMAGENET_100, 100, FEATURES,
          "MoCHi sec. 4 (uniformity of the ImageNet-100 models of Table 1, 100 epochs)", baseline="moco",
          data_bound=False),
    # chance alone gives about 1/classes^2 of such mixes: a number bound to the dataset's class count
    Claim("mochi-fn", "Fewer than 2 % of MoCHi's synthetic negatives are false negatives (both mixed "
          "negatives of the query's class)", MOCHI, "mochi", "mochi_fn", -1, "ImageNet-100", IMAGENET_100,
          100, FEATURES, "MoCHi sec. 4 (false negatives of the ImageNet-100 models, 100 epochs)",
          threshold=0.02, paper_effect="< 2 %"),
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


def resolve_metric(claim: Claim, arms: list[ArmData]) -> str:
    """The metric key in the arms: top-1 is MoCo's linear probe when measured, else the fast probe, else kNN."""
    if claim.metric != "top1":
        return claim.metric
    return next(key for key in ("linear_top1", "probe_top1", "knn_top1")
                if key == "knn_top1" or all(key in a.values for a in arms))


def shortfalls(claim: Claim, metric: str, grid: GridBudget) -> list[str]:
    """What keeps this grid from the claim's own terms (dataset, epochs, protocol); [] when it meets them."""
    out = []
    if not claim.data_bound and normalise(grid.dataset) not in claim.datasets:
        out.append(f"on {grid.dataset}, not {claim.dataset}")
    if claim.paper_epochs is None:
        out.append(f"{grid.epochs} epochs; the paper's budget is not in the registry")
    elif grid.epochs < claim.paper_epochs:
        out.append(f"{grid.epochs} of {claim.paper_epochs} epochs")
    if grid.max_steps:
        out.append(f"runs capped at {grid.max_steps} steps")
    if claim.protocol == LINEAR and metric != "linear_top1":
        out.append(f"{PROTOCOL_METRIC[metric]}, not the paper's linear probe (compare --probe moco)")
    return out


def verdict(claim: Claim, interval: Interval, metric: str, grid: GridBudget) -> tuple[str, str, list[str]]:
    """(status, reason, shortfalls) for a measured interval of (method - reference)."""
    reference = "0" if claim.threshold is None else f"the threshold {claim.threshold:g}"
    if claim.threshold is None:
        observed = f"{metric} difference {interval.diff:+.3g}"
    else:
        observed = f"{metric} mean {interval.diff + claim.threshold:.3g}"
    if claim.data_bound and normalise(grid.dataset) not in claim.datasets:
        return NOT_TESTED, f"needs {claim.dataset} (this grid ran on {grid.dataset}); here: {observed}, " \
                           f"{_shifted(interval, claim)}", []
    if not interval.has_interval:
        return NOT_TESTED, f"{interval.note} ({observed})", []
    seeds = f"at {interval.n} seeds"
    short = shortfalls(claim, metric, grid)
    if interval.within_noise:
        seen, side = f"within noise: {_shifted(interval, claim)} contains {reference} {seeds}", 0
    elif interval.diff * claim.direction > 0:
        paper = f" (paper: {claim.paper_effect})" if claim.paper_effect else ""  # a direction-only claim has none
        seen, side = f"{observed}, {_shifted(interval, claim)} {seeds}{paper}", 1
    else:
        seen, side = f"opposite direction: {observed}, {_shifted(interval, claim)} {seeds}", -1
    if short:
        return INDICATIVE, ("the claimed direction: " if side > 0 else "") + seen, short
    return (REPRODUCED if side > 0 else NOT_REPRODUCED), seen, []


def _shifted(interval: Interval, claim: Claim) -> str:
    """The interval in the metric's own units (threshold claims test value - threshold)."""
    if not interval.has_interval:
        return interval.note
    shift = claim.threshold or 0.0
    return f"CI [{interval.low + shift:.3g}, {interval.high + shift:.3g}]"


def judge(claim: Claim, arms: list[ArmData], grid: GridBudget) -> list[dict]:
    """One verdict per arm of the claim's method (with its counterpart), or one 'not tested'."""
    base = {"id": claim.id, "text": claim.text, "source": claim.source, "dataset": claim.dataset,
            "paper_epochs": claim.paper_epochs, "protocol": claim.protocol, "budget_source": claim.budget_source,
            "arm": None, "reference": None, "interval": None, "caveats": []}

    def untested(reason: str) -> list[dict]:
        return [{**base, "status": NOT_TESTED, "reason": reason}]

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
        metric = resolve_metric(claim, [arm, other])
        mine_values, other_values = arm.values.get(metric), other.values.get(metric)
        if not mine_values or not other_values:
            out += untested(f"no {metric} measured (analysis switched off, or no labels)")
            continue
        if claim.threshold is None:
            interval = difference(mine_values, other_values)
        else:
            interval = mean_interval([v - claim.threshold for v in mine_values.values()])
        status, reason, caveats = verdict(claim, interval, metric, grid)
        reference = other.name if claim.baseline else f"{claim.threshold:g}"
        out.append({**base, "arm": arm.name, "reference": reference,
                    "metric": metric, "interval": interval.as_dict(), "status": status, "reason": reason,
                    "caveats": caveats})
    return out


def judge_all(arms: list[ArmData], grid: GridBudget, claims: tuple[Claim, ...] = CLAIMS) -> list[dict]:
    return [v for claim in claims for v in judge(claim, arms, grid)]
