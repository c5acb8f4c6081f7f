"""What hard negatives did to the feature space: each metric as a plain function of feature tensors.

Features are L2-normalised rows. Pairwise work is chunked over rows so 10^4 images fit in memory.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hnmix.negatives.mochi import MochiDraws


def _row_chunks(n: int, chunk: int):
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def uniformity(x: torch.Tensor, t: float = 2.0, chunk: int = 1024) -> float:
    """log E_{i<j} exp(-t ||x_i - x_j||^2) over all pairs (Wang & Isola 2020); lower = more uniform."""
    n = x.shape[0]
    if n < 2:
        raise ValueError("uniformity needs at least two points")
    total, count = torch.tensor(-math.inf, dtype=torch.float64, device=x.device), 0
    for lo, hi in _row_chunks(n, chunk):
        sq = torch.cdist(x[lo:hi].double(), x.double()).pow(2)
        upper = torch.arange(n, device=x.device).view(1, -1) > torch.arange(lo, hi, device=x.device).view(-1, 1)
        values = (-t * sq)[upper]
        if values.numel():
            total = torch.logaddexp(total, torch.logsumexp(values, 0))
            count += values.numel()
    return (total - math.log(count)).item()


def sample_pair_sq_distances(x: torch.Tensor, n_pairs: int, generator: torch.Generator) -> torch.Tensor:
    """||x_i - x_j||^2 for random pairs i != j: the distribution behind the uniformity number (for plots)."""
    n = x.shape[0]
    i = torch.randint(n, (n_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (n_pairs,), generator=generator)) % n
    return (x[i.to(x.device)] - x[j.to(x.device)]).pow(2).sum(1)


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||f(x) - f(x')||^alpha over positive pairs (row i of x with row i of y); lower = better aligned."""
    return (x - y).norm(dim=1).pow(alpha).mean().item()


def class_alignment(x: torch.Tensor, labels: torch.Tensor, alpha: float = 2.0) -> float:
    """E ||f(x) - f(y)||^alpha over all pairs of distinct images of the same class."""
    total, count = 0.0, 0
    for c in labels.unique():
        members = x[labels == c].double()
        if len(members) > 1:
            d = torch.pdist(members).pow(alpha)
            total, count = total + d.sum().item(), count + d.numel()
    if not count:
        raise ValueError("class alignment needs a class with at least two images")
    return total / count


def separation_ratios(x: torch.Tensor, labels: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per image: mean distance to images of other classes / mean distance to the other images of its class.

    Above 1, an image sits closer to its own class than to the rest. Images alone in their class are dropped.
    """
    num_classes = int(labels.max()) + 1
    onehot = F.one_hot(labels, num_classes).double()
    counts = onehot.sum(0)
    ratios = []
    for lo, hi in _row_chunks(x.shape[0], chunk):
        sums = torch.cdist(x[lo:hi].double(), x.double()) @ onehot  # (b, C) summed distances per class
        own = labels[lo:hi]
        own_sum = sums.gather(1, own.view(-1, 1)).squeeze(1)  # includes the zero self-distance
        intra = own_sum / (counts[own] - 1)
        inter = (sums.sum(1) - own_sum) / (x.shape[0] - counts[own])
        ratios.append(inter / intra)
    ratios = torch.cat(ratios)
    return ratios[(counts[labels] > 1) & torch.isfinite(ratios)].float()


# ------------------------------------------------------------------ against a memory (queue or dataset keys)


def same_class_in_topk(l_neg: torch.Tensor, q_labels: torch.Tensor, mem_labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, k) bool: is the r-th highest-logit memory item of the query's class (a false negative)?"""
    idx = l_neg.topk(k, dim=1).indices
    return mem_labels[idx] == q_labels.view(-1, 1)


def matching_probabilities(l_pos: torch.Tensor, l_neg: torch.Tensor, temperature: float, k: int) -> torch.Tensor:
    """(B, k) the k largest negative probabilities of the training softmax over [positive, negatives], sorted
    in descending order (MoCHi, Fig. 2): how much each of the hardest negatives weighs in the loss."""
    p = torch.softmax(torch.cat([l_pos.view(-1, 1), l_neg], dim=1).double() / temperature, dim=1)[:, 1:]
    return p.topk(k, dim=1).values


def proxy_hits(l_pos: torch.Tensor, l_neg: torch.Tensor, l_syn: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) bool: the positive key outranks every negative (and every synthetic negative when given)."""
    hardest = l_neg.max(1).values
    if l_syn is not None and l_syn.shape[1]:
        hardest = torch.maximum(hardest, l_syn.max(1).values)
    return l_pos.view(-1) > hardest


def mochi_false_negatives(hard: torch.Tensor, draws: MochiDraws, q_labels: torch.Tensor,
                          mem_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For MoCHi's synthetic points built from the top-N memory rows `hard` (B, N):
    (B, s) mixes of two negatives that are both of the query's class (definite false negatives),
    (B, s') query mixes whose negative is of the query's class."""
    own = q_labels.view(-1, 1)
    label_at = mem_labels[hard]  # (B, N)
    mixed = (label_at.gather(1, draws.i) == own) & (label_at.gather(1, draws.j) == own)
    query_mixed = label_at.gather(1, draws.j_prime) == own
    return mixed, query_mixed
