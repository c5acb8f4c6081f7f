"""`hnmix analyze`: encode a fixed image subset once per weights file, then compute the requested metrics.

Every weights file sees the same images, the same augmented views (seeded per image) and the same MoCHi
draws, so differences between series come from the weights alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch.utils.data import Dataset

from hnmix import __version__
from hnmix.analyze import metrics as M
from hnmix.analyze.config import HELD_OUT, NEEDS_LABELS, AnalyzeConfig
from hnmix.analyze.encoders import Encoders, load_encoders, mochi_defaults
from hnmix.analyze.plots import plot_all, series_labels
from hnmix.core.device import autocast_dtype, resolve_device
from hnmix.core.log import eval_progress
from hnmix.data.augment.pil import PilAugment
from hnmix.data.augment.settings import AugmentSettings
from hnmix.data.demo import DEMO
from hnmix.data.folder import open_images
from hnmix.data.labelled import VAL_SPLITS, choose_eval_transform, describe_source, eval_transform
from hnmix.data.normalize import Normalize
from hnmix.data.order import sample_seed
from hnmix.errors import HnmixError
from hnmix.eval.features import make_loader
from hnmix.eval.lineval import sha256_file
from hnmix.models.weights import choose_image_size
from hnmix.negatives.mochi import draw_mochi, mochi_from_draws

# folder names that mark a dataset root (as opposed to an ImageFolder's class folders)
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")
PAIR_METRICS = ("alignment", "false-negatives", "hardness", "proxy-accuracy")
EMPTY = torch.zeros(0, dtype=torch.uint8)


def resolve_split(data: str, split: str) -> str:
    """held-out -> the first of lineval's held-out splits the root has (val, else test), else val."""
    if split != HELD_OUT:
        return split
    present = [name for name in VAL_SPLITS if data != DEMO and (Path(data) / name).is_dir()]
    return present[0] if present else VAL_SPLITS[0]


def open_split(data: str, split: str):
    """open_images, refusing a root with split folders but not `split`: read as an ImageFolder, its
    "classes" would be the splits themselves."""
    if data != DEMO and not (Path(data) / split).is_dir():
        present = [name for name in SPLIT_NAMES if (Path(data) / name).is_dir()]
        if present:
            raise HnmixError(f"{data} has no split '{split}' (it has {', '.join(present)}): "
                             f"pass --split {' or '.join(present)}")
    return open_images(data, split)


class AnalysisViews(Dataset):
    """(center-cropped view, augmented view 1, augmented view 2, label); views not asked for are empty."""

    def __init__(self, images, indices: list[int], size: int, seed: int, eval_view: bool, pair: bool,
                 augment: AugmentSettings | None = None, eval_choice: str = "auto"):
        self.images, self.indices, self.seed = images, indices, seed
        self.eval_tf = eval_transform(size, eval_choice) if eval_view else None
        self.aug = PilAugment(augment, size) if pair else None  # the run's two views (default: MoCo v2's)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        img = self.images.load(index)
        view = self.eval_tf(img) if self.eval_tf else EMPTY
        q = k = EMPTY
        if self.aug:  # the same crops for every weights file
            q, k = self.aug(img, torch.Generator().manual_seed(sample_seed(self.seed, 0, index)))
        return view, q, k, self.images.labels[index]


