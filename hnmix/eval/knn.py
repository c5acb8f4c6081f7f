"""Weighted kNN classification on cosine similarity (Wu et al. 2018; the usual SSL monitor: k=200, T=0.1).

Each of the k nearest training features votes for its class with weight exp(similarity / T).
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from rich.console import Console

from hnmix.core.dist import rank_and_world
from hnmix.data.labelled import (
    Labelled,
    choose_eval_transform,
    describe_eval_transform,
    eval_transform,
    open_train_val,
)
from hnmix.eval.features import extract_all_ranks, extract_features, extract_resident, rank_shard

KNN_K = 200
KNN_T = 0.1


def knn_scores(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
               k: int = KNN_K, t: float = KNN_T, chunk: int | None = None) -> torch.Tensor:
    """(Q, C) class votes; features need not be normalised (they are here). k is capped at the bank size."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    k = min(k, bank.shape[0])
    chunk = chunk or max(1, 2**27 // bank.shape[0])  # similarity blocks of at most 2^27 floats (512 MB)
    out = []
    for start in range(0, queries.shape[0], chunk):
        sim, idx = (queries[start:start + chunk] @ bank.T).topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, device=bank.device)
        out.append(votes.scatter_add_(1, bank_labels[idx], (sim / t).exp()))
    return torch.cat(out)


def topk_correct(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """Number of rows whose label is among the k highest scores, for each k (k capped at the class count)."""
    top = scores.topk(min(max(ks), scores.shape[1]), dim=1).indices
    hits = top == labels.view(-1, 1)
    return [int(hits[:, :k].any(1).sum()) for k in ks]


def knn_accuracy(bank, bank_labels, queries, labels, num_classes, k=KNN_K, t=KNN_T) -> tuple[float, float]:
    """(top-1 %, top-5 %) of the queries."""
    correct = topk_correct(knn_scores(bank, bank_labels, queries, num_classes, k, t), labels)
    return tuple(100.0 * c / len(labels) for c in correct)


class KnnMonitor:
    """The kNN accuracy of a backbone during pretraining: bank = the train split, queries = the val split.

    Under DDP every rank extracts a share of the bank and of the queries; the bank is all-gathered and the
    hit counts all-reduced, so the monitor costs 1/world of a single-process pass on each rank.
    """

    def __init__(self, data: str, image_size: int, batch_size: int, workers: int, eval_choice: str = "auto"):
        self.bank_images, self.query_images = open_train_val(data, what="the kNN monitor (--knn-every)")
        self.data, self.image_size = data, image_size
        self.eval_choice = choose_eval_transform(image_size, eval_choice)
        self.transform = eval_transform(image_size, self.eval_choice)
        self.batch_size, self.workers = batch_size, workers
        self.resident: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def describe(self, every: int) -> str:
        return (f"every {every} epochs on {self.data}: {len(self.bank_images)} bank / "
                f"{len(self.query_images)} query images, k={KNN_K}, T={KNN_T}, backbone features; "
                f"{describe_eval_transform(self.image_size, self.eval_choice)}")

    def hold_on(self, device: torch.device, log=print, build: bool = True) -> bool:
        """Decode both splits once (the disk cache of hnmix.data.pipelines.resident) and keep them on the device, so each
        evaluation runs without loader workers: for runs whose training data is device-resident. Images of
        mixed sizes stay with the loader (False)."""
        from hnmix.data.pipelines.resident import load_or_decode

        resident = []
        for images in (self.bank_images, self.query_images):
            decoded = load_or_decode(images, log, build=build)
            if not decoded.uniform:
                return False
            resident.append((decoded.images.to(device), torch.tensor(images.labels, device=device)))
        self.resident = resident
        return True

    @torch.no_grad()
    def __call__(self, backbone, normalize, device, dtype) -> dict:
        start = time.perf_counter()
        if self.resident is not None:
            kw = dict(size=self.image_size, batch_size=self.batch_size, normalize=normalize, dtype=dtype,
                      eval_choice=self.eval_choice)
            (bank, bank_labels), (queries, labels) = (extract_resident(backbone, x, y, **kw) for x, y in self.resident)
            top1, top5 = topk_correct(knn_scores(bank, bank_labels, queries, len(self.bank_images.classes)), labels)
            n = len(labels)
            return {"knn_top1": 100 * top1 / n, "knn_top5": 100 * top5 / n, "knn_s": time.perf_counter() - start}
        kw = dict(batch_size=self.batch_size, workers=self.workers, device=device, normalize=normalize, dtype=dtype)
        bank, bank_labels = extract_all_ranks(backbone, self.bank_images, self.transform, **kw)
        rank, world = rank_and_world()
        mine = Labelled(self.query_images, self.transform, rank_shard(len(self.query_images), rank, world, pad=False))
        counts = torch.zeros(3, device=device, dtype=torch.float64)
        if len(mine):
            queries, labels = extract_features(backbone, mine, **kw)
            scores = knn_scores(bank, bank_labels, queries, len(self.bank_images.classes))
            counts += torch.tensor([*topk_correct(scores, labels), len(labels)], device=device, dtype=torch.float64)
        if world > 1:
            dist.all_reduce(counts)
        top1, top5, n = counts.tolist()
        return {"knn_top1": 100 * top1 / n, "knn_top5": 100 * top5 / n, "knn_s": time.perf_counter() - start}


def print_knn(console: Console, epoch: int, result: dict) -> None:
    console.print(f"epoch {epoch}  kNN top-1 {result['knn_top1']:.2f}  top-5 {result['knn_top5']:.2f}  "
                  f"({result['knn_s']:.1f} s)", highlight=False)
