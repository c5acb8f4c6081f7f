"""MoCo-v2 with pluggable hard negatives, the whole step in one module (after MoCo's builder.py):

    MoCo.forward    q = normalize(f_q(view_q)); momentum update of f_k; k = normalize(f_k(shuffled view_k)),
                    unshuffled and all-gathered; logits = [q.k, q @ queue.T] + the method's synthetic logits,
                    minus the entries it (or the label oracle) masks; InfoNCE
    MocoStep        forward (through DDP), backward, enqueue the keys, SGD step

Queue rows are unit keys (K, D); queue and pointer are persistent buffers, so they live in checkpoints.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hnmix.core.device import autocast
from hnmix.core.dist import all_gather, rank_and_world
from hnmix.negatives.base import Strategy


def projection_head(in_dim: int, dim: int, mlp: bool) -> nn.Module:
    if not mlp:
        return nn.Linear(in_dim, dim)
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, dim))


class Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, dim: int, mlp: bool):
        super().__init__()
        self.backbone = backbone
        self.head = projection_head(backbone.num_features, dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def contrastive_loss(logits: torch.Tensor, T: float, keep: torch.Tensor | None = None):
    """InfoNCE with the positive in column 0; negatives with keep=False are left out of the log-sum-exp
    exactly (their exp is 0 via -inf, whatever the dtype). Returns (loss, tempered masked logits)."""
    z = logits / T
    if keep is not None:
        K = keep.shape[1]
        z = torch.cat([z[:, :1], z[:, 1:1 + K].masked_fill(~keep, float("-inf")), z[:, 1 + K:]], dim=1)
    return F.cross_entropy(z, torch.zeros(z.shape[0], dtype=torch.long, device=z.device)), z


def finite_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over finite entries (masked -inf logits left out), computed on the device."""
    finite = torch.isfinite(x)
    return torch.where(finite, x, 0).sum() / finite.sum()


class MocoOutput(NamedTuple):
    logits: torch.Tensor  # (B, 1 + K + S) before temperature; column 0 is the positive
    loss: torch.Tensor
    stats: torch.Tensor  # see STAT_NAMES
    keys: torch.Tensor  # all ranks' keys of this step, to enqueue after the backward
    key_labels: torch.Tensor | None  # their labels (None: unknown)


# MoCo's proxy accuracy (the positive against the queue negatives kept in the loss), mean positive logit, mean
# of the kept queue logits, mean synthetic logit, share of queue negatives kept (Ring, oracle), and the
# accuracy with the synthetic negatives counted too (NaN: none this step)
STAT_NAMES = ("acc", "logit_pos", "logit_neg", "logit_syn", "neg_kept", "acc_syn")


