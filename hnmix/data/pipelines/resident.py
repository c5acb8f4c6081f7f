"""--pipeline resident: the whole dataset decoded once into a uint8 tensor, cached on disk, held on the
device; each step indexes its batch in RunBatches order and augments it there with the tensor ops
(hnmix.data.augment.tensor). No DataLoader workers, no per-image Python in the step.

Images of different sizes are stored top-left in one tensor of the largest size, the rest of each slot
repeating the image's edge, so crops and their bilinear borders never see another image's pixels.

The cache lives in hnmix.data.cache.cache_dir(). Its name is a hash of the
resolved root and every file's relative path, size and mtime: any changed, added or removed file gives
a new cache (old ones are not deleted; they are safe to remove).
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from hnmix.data.augment.draws import draw_augment
from hnmix.data.augment.settings import AugmentSettings
from hnmix.data.augment.tensor import TensorAugment
from hnmix.data.cache import cache_dir
from hnmix.data.folder import load_rgb
from hnmix.data.order import RESIDENT_DRAWS, RunBatches, rank_rows, sample_seed
from hnmix.data.pipelines.base import Batch, Pipeline, Setup, fill_batch
from hnmix.errors import CorruptImageError, HnmixError

CACHE_FORMAT = 1
AUTO_MAX_SIDE = 256  # auto: "small images" only; larger ones are better cropped before they are stored
AUTO_MEMORY_SHARE = 0.25  # auto: the dataset may take at most this share of the device's memory


class Decoded(NamedTuple):
    images: torch.Tensor  # (N, 3, H, W) uint8, edge-padded past each image's own size
    sizes: torch.Tensor  # (N, 2) int64 (height, width)
    skipped: torch.Tensor  # (N,) int64 > 0 for an unreadable file (its slot holds the next readable image; batches
    # replace it by fill_batch's rule instead)
    corrupt: list[str]  # names of the unreadable files

    @property
    def nbytes(self) -> int:
        return self.images.numel()

    @property
    def uniform(self) -> bool:
        return bool((self.sizes == self.sizes[0]).all())


def cache_path(images) -> Path:
    """The cache file of an ImageFiles dataset: changes with any file's path, size or mtime."""
    digest = hashlib.sha256(f"hnmix-decoded-{CACHE_FORMAT}\n{images.root.resolve()}\n".encode())
    for path in images.paths:
        st = path.stat()
        digest.update(f"{path.relative_to(images.root)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return cache_dir() / f"decoded-{digest.hexdigest()[:20]}.pt"


def _threads() -> int:
    return min(16, os.cpu_count() or 1)  # PIL decodes without the GIL


def _header_size(path: Path) -> tuple[int, int] | None:
    try:
        with Image.open(path) as img:
            return img.size[1], img.size[0]
    except Exception:  # unreadable: decided (and named) at decode time
        return None


def largest_side_sample(images, count: int = 64) -> int:
    """The largest side among up to `count` evenly spaced images (headers only): auto's quick look."""
    if not hasattr(images, "paths"):
        return max(images.images.shape[1:3])
    picks = np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)
    sizes = [s for s in map(_header_size, (images.paths[i] for i in picks)) if s]
    return max((max(s) for s in sizes), default=0)


