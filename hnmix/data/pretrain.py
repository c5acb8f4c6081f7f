"""The pretraining data path: two augmented views per image, reproducible from (seed, epoch, index) alone.

Augmentation randomness is seeded per sample, so a resumed run, a run with another worker count, and a
DDP run all see exactly the same crops. Batches come from one sampler over all remaining (epoch, step)
pairs, so a single DataLoader with persistent workers serves the whole run and prefetches across epochs.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset

from hnmix.data.augment import PilAugment
from hnmix.data.augment_settings import AugmentSettings
from hnmix.data.demo import DEMO, DemoImages
from hnmix.data.folder import ImageFiles, resolve_split
from hnmix.errors import CorruptImageError, HnmixError

_MIX = 0x9E3779B97F4A7C15  # 64-bit golden ratio, to spread (seed, epoch, index) over the seed space


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * _MIX + epoch) * _MIX + index) % (2**63)


def open_images(data: str, split: str = "train"):
    """ImageFiles for a path (using `path/split` when present), DemoImages for 'demo'."""
    if data == DEMO:
        return DemoImages(split)
    return ImageFiles(resolve_split(Path(data), split))


class TwoViews(Dataset):
    """Item (index, epoch) -> (view_q uint8, view_k uint8, label, corrupt files skipped).

    Each image is decoded once for its two views (hnmix.data.augment.PilAugment), its draws from a
    generator seeded by (seed, epoch, index): the caller's RNG is neither used nor changed."""

    def __init__(self, images, size: int, seed: int, skip_corrupt: bool = False,
                 augment: AugmentSettings | None = None):
        self.images, self.seed, self.skip_corrupt = images, seed, skip_corrupt
        self.augment = PilAugment(augment, size)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]):
        index, epoch = key
        generator = torch.Generator()
        n = len(self.images)
        for skipped in range(n):
            i = (index + skipped) % n
            generator.manual_seed(sample_seed(self.seed, epoch, index))  # a skipped file leaves no trace
            try:
                with self._open(i) as img:
                    q, k = self.augment(img, generator)
                return q, k, self.images.labels[index], skipped
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise CorruptImageError(f"{e} (use --skip-corrupt to skip unreadable images)") from None
                warnings.warn(f"skipping unreadable image {self.images.describe(i)}", stacklevel=2)
        raise HnmixError("every image in the dataset is unreadable")

    def _open(self, i: int):
        """Undecoded when the source can (files: the pipeline decodes, maybe reduced), else decoded."""
        return self.images.open(i) if hasattr(self.images, "open") else self.images.load(i)


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

    def epoch_order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(sample_seed(self.seed, epoch, -1)))

    def positions(self):
        """(step, epoch, start of this rank's slice of epoch_order(epoch)) for every remaining step."""
        local = self.batch // self.world
        for step in range(self.start, self.total):
            e, b = divmod(step, self.steps_per_epoch)
            yield step, e, b * self.batch + self.rank * local

    def __iter__(self):
        local = self.batch // self.world
        epoch, perm = -1, None
        for _, e, lo in self.positions():
            if e != epoch:
                epoch, perm = e, self.epoch_order(e)
            yield [(i, e) for i in perm[lo:lo + local].tolist()]
