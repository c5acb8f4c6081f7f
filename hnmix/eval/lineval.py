"""`hnmix lineval`: how good are frozen features? Three protocols, never mixed up:

- moco: MoCo's main_lincls — frozen backbone in eval mode (BN statistics frozen), a linear layer initialised
  N(0, 0.01) trained with SGD on augmented images; the number papers report.
- fast: the same classifier and schedule on features extracted once without augmentation (minutes, not hours).
- knn: weighted kNN on cosine similarity; no training at all.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table
from torch import nn

from hnmix import __version__
from hnmix.core.device import autocast_dtype, resolve_device
from hnmix.core.log import MetricsLog, eval_progress
from hnmix.data.labelled import (
    Labelled,
    choose_eval_transform,
    describe_eval_transform,
    describe_source,
    eval_transform,
    linear_train_transform,
    open_train_val,
)
from hnmix.data.normalize import Normalize
from hnmix.errors import HnmixError
from hnmix.eval.config import LinevalConfig
from hnmix.eval.features import extract_features, make_loader
from hnmix.eval.knn import knn_accuracy, topk_correct
from hnmix.models.weights import build_backbone, choose_image_size, load_backbone_weights

NOTES = {
    "moco": "MoCo linear protocol: frozen backbone, augmented training images",
    "fast": "fast protocol: cached features without augmentation; not comparable with the moco protocol",
    "knn": "weighted kNN on cosine similarity of backbone features",
}


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def assert_backbone_unchanged(backbone: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """MoCo's sanity check: a frozen backbone (weights and BN statistics) must end exactly as loaded."""
    changed = [k for k, v in backbone.state_dict().items() if not torch.equal(v.cpu(), reference[k].cpu())]
    if changed:
        raise AssertionError(f"the frozen backbone changed during linear evaluation: {len(changed)} tensors "
                             f"differ from the weights file (e.g. {changed[0]})")


def linear_classifier(in_features: int, num_classes: int) -> nn.Linear:
    fc = nn.Linear(in_features, num_classes)
    nn.init.normal_(fc.weight, mean=0.0, std=0.01)
    nn.init.zeros_(fc.bias)
    return fc


def effective_lr(cfg: LinevalConfig) -> float:
    return cfg.lr * cfg.batch_size / 256