class MoCo(nn.Module):
    def __init__(self, backbone: nn.Module, *, dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.2, mlp: bool = True, shuffle_keys: bool = True, symmetric: bool = False):
        super().__init__()
        self.K, self.m, self.T, self.shuffle_keys, self.symmetric = K, m, T, shuffle_keys, symmetric
        self.encoder_q = Encoder(backbone, dim, mlp)
        self.encoder_k = copy.deepcopy(self.encoder_q).requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(K, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("queue_labels", torch.full((K,), -1, dtype=torch.long))  # -1: unknown

    @torch.no_grad()
    def momentum_update(self) -> None:
        """k <- m k + (1 - m) q, fused over all parameters."""
        k_params = list(self.encoder_k.parameters())
        q_params = [p.detach() for p in self.encoder_q.parameters()]
        torch._foreach_lerp_(k_params, q_params, 1.0 - self.m)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Write the global batch of keys (and their labels) at the pointer; index arithmetic stays on device."""
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=keys.device)) % self.K
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_labels.index_copy_(0, rows, labels if labels is not None else torch.full_like(rows, -1))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % self.K)

    @torch.no_grad()
    def encode_keys(self, im_k: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(this rank's keys, all ranks' keys in batch order).

        With shuffle_keys the global batch is permuted before the key encoder, so its BN (per rank under
        DDP, per sub-batch with split BN) never sees the query's sub-batch: MoCo's shuffle BN. The
        permutation comes from a generator seeded identically on every rank, so no broadcast is needed.
        """
        rank, world = rank_and_world()
        if not self.shuffle_keys:
            k = F.normalize(self.encoder_k(im_k).float(), dim=1)
            return k, all_gather(k)
        x_all = all_gather(im_k)
        perm = torch.randperm(x_all.shape[0], generator=generator, device=x_all.device)
        local = im_k.shape[0]
        k_shuffled = F.normalize(self.encoder_k(x_all[perm[rank * local:(rank + 1) * local]]).float(), dim=1)
        k_all = all_gather(k_shuffled)[torch.argsort(perm)]
        return k_all[rank * local:(rank + 1) * local], k_all

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor, *, strategy: Strategy | None = None,
                labels: torch.Tensor | None = None, oracle: bool = False, generator: torch.Generator | None = None,
                epoch: float = 0.0, shuffle_generator: torch.Generator | None = None) -> MocoOutput:
        """The loss of one step against the queue as it is; the queue is not written (MocoStep enqueues the
        returned keys after the backward, which needs the queue as the loss saw it).

        labels (B,) (-1 = unknown) go with the keys; with oracle=True, queue entries of the query's own class
        leave its loss and are not used to synthesise negatives. strategy gets `generator` and `epoch`.

        Symmetric: both views are queries against the other's key (two query and two key passes, the same
        queue for both), the loss is the mean of the two directions, and both batches of keys are returned
        (first view's, then second's), as MoCo's CIFAR-10 demo and lightly do; logits are the first
        direction's."""
        # normalised in fp32: CPU autocast would do it in bf16 (unit norms off by ~0.3 %) and enqueue that
        q = F.normalize(self.encoder_q(im_q).float(), dim=1)
        q2 = F.normalize(self.encoder_q(im_k).float(), dim=1) if self.symmetric else None
        with torch.no_grad():
            self.momentum_update()
            k, k_all = self.encode_keys(im_k, shuffle_generator)
            if self.symmetric:
                k1, k1_all = self.encode_keys(im_q, shuffle_generator)
        negatives = (labels if oracle else None, strategy, generator, epoch)  # the same for both directions
        logits, loss, stats = self.contrast(q, k, *negatives)
        labels_all = all_gather(labels) if labels is not None else None
        if self.symmetric:
            _, loss2, stats2 = self.contrast(q2, k1, *negatives)
            loss, stats = (loss + loss2) / 2, (stats + stats2) / 2
            k_all = torch.cat([k1_all, k_all])
            labels_all = None if labels_all is None else labels_all.repeat(2)
        return MocoOutput(logits, loss, stats, k_all, labels_all)

    def contrast(self, q: torch.Tensor, k: torch.Tensor, oracle_labels: torch.Tensor | None,
                 strategy: Strategy | None, generator: torch.Generator | None,
                 epoch: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits, InfoNCE loss, stats) of unit queries q against their keys k and the queue's negatives
        (plus the method's synthetic ones, minus the entries it or the label oracle masks)."""
        with torch.autocast(q.device.type, enabled=False):  # logits and loss in fp32 whatever the autocast
            q32 = q.float()
            l_pos = (q32 * k.float()).sum(1, keepdim=True)
            l_neg = q32 @ self.queue.T
            keep = None
            if oracle_labels is not None:  # unknown labels (-1) are never the query's class
                keep = (self.queue_labels[None, :] != oracle_labels[:, None]) | (oracle_labels[:, None] < 0)
            parts = [l_pos, l_neg]
            if strategy is not None:
                visible = l_neg if keep is None else l_neg.masked_fill(~keep, float("-inf"))
                extra, method_keep = strategy(q32, self.queue, visible, generator=generator, epoch=epoch)
                if method_keep is not None:
                    keep = method_keep if keep is None else keep & method_keep
                if extra is not None:
                    parts.append(extra)
            logits = torch.cat(parts, dim=1)
            loss, z = contrastive_loss(logits, self.T, keep)
        return logits, loss, contrast_stats(z, l_pos, l_neg, keep, parts[2] if len(parts) > 2 else None)


@torch.no_grad()
def contrast_stats(z: torch.Tensor, l_pos: torch.Tensor, l_neg: torch.Tensor, keep: torch.Tensor | None,
                   extra: torch.Tensor | None) -> torch.Tensor:
    """STAT_NAMES of one direction, on the device: z = the tempered, masked logits [pos, queue, synthetic]."""
    queue_columns = 1 + l_neg.shape[1]
    acc = (z[:, :queue_columns].argmax(1) == 0).float().mean()
    nan = torch.full_like(acc, float("nan"))
    if keep is None:
        neg, kept = l_neg.mean(), torch.ones_like(acc)
    else:
        neg, kept = torch.where(keep, l_neg, 0).sum() / keep.sum(), keep.float().mean()
    syn, acc_syn = (finite_mean(extra), (z.argmax(1) == 0).float().mean()) if extra is not None else (nan, nan)
    return torch.stack([acc, l_pos.mean(), neg, syn, kept, acc_syn])


class MocoStep:
    """One optimisation step of the model: its forward (through the DDP wrapper `net` when there is one),
    the backward, the enqueue of the step's keys, the SGD step. Nothing in it waits for the device.

    Enqueueing after the backward lets the loss use the queue buffer itself (autograd saved it for
    q @ queue.T): no K x D copy per step, as MoCo's builder.py makes with queue.clone()."""

    def __init__(self, model: MoCo, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, *,
                 strategy: Strategy | None, oracle: bool, dtype: torch.dtype | None, device: torch.device,
                 cudagraphs: bool = False):
        self.model = self.net = model
        self.optimizer, self.scaler, self.strategy, self.oracle = optimizer, scaler, strategy, oracle
        self.dtype, self.device, self.cudagraphs = dtype, device, cudagraphs
        self.shared_gen = torch.Generator(device=device)  # the same draws on every rank: the key shuffle
        self.rank_gen = torch.Generator(device=device)  # this rank's draws: the synthetic negatives

    def __call__(self, im_q: torch.Tensor, im_k: torch.Tensor, labels: torch.Tensor | None, *, lr: float,
                 epoch: float, shared_seed: int, rank_seed: int) -> MocoOutput:
        """One step on normalised device views at learning rate lr; epoch is fractional (for the strategy)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.shared_gen.manual_seed(shared_seed)
        self.rank_gen.manual_seed(rank_seed)
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()  # the graphs' outputs of the last step are free again
        with autocast(self.device, self.dtype):
            out = self.net(im_q, im_k, strategy=self.strategy, labels=labels, oracle=self.oracle,
                           generator=self.rank_gen, epoch=epoch, shuffle_generator=self.shared_gen)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        self.model.enqueue(out.keys, out.key_labels)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return out