def decode_all(images) -> Decoded:
    """Decode every image of an ImageFiles (or DemoImages) into one edge-padded uint8 tensor."""
    if not hasattr(images, "paths"):  # the demo set is already an array
        arr = torch.from_numpy(np.ascontiguousarray(images.images)).permute(0, 3, 1, 2).contiguous()
        n = len(arr)
        return Decoded(arr, torch.tensor([arr.shape[2:]] * n), torch.zeros(n, dtype=torch.long), [])
    n = len(images)
    with ThreadPoolExecutor(_threads()) as pool:
        headers = list(pool.map(_header_size, images.paths, chunksize=64))
    readable = [s for s in headers if s]
    if not readable:
        raise HnmixError("every image in the dataset is unreadable")
    height, width = max(s[0] for s in readable), max(s[1] for s in readable)
    out = torch.empty((n, 3, height, width), dtype=torch.uint8)
    slots = out.numpy()
    sizes = np.zeros((n, 2), dtype=np.int64)

    def decode(i: int) -> bool:
        try:
            pixels = np.asarray(load_rgb(images.paths[i])).transpose(2, 0, 1)
        except CorruptImageError:
            return False
        h, w = pixels.shape[1:]
        if h > height or w > width:  # header and pixels disagree: treat as unreadable
            return False
        slot = slots[i]
        slot[:, :h, :w] = pixels
        slot[:, :h, w:] = slot[:, :h, w - 1:w]  # repeat the edge: bilinear samples past it see the edge
        slot[:, h:, :] = slot[:, h - 1:h, :]
        sizes[i] = h, w
        return True

    with ThreadPoolExecutor(_threads()) as pool:
        ok = list(pool.map(decode, range(n), chunksize=64))
    skipped = np.zeros(n, dtype=np.int64)
    for i in range(n):  # an unreadable slot holds the next readable image (the cache's format)
        if not ok[i]:
            j = next(j for j in range(1, n) if ok[(i + j) % n])
            out[i], sizes[i], skipped[i] = out[(i + j) % n], sizes[(i + j) % n], j
    corrupt = [str(images.paths[i]) for i in range(n) if not ok[i]]
    return Decoded(out, torch.from_numpy(sizes), torch.from_numpy(skipped), corrupt)