def train_linear(fc: nn.Linear, batches, evaluate, steps_per_epoch: int, cfg: LinevalConfig, log: MetricsLog,
                 console: Console, progress) -> list[dict]:
    """SGD + MultiStepLR over `batches(epoch)` -> (features, labels); evaluate() -> (top-1, top-5) in %."""
    optimizer = torch.optim.SGD(fc.parameters(), lr=effective_lr(cfg), momentum=cfg.sgd_momentum,
                                weight_decay=cfg.wd)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=cfg.schedule, gamma=0.1)
    task = progress.add_task("linear", total=cfg.epochs * steps_per_epoch, info="")
    history = []
    for epoch in range(1, cfg.epochs + 1):
        fc.train()
        loss_sum, steps = torch.zeros((), device=fc.weight.device), 0
        for feats, labels in batches(epoch):
            loss = F.cross_entropy(fc(feats), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach()
            steps += 1
            progress.advance(task)
        record = {"step": epoch * steps_per_epoch, "epoch": epoch, "lr": scheduler.get_last_lr()[0],
                  "loss": loss_sum.item() / max(steps, 1)}
        scheduler.step()
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            record["top1"], record["top5"] = evaluate()
        if not torch.isfinite(torch.tensor(record["loss"])):
            raise HnmixError(f"non-finite classifier loss at epoch {epoch} (effective lr {effective_lr(cfg):.4g}):"
                             " lower --lr")
        if epoch == 1 and record["loss"] > 10 * math.log(fc.out_features):
            console.print(f"[yellow]warning:[/] classifier loss {record['loss']:.3g} after one epoch (chance "
                          f"{math.log(fc.out_features):.2f}): the effective lr {effective_lr(cfg):.4g} is large for "
                          "features of this scale (MoCo's 30 suits ResNet-50 on ImageNet); consider a lower --lr")
        log.write(record)
        history.append(record)
        acc = f"  top-1 {record['top1']:.2f}  top-5 {record['top5']:.2f}" if "top1" in record else ""
        progress.update(task, info=f"loss {record['loss']:.3f}{acc}")
        if not console.is_terminal:
            console.print(f"epoch {epoch}/{cfg.epochs}  lr {record['lr']:.4g}  loss {record['loss']:.4f}{acc}",
                          highlight=False)
    return history


def batched_topk(fc: nn.Module, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> tuple[float, float]:
    fc.eval()
    with torch.no_grad():
        correct = torch.tensor([topk_correct(fc(feats[i:i + chunk]), labels[i:i + chunk])
                                for i in range(0, len(labels), chunk)]).sum(0).tolist()
    return tuple(100.0 * c / len(labels) for c in correct)


class Lineval:
    def __init__(self, cfg: LinevalConfig, console: Console):
        self.cfg, self.console = cfg, console
        self.device = resolve_device(cfg.device)
        self.dtype = autocast_dtype(cfg.precision, self.device)
        self.weights = load_backbone_weights(cfg.weights)
        self.backbone, self.arch, self.cifar_stem = build_backbone(self.weights, cfg.arch, cfg.cifar_stem)
        self.backbone.requires_grad_(False).eval().to(self.device)
        self.train_images, self.val_images = open_train_val(cfg.data, cfg.train, cfg.val)
        self.num_classes = len(self.train_images.classes)
        self.image_size = choose_image_size(cfg.image_size, self.weights.config.get("image_size"),
                                            self.weights.config_source, console)
        trained = self.weights.config
        recorded = trained.get("eval_transform") if trained.get("image_size") == self.image_size else None
        self.eval_choice = choose_eval_transform(self.image_size, cfg.eval_transform, recorded)
        self.eval_tf = eval_transform(self.image_size, self.eval_choice)
        self.normalize = Normalize().to(self.device)
        self.out = cfg.run_dir
        self.extract_kw = dict(batch_size=cfg.batch_size, workers=cfg.workers, device=self.device,
                               normalize=self.normalize, dtype=self.dtype)

    def _check_output(self) -> None:
        previous = self.out / "lineval.json"
        if previous.is_file():
            protocol = json.loads(previous.read_text()).get("protocol")
            if protocol != self.cfg.protocol:
                raise HnmixError(f"{self.out} holds results of the {protocol} protocol; give the "
                                 f"{self.cfg.protocol} protocol its own --output")
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "metrics.jsonl").unlink(missing_ok=True)

    def describe(self) -> None:
        cfg, w = self.cfg, self.weights
        t = Table(title=f"hnmix lineval --protocol {cfg.protocol}", show_header=False, title_justify="left")
        rows = [
            ("protocol", NOTES[cfg.protocol]),
            ("weights", f"{w.path} ({w.source}), {self.arch}{' + CIFAR stem' if self.cifar_stem else ''}, "
                        f"{self.backbone.num_features}-d features"),
            ("data", f"train {describe_source(self.train_images)}: {len(self.train_images)} images, val "
                     f"{describe_source(self.val_images)}: {len(self.val_images)} images, {self.num_classes} classes"),
            ("images", f"{self.image_size} px; evaluation: {describe_eval_transform(self.image_size, self.eval_choice)}"
                       + (f"; train: RandomResizedCrop({cfg.min_scale}-1) + flip" if cfg.protocol == "moco" else "")),
        ]
        if cfg.protocol == "knn":
            rows.append(("kNN", f"k={cfg.knn_k}, T={cfg.knn_t}, cosine, weighted votes"))
        else:
            rows += [
                ("batch", f"global {cfg.batch_size}"),
                ("lr", f"effective {effective_lr(cfg):.4g} = {cfg.lr} x {cfg.batch_size}/256, x0.1 at epochs "
                       f"{cfg.schedule}; SGD momentum {cfg.sgd_momentum}, wd {cfg.wd}"),
                ("epochs", f"{cfg.epochs}, validation every {cfg.eval_every}"),
            ]
        rows += [("device", f"{self.device.type}, precision {self.dtype or 'fp32'}"), ("output", str(self.out))]
        for k, v in rows:
            t.add_row(k, v)
        self.console.print(t)

    # ------------------------------------------------------------------ protocols
    def knn(self, progress) -> dict:
        tf = self.eval_tf
        bank, bank_labels = extract_features(self.backbone, Labelled(self.train_images, tf), progress=progress,
                                             description="train features", **self.extract_kw)
        queries, labels = extract_features(self.backbone, Labelled(self.val_images, tf), progress=progress,
                                           description="val features", **self.extract_kw)
        top1, top5 = knn_accuracy(bank, bank_labels, queries, labels, self.num_classes, self.cfg.knn_k, self.cfg.knn_t)
        return {"top1": top1, "top5": top5}

    def fast(self, progress, log) -> dict:
        cfg = self.cfg
        tf = self.eval_tf
        train_x, train_y = extract_features(self.backbone, Labelled(self.train_images, tf), progress=progress,
                                            description="train features", **self.extract_kw)
        val_x, val_y = extract_features(self.backbone, Labelled(self.val_images, tf), progress=progress,
                                        description="val features", **self.extract_kw)
        fc = linear_classifier(train_x.shape[1], self.num_classes).to(self.device)
        order = torch.Generator().manual_seed(cfg.seed)

        def batches(epoch):
            perm = torch.randperm(len(train_y), generator=order).to(self.device)
            for i in range(0, len(perm), cfg.batch_size):
                yield train_x[perm[i:i + cfg.batch_size]], train_y[perm[i:i + cfg.batch_size]]

        steps = -(-len(train_y) // cfg.batch_size)
        history = train_linear(fc, batches, lambda: batched_topk(fc, val_x, val_y), steps, cfg, log,
                               self.console, progress)
        return summarise(history)

    def moco(self, progress, log) -> dict:
        cfg = self.cfg
        train_set = Labelled(self.train_images, linear_train_transform(self.image_size, cfg.min_scale))
        val_set = Labelled(self.val_images, self.eval_tf)
        loader = make_loader(train_set, cfg.batch_size, cfg.workers, self.device, shuffle=True,
                             generator=torch.Generator().manual_seed(cfg.seed))
        fc = linear_classifier(self.backbone.num_features, self.num_classes).to(self.device)
        classifier = FrozenBackboneClassifier(self.backbone, fc, self.dtype).eval()

        def batches(epoch):
            for x, y in loader:
                x, y = self.normalize(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
                yield classifier.features(x), y

        def evaluate():
            logits, labels = extract_features(classifier, val_set, **{**self.extract_kw, "dtype": None})
            return tuple(100.0 * c / len(labels) for c in topk_correct(logits, labels))

        history = train_linear(fc, batches, evaluate, len(loader), cfg, log, self.console, progress)
        return summarise(history)

    def run(self) -> dict:
        cfg = self.cfg
        self._check_output()
        self.describe()
        torch.manual_seed(cfg.seed)  # the classifier's N(0, 0.01) initialisation
        start = time.perf_counter()
        log = MetricsLog(self.out, True, prefix=f"lineval_{cfg.protocol}")
        try:
            with eval_progress(self.console) as progress:
                if cfg.protocol == "knn":
                    result = self.knn(progress)
                    log.write({"step": 0, **result})
                else:
                    result = getattr(self, cfg.protocol)(progress, log)
        finally:
            log.close()
        assert_backbone_unchanged(self.backbone, self.weights.state_dict)
        report = {
            "protocol": cfg.protocol, "note": NOTES[cfg.protocol], **result,
            "weights": {"path": str(self.weights.path.resolve()), "sha256": sha256_file(self.weights.path),
                        "format": self.weights.source, "arch": self.arch, "cifar_stem": self.cifar_stem},
            "data": {"train": describe_source(self.train_images), "val": describe_source(self.val_images),
                     "train_images": len(self.train_images), "val_images": len(self.val_images),
                     "classes": self.num_classes},
            "hyperparameters": {**cfg.model_dump(mode="json"), "image_size": self.image_size,
                                "eval_transform": self.eval_choice,
                                "effective_lr": effective_lr(cfg), "init_std": 0.01,
                                "precision": str(self.dtype or "fp32").removeprefix("torch.")},
            "device": self.device.type, "elapsed_s": round(time.perf_counter() - start, 2),
            "hnmix_version": __version__,
        }
        (self.out / "lineval.json").write_text(json.dumps(report, indent=2) + "\n")
        self.console.print(f"[bold]{cfg.protocol}[/] top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  "
                           f"({NOTES[cfg.protocol]}) -> {self.out / 'lineval.json'}", highlight=False)
        return report


class FrozenBackboneClassifier(nn.Module):
    """Backbone features without grad (autocast allowed), the linear layer in fp32."""

    def __init__(self, backbone: nn.Module, fc: nn.Linear, dtype: torch.dtype | None):
        super().__init__()
        self.backbone, self.fc, self.dtype = backbone, fc, dtype

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.backbone.eval()  # BN statistics stay frozen whatever mode the caller left
        with torch.autocast(x.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            return self.backbone(x).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def summarise(history: list[dict]) -> dict:
    evaluated = [r for r in history if "top1" in r]
    best = max(evaluated, key=lambda r: r["top1"])
    return {"top1": evaluated[-1]["top1"], "top5": evaluated[-1]["top5"], "best_top1": best["top1"],
            "best_epoch": best["epoch"], "epochs": len(history), "final_loss": history[-1]["loss"]}


def lineval(cfg: LinevalConfig, console: Console | None = None) -> dict:
    return Lineval(cfg, console or Console()).run()