@torch.no_grad()
def scan_memory(q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor, memory: torch.Tensor, *,
                exclude_self: bool, mochi: dict, seed: int, top_k: int, mem_labels: torch.Tensor | None = None,
                temperature: float = 0.2, chunk: int | None = None) -> dict:
    """One pass of the queries q (keys k) over a memory of unit rows, in chunks.

    With mem_labels: false-negative curve, chance level and MoCHi's false-negative shares; without: the
    hardness curve and proxy accuracies. exclude_self drops memory row i for query i (a dataset memory holds
    the query's own key, which is its positive, not a negative).
    """
    device = q.device
    size = memory.shape[0] - int(exclude_self)
    if size < 2:
        raise HnmixError("the negative memory holds fewer than two items: analyse more images")
    top_k = min(top_k, size)
    mochi = {**mochi, "n_hard": min(mochi["n_hard"], size)}
    synthetic = mochi["n_hard"] >= 2 and mochi["s"] + mochi["s_prime"] > 0
    generator = torch.Generator(device=device).manual_seed(seed)
    chunk = chunk or max(1, min(256, 2**26 // max(1, (mochi["s"] + mochi["s_prime"]) * memory.shape[1])))
    fn = torch.zeros(top_k, dtype=torch.float64, device=device)
    probs = torch.zeros(top_k, dtype=torch.float64, device=device)
    chance = hit = hit_syn = mixed_fn = query_mixed_fn = 0.0
    for lo in range(0, q.shape[0], chunk):
        rows = torch.arange(lo, min(lo + chunk, q.shape[0]), device=device)
        l_neg = q[rows] @ memory.T
        if exclude_self:
            l_neg[torch.arange(len(rows), device=device), rows] = -torch.inf
        l_pos = (q[rows] * k[rows]).sum(1)
        draws = draw_mochi(len(rows), mochi["n_hard"], mochi["s"], mochi["s_prime"], generator=generator,
                           device=device) if synthetic else None
        if mem_labels is not None:
            fn += M.same_class_in_topk(l_neg, labels[rows], mem_labels, top_k).double().sum(0)
            same = (mem_labels.view(1, -1) == labels[rows].view(-1, 1)).sum(1).double()
            chance += ((same - float(exclude_self)) / size).sum().item()
            if synthetic:
                hard = l_neg.topk(mochi["n_hard"], dim=1).indices
                mixed, query_mixed = M.mochi_false_negatives(hard, draws, labels[rows], mem_labels)
                mixed_fn += mixed.double().mean(1).sum().item() if mixed.shape[1] else 0.0
                query_mixed_fn += query_mixed.double().mean(1).sum().item() if query_mixed.shape[1] else 0.0
        else:
            probs += M.matching_probabilities(l_pos, l_neg, temperature, top_k).sum(0)
            hit += M.proxy_hits(l_pos, l_neg).sum().item()
            if synthetic:
                l_syn = mochi_from_draws(q[rows], memory, l_neg, draws, mochi["n_hard"])
                hit_syn += M.proxy_hits(l_pos, l_neg, l_syn).sum().item()
    n = q.shape[0]
    base = {"memory_size": size, "top_k": top_k}
    if mem_labels is not None:
        curve = fn.cumsum(0) / torch.arange(1, top_k + 1, device=device) / n
        return {**base, "share": curve[-1].item(), "chance": chance / n, "curve": curve.tolist(),
                "mochi": {**mochi, "mixed_share": mixed_fn / n if synthetic else None,
                          "query_mixed_share": query_mixed_fn / n if synthetic else None}}
    return {**base, "temperature": temperature, "curve": (probs / n).tolist(), "without_synthetic": hit / n,
            "with_synthetic": hit_syn / n if synthetic else None, "mochi": mochi}


class Analysis:
    def __init__(self, cfg: AnalyzeConfig, console: Console):
        self.cfg, self.console = cfg, console
        self.device = resolve_device(cfg.device)
        self.dtype = autocast_dtype(cfg.precision, self.device)
        self.split = resolve_split(cfg.data, cfg.split)
        self.images = open_split(cfg.data, self.split)
        self.labelled = bool(self.images.classes) and min(self.images.labels) >= 0
        self.metrics = self._select_metrics()
        n = len(self.images)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        self.indices = sorted(order[:cfg.max_images]) if n > cfg.max_images else list(range(n))
        if len(self.indices) < 2:
            raise HnmixError(f"{describe_source(self.images)} holds {n} image: analysis needs at least two")
        self.normalize = Normalize().to(self.device)
        self.encoders = [load_encoders(w, cfg.features, cfg.arch, cfg.cifar_stem) for w in cfg.weights]
        self.labels = series_labels([e.path for e in self.encoders], [e.epoch for e in self.encoders])
        self._sizes: dict = {}

    def _select_metrics(self) -> tuple[str, ...]:
        wanted = self.cfg.metrics
        if self.labelled:
            return wanted
        if self.cfg.metric != "all":
            need = [m for m in wanted if m in NEEDS_LABELS]
            if need:
                raise HnmixError(f"{need[0]} needs labelled images (an ImageFolder: one sub-folder per class), "
                                 f"but {describe_source(self.images)} has none")
        skipped = [m for m in wanted if m in NEEDS_LABELS]
        self.console.print(f"[yellow]warning:[/] unlabelled images: skipping {', '.join(skipped)}")
        return tuple(m for m in wanted if m not in NEEDS_LABELS)

    # ------------------------------------------------------------------ encoding
    def image_size(self, enc: Encoders) -> int:
        if enc.path not in self._sizes:
            self._sizes[enc.path] = choose_image_size(self.cfg.image_size, enc.image_size, enc.config_source,
                                                      self.console)
        return self._sizes[enc.path]

    def eval_choice(self, enc: Encoders) -> str:
        size = self.image_size(enc)
        return choose_eval_transform(size, self.cfg.eval_transform,
                                     enc.eval_transform if enc.image_size == size else None)

    @torch.no_grad()
    def encode(self, enc: Encoders, progress, label: str) -> dict[str, torch.Tensor]:
        """Unit features: 'eval' (query encoder, center crop), 'q'/'q2' (query encoder, views 1/2), 'k' (key
        encoder, view 2)."""
        eval_view = any(m in self.metrics for m in ("uniformity", "separation")) or (
            "alignment" in self.metrics and self.labelled)
        pair = any(m in self.metrics for m in PAIR_METRICS)
        size = self.image_size(enc)
        views = AnalysisViews(self.images, self.indices, size, self.cfg.seed, eval_view, pair, enc.augment,
                              self.eval_choice(enc))
        loader = make_loader(views, self.cfg.batch_size, self.cfg.workers, self.device)
        task = progress.add_task(f"encode {label}", total=len(loader), info="")
        out: dict[str, list] = {"eval": [], "q": [], "k": [], "q2": [], "labels": []}
        for view, q, k, y in loader:
            if eval_view:
                out["eval"].append(self._forward(enc.query, view))
            if pair:
                out["q"].append(self._forward(enc.query, q))
                out["k"].append(self._forward(enc.key, k))
                if "alignment" in self.metrics:  # alignment compares one encoder with itself
                    out["q2"].append(out["k"][-1] if enc.key is enc.query else self._forward(enc.query, k))
            out["labels"].append(y.to(self.device))
            progress.advance(task)
        return {name: torch.cat(parts) for name, parts in out.items() if parts}

    def _forward(self, net, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x.to(self.device, non_blocking=True))
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return F.normalize(net(x).float(), dim=1)

    # ------------------------------------------------------------------ metrics
    def analyse(self, enc: Encoders, feats: dict[str, torch.Tensor]) -> dict:
        cfg, labels = self.cfg, feats["labels"]
        res: dict = {}
        if "uniformity" in self.metrics:
            res["uniformity"] = M.uniformity(feats["eval"], cfg.t)
            res["_pair_sq"] = M.sample_pair_sq_distances(feats["eval"], 20000, torch.Generator().manual_seed(cfg.seed))
        if "alignment" in self.metrics:
            res["alignment"] = M.alignment(feats["q"], feats["q2"], cfg.alpha)
            res["_positive_sq"] = (feats["q"] - feats["q2"]).pow(2).sum(1)
            if self.labelled:
                res["class_alignment"] = M.class_alignment(feats["eval"], labels, cfg.alpha)
        if "separation" in self.metrics:
            ratios = M.separation_ratios(feats["eval"], labels)
            quartiles = torch.quantile(ratios.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64,
                                                                     device=ratios.device)).tolist()
            res["separation"] = {"mean": ratios.mean().item(), "quartiles": quartiles,
                                 "share_above_1": (ratios > 1).float().mean().item()}
            res["_ratios"] = ratios
        if any(m in self.metrics for m in ("false-negatives", "hardness", "proxy-accuracy")):
            res.update(self.negatives(enc, feats))
        return res

    def _memory(self, enc: Encoders, feats, need_labels: bool):
        """(memory rows, their labels or None, name, exclude the query's own key?)."""
        use_queue = self.cfg.memory == "queue" or (self.cfg.memory == "auto" and enc.queue is not None and (
            not need_labels or enc.queue_labels is not None))
        if use_queue and enc.queue is None:
            raise HnmixError(f"{enc.path} has no queue in {self.cfg.features} feature space: use --memory dataset")
        if not use_queue:
            return feats["k"], feats["labels"], "dataset keys", True
        queue, labels = enc.queue.to(self.device).float(), enc.queue_labels
        if need_labels:
            if labels is None:
                raise HnmixError(f"{enc.path} has no queue labels: false negatives need --memory dataset (or auto)")
            known = labels.to(self.device) >= 0
            return queue[known], labels.to(self.device)[known], "queue (labelled rows)", False
        return queue, None, "queue", False

    def _mochi_params(self, enc: Encoders) -> dict:
        """The checkpoint's MoCHi N, s, s' when it trained MoCHi, else MoCHi's defaults; flags override."""
        base = enc.mochi or mochi_defaults()
        params = {k: getattr(self.cfg, k) if getattr(self.cfg, k) is not None else base[k] for k in base}
        return {**params, "from": "checkpoint" if enc.mochi else "defaults"}

    def negatives(self, enc: Encoders, feats) -> dict:
        cfg, out = self.cfg, {}
        temperature = cfg.temperature or enc.temperature or 0.2
        if "false-negatives" in self.metrics:
            memory, mem_labels, name, exclude = self._memory(enc, feats, need_labels=True)
            self._warn_top_k(memory.shape[0] - exclude, name)
            out["false_negatives"] = {"memory": name, **scan_memory(
                feats["q"], feats["k"], feats["labels"], memory, exclude_self=exclude, mem_labels=mem_labels,
                mochi=self._mochi_params(enc), seed=cfg.seed, top_k=cfg.top_k)}
        if "hardness" in self.metrics or "proxy-accuracy" in self.metrics:
            memory, _, name, exclude = self._memory(enc, feats, need_labels=False)
            scanned = {"memory": name, **scan_memory(
                feats["q"], feats["k"], feats["labels"], memory, exclude_self=exclude, temperature=temperature,
                mochi=self._mochi_params(enc), seed=cfg.seed, top_k=cfg.top_k)}
            if "hardness" in self.metrics:
                out["hardness"] = {k: scanned[k] for k in ("memory", "memory_size", "temperature", "top_k", "curve")}
            if "proxy-accuracy" in self.metrics:
                out["proxy_accuracy"] = {k: scanned[k] for k in ("memory", "memory_size", "without_synthetic",
                                                                  "with_synthetic", "mochi")}
        return out

    def _warn_top_k(self, size: int, memory_name: str) -> None:
        if 2 * min(self.cfg.top_k, size) > size:
            self.console.print(f"[yellow]warning:[/] the top {min(self.cfg.top_k, size)} of {size} {memory_name} "
                               "are most of the memory: their same-class share tends to chance; use a smaller "
                               "--top-k or more images")

    # ------------------------------------------------------------------ driver
    def describe(self) -> None:
        cfg = self.cfg
        t = Table(title=f"hnmix analyze {cfg.metric}", show_header=False, title_justify="left")
        n_cls = len(self.images.classes) if self.labelled else 0
        rows = [("metrics", ", ".join(self.metrics)),
                ("data", f"{describe_source(self.images)}: {len(self.indices)} of {len(self.images)} images"
                         + (f", {n_cls} classes" if n_cls else ", unlabelled")),
                ("features", f"{cfg.features} (L2-normalised)"),
                *[(f"weights {i + 1}", f"{label}: {e.source}, {e.arch}") for i, (label, e) in
                  enumerate(zip(self.labels, self.encoders, strict=True))],
                ("output", cfg.output)]
        for k, v in rows:
            t.add_row(k, v)
        self.console.print(t)

    def run(self) -> dict:
        start = time.perf_counter()
        self.describe()
        results = []
        with eval_progress(self.console) as progress:
            for label, enc in zip(self.labels, self.encoders, strict=True):
                enc.query.to(self.device).eval()
                enc.key.to(self.device).eval()
                res = self.analyse(enc, self.encode(enc, progress, label))
                results.append({"label": label, "weights": str(enc.path), "sha256": sha256_file(enc.path),
                                "format": enc.source, "arch": enc.arch, "epoch": enc.epoch,
                                "image_size": self.image_size(enc), "eval_transform": self.eval_choice(enc),
                                **res})
                enc.query.cpu()
                enc.key.cpu()
        out = Path(self.cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        plots = plot_all(self.metrics, results, out, t=self.cfg.t)
        report = {
            "metric": self.cfg.metric, "metrics": list(self.metrics),
            "data": {"source": describe_source(self.images), "split": self.split, "images": len(self.indices),
                     "classes": len(self.images.classes) if self.labelled else None},
            "settings": self.cfg.model_dump(mode="json"),
            "results": [{k: v for k, v in r.items() if not k.startswith("_")} for r in results],
            "plots": [str(p) for p in plots], "elapsed_s": round(time.perf_counter() - start, 2),
            "hnmix_version": __version__,
        }
        (out / "analysis.json").write_text(json.dumps(report, indent=2) + "\n")
        self.summary(report)
        return report

    def summary(self, report: dict) -> None:
        for r in report["results"]:
            parts = [f"uniformity {r['uniformity']:.3f}" if "uniformity" in r else "",
                     f"alignment {r['alignment']:.3f}" if "alignment" in r else "",
                     f"class alignment {r['class_alignment']:.3f}" if "class_alignment" in r else "",
                     f"FN share@{r['false_negatives']['top_k']} {r['false_negatives']['share']:.3f} (chance "
                     f"{r['false_negatives']['chance']:.3f})" if "false_negatives" in r else "",
                     f"top-1 neg prob {r['hardness']['curve'][0]:.3g}" if "hardness" in r else "",
                     f"proxy acc {r['proxy_accuracy']['without_synthetic']:.3f}" if "proxy_accuracy" in r else "",
                     f"separation median {r['separation']['quartiles'][1]:.3f}" if "separation" in r else ""]
            self.console.print(f"[bold]{r['label']}[/]: " + ", ".join(p for p in parts if p), highlight=False)
        self.console.print(f"-> {Path(self.cfg.output) / 'analysis.json'} and {len(report['plots'])} plot(s)")


def analyze(cfg: AnalyzeConfig, console: Console | None = None) -> dict:
    return Analysis(cfg, console or Console()).run()
