"""The batch-order contract every pipeline keeps: which images each step takes, on which rank, and the seeds
of their random draws, all from (seed, epoch or step, index) alone.

So a resumed run, a run with another worker count, and a DDP run see exactly the same images and views.
Batches come from one sampler over all remaining (epoch, step) pairs, so a single DataLoader with
persistent workers serves the whole run and prefetches across epochs. Batched pipelines draw the random
numbers of the whole global batch once per step and take this rank's rows (`rank_rows`).
"""

from __future__ import annotations

import torch

from hnmix.errors import HnmixError

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden ratio, to spread (seed, epoch, index) over the seed space
# sample_seed's index of each per-step random stream (sample indices are >= 0; the trainer's are -2 and -3 - rank)
EPOCH_ORDER = -1
RESIDENT_DRAWS = -(10**6)
DECODE_DRAWS = -2 * 10**6


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * _MIX + epoch) * _MIX + index) % (2**63)


class RunBatches(torch.utils.data.Sampler):
    """This rank's share of every remaining global batch of the run, epoch after epoch.

    Global batch b of an epoch is `perm[b*B:(b+1)*B]` of a permutation drawn from (seed, epoch); rank r
    takes the contiguous slice r, so all-gathered keys come back in single-process order.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, epochs: int,
                 start_step: int = 0, total_steps: int | None = None):
        if n < global_batch:
            raise HnmixError(f"the dataset has {n} images, fewer than one global batch of {global_batch}")
        self.n, self.batch, self.rank, self.world, self.seed = n, global_batch, rank, world, seed
        self.steps_per_epoch = n // global_batch  # drop_last: every step has a full global batch
        self.total = min(epochs * self.steps_per_epoch, total_steps or 10**18)
        self.start = start_step

    def __len__(self) -> int:
        return self.total - self.start

    @property
    def local(self) -> int:
        """Samples per rank and step."""
        return self.batch // self.world

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch,
                                                                                            EPOCH_ORDER)))

    def positions(self):
        """(step, epoch, start of this rank's slice of epoch_order(epoch)) for every remaining step."""
        for step in range(self.start, self.total):
            e, b = divmod(step, self.steps_per_epoch)
            yield step, e, b * self.batch + self.rank * self.local

    def __iter__(self):
        epoch, perm = -1, None
        for _, e, lo in self.positions():
            if e != epoch:
                epoch, perm = e, self.epoch_order(e)
            yield [(i, e) for i in perm[lo:lo + self.local].tolist()]


def rank_rows(sampler: RunBatches, views: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, view): this rank's rows of a per-step draw for `views` x the global batch (view v of global
    sample s is row v * B + s), view-major as the rank's batch is laid out, and each row's view index. A
    sample's draws thus depend on neither the world size nor the rank."""
    lo = sampler.rank * sampler.local
    mine = torch.arange(lo, lo + sampler.local)
    rows = torch.cat([v * sampler.batch + mine for v in range(views)])
    return rows, torch.arange(views).repeat_interleave(sampler.local)