def load_or_decode(images, log: Callable[[str], None] = print, build: bool = True) -> Decoded:
    """The decoded dataset from its disk cache, decoding and caching it first when needed (build=False
    only waits for another process's cache, e.g. DDP ranks after local rank 0)."""
    if not hasattr(images, "paths"):
        return decode_all(images)
    path = cache_path(images)
    if path.is_file():
        try:
            saved = torch.load(path, weights_only=True, mmap=True)
            if saved.get("format") == CACHE_FORMAT:
                return Decoded(saved["images"], saved["sizes"], saved["skipped"], list(saved["corrupt"]))
        except Exception:  # a damaged cache is rebuilt, never trusted
            pass
    if not build:
        raise HnmixError(f"decoded-data cache {path} is missing or unreadable")
    start = time.perf_counter()
    log(f"decoding {len(images)} images once into {path} ...")
    decoded = decode_all(images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save({"format": CACHE_FORMAT, "images": decoded.images, "sizes": decoded.sizes,
                "skipped": decoded.skipped, "corrupt": decoded.corrupt}, tmp)
    os.replace(tmp, path)  # atomic: readers see the old state or the whole file
    log(f"decoded {len(images)} images ({decoded.nbytes / 2**20:.0f} MiB) in {time.perf_counter() - start:.1f} s")
    return decoded


def check_corrupt(decoded: Decoded, skip_corrupt: bool) -> None:
    if not decoded.corrupt:
        return
    if not skip_corrupt:
        raise CorruptImageError(f"cannot read image {decoded.corrupt[0]} (use --skip-corrupt to skip unreadable "
                                "images)")
    warnings.warn(f"skipping {len(decoded.corrupt)} unreadable images (e.g. {decoded.corrupt[0]}); each is "
                  "replaced by the next readable one not in its batch", stacklevel=2)


def auto_refusal(decoded_side: int, nbytes: int | None, device: torch.device) -> str | None:
    """Why auto keeps the DataLoader, or None when the data should live on the device."""
    if device.type != "cuda":
        return "not a CUDA device"
    if decoded_side > AUTO_MAX_SIDE:
        return f"images up to {decoded_side} px are not small (auto takes <= {AUTO_MAX_SIDE} px)"
    budget = AUTO_MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory
    if nbytes is not None and nbytes > budget:
        return f"{nbytes / 2**30:.1f} GiB decoded exceeds {AUTO_MEMORY_SHARE:.0%} of the device's memory"
    return None


class ResidentBatches:
    """Batches from device-resident data. Augmentation draws come from a generator seeded by (seed, step),
    drawn for the whole global batch and sliced per rank (hnmix.data.order.rank_rows)."""

    def __init__(self, decoded: Decoded, labels: list[int], device: torch.device, image_size: int, seed: int,
                 channels_last: bool, augment: AugmentSettings | None = None):
        self.device, self.seed = device, seed
        self.images = decoded.images.to(device)
        self.sizes = None if decoded.uniform else decoded.sizes.to(device)
        self.skipped = decoded.skipped
        self.readable = (decoded.skipped == 0).tolist() if decoded.corrupt else None  # None: every file
        self.labels = torch.tensor(labels, dtype=torch.long, device=device)
        self.augment = TensorAugment(image_size, channels_last, settings=augment).to(device)
        self.generator = torch.Generator(device=device)
        self.nbytes = decoded.nbytes

    def __call__(self, sampler: RunBatches) -> Iterator[Batch]:
        local, world_batch = sampler.local, sampler.batch
        rows, view = (t.to(self.device) for t in rank_rows(sampler))  # queries: view 1, keys: view 2
        source = torch.arange(local, device=self.device).repeat(2)
        epoch = -1
        for step, e, lo in sampler.positions():
            if e != epoch:  # one host-to-device copy of the order per epoch, none per step
                epoch, order = e, sampler.epoch_order(e)
                order_on_device = order.to(self.device)
            index, idx = order[lo:lo + local], order_on_device[lo:lo + local]
            skipped = self.skipped[index]
            if self.readable is not None and skipped.any():
                index, skipped = self.replace(index)
                idx = index.to(self.device)
            self.generator.manual_seed(sample_seed(self.seed, step, RESIDENT_DRAWS))
            draws = draw_augment(2 * world_batch, generator=self.generator, device=self.device).take(rows)
            sizes = None if self.sizes is None else self.sizes[idx]
            views = self.augment(self.images[idx], draws, source=source, sizes=sizes, view=view)
            yield Batch(views[:local], views[local:], self.labels[idx], skipped)

    def replace(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's indices with unreadable files replaced (named when the data was opened), and the
        files skipped per slot."""
        def load(slot: int, i: int):
            return (i, None) if self.readable[i] else (None, None)

        _, used, skipped = fill_batch(index.tolist(), len(self.readable), load, skip_corrupt=True)
        return torch.tensor(used), torch.tensor(skipped)


def resident_batches(images, *, mode: str, device: torch.device, image_size: int, seed: int, channels_last: bool,
                     skip_corrupt: bool, local_rank: int = 0, log: Callable[[str], None] = print,
                     barrier: Callable[[], None] = lambda: None,
                     augment: AugmentSettings | None = None) -> tuple[ResidentBatches | None, str]:
    """(the source, or None when auto's choice does not hold; a line saying which and why).

    mode: on, or auto = on for a CUDA device when the images are small and fit AUTO_MEMORY_SHARE of its
    memory. Local rank 0 decodes and caches; the other ranks then read its cache.
    """
    if mode == "auto" and (why := auto_refusal(largest_side_sample(images), None, device)):
        return None, f"not device-resident: {why}"
    if local_rank == 0:
        decoded = load_or_decode(images, log)
        barrier()
    else:
        barrier()
        decoded = load_or_decode(images, log, build=False)
    if mode == "auto" and (why := auto_refusal(int(decoded.sizes.max()), decoded.nbytes, device)):
        return None, f"not device-resident: {why}"
    check_corrupt(decoded, skip_corrupt)
    source = ResidentBatches(decoded, list(images.labels), device, image_size, seed, channels_last, augment)
    shape = "x".join(map(str, decoded.images.shape[1:]))
    return source, (f"on {device.type}: {len(images)} x {shape} uint8 ({decoded.nbytes / 2**20:.0f} MiB), "
                    "batched augmentations")


def open_resident(images, setup: Setup) -> tuple[ResidentBatches | None, str]:
    return resident_batches(images, mode="auto" if setup.auto else "on", device=setup.device,
                            image_size=setup.image_size, seed=setup.seed, channels_last=setup.channels_last,
                            skip_corrupt=setup.skip_corrupt, local_rank=setup.local_rank, log=setup.log,
                            barrier=setup.barrier, augment=setup.augment)


PIPELINE = Pipeline("resident", open_resident)
