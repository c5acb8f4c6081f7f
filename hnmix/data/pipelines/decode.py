"""--pipeline decode: DataLoader workers only read file bytes (hnmix.data.pipelines.encoded); the training
process decodes each batch at once on the device (torchvision's decode_jpeg on a list: nvjpeg on CUDA,
batched on the hardware decoder where there is one; libjpeg on a CPU device, through the same code) and
applies the batched tensor ops (hnmix.data.augment.tensor) there.

Images keep their own sizes: images of equal size are stacked and cropped by one roi_align call, the
others alone, never padded to the largest of the batch (one 4000 x 3000 photo would make that gigabytes).
Only the crops, (2B, 3, S, S), go on to the colour, blur and flip passes, all at once.

Augmentation draws come from a generator seeded by (seed, step), drawn for the whole global batch and
sliced per rank (hnmix.data.order.rank_rows): a sample's views depend on neither the world size nor
resuming. An unreadable file is named, or with skip_corrupt replaced by the rule of every pipeline
(hnmix.data.pipelines.base.fill_batch).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.io import ImageReadMode, decode_jpeg

from hnmix.data.augment.draws import AugDraws, AugParams, draw_augment
from hnmix.data.augment.settings import AugmentSettings
from hnmix.data.augment.tensor import Boxes, TensorAugment, crop_boxes, finish_views, resized_crop
from hnmix.data.normalize import normalize
from hnmix.data.order import DECODE_DRAWS, RunBatches, rank_rows, sample_seed
from hnmix.data.pipelines.base import Batch, Pipeline, Setup, fill_batch
from hnmix.data.pipelines.encoded import (
    PIL_ERRORS,
    EncodedBatch,
    EncodedFiles,
    collate_encoded,
    decode_on_host,
    device_decodable,
    read_encoded,
)
from hnmix.errors import HnmixError

# a worker only reads bytes and parses headers (0.3 ms per file from the page cache on a loaded, shared
# core; docs/benchmarks.md): a few keep several thousand images/s coming; two batches each in flight hide a
# slow read without holding much shared memory (15-28 MB per batch of 256 photos)
WORKERS, PREFETCH = 4, 2

# torchvision 0.29 deprecates its decoders in favour of TorchCodec with a warning per call; 0.26 has none
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


def reason(error: Exception) -> str:
    """The message's last non-empty line: torchvision's errors end with the decoder's reason."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


def decode_one(data: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, str | None]:
    """(image, None) or (None, why): the device decoder, then PIL for what it refuses (a JPEG feature
    nvjpeg lacks)."""
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device), None
    except RuntimeError as e:
        device_error = reason(e)
    try:
        return decode_on_host(data.numpy().tobytes()).to(device), None
    except PIL_ERRORS as e:
        return None, f"{device_error}; PIL: {e}"


def decode_all(data: list[torch.Tensor], device: torch.device) -> list[tuple[torch.Tensor | None, str | None]]:
    """Decode a list of JPEGs in one call; when that fails (it returns nothing then), image by image, so
    that one bad file costs a retry, not the batch."""
    if not data:
        return []
    try:
        return [(image, None) for image in decode_jpeg(data, mode=ImageReadMode.RGB, device=device)]
    except RuntimeError:
        return [decode_one(d, device) for d in data]


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on the device without waiting for the device's queue: pinned, then copied."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def crop_each(images: list[torch.Tensor], draws: AugDraws, size: int, params: AugParams | None = None) -> torch.Tensor:
    """(2B, 3, size, size) floats in [0, 1]: rows k and B + k are the two crops of images[k] (3, h_k, w_k),
    with the boxes of draws' rows k and B + k. Images of one size share one roi_align call."""
    b, device = len(images), draws.jitter.device
    groups: dict[tuple[int, int], list[int]] = {}
    for k, image in enumerate(images):
        groups.setdefault(tuple(image.shape[1:]), []).append(k)
    rows, local, heights, widths = [], [], [], []  # per view, grouped: its row, its image's place in the group
    for (h, w), members in groups.items():
        rows += members + [b + k for k in members]
        local += list(range(len(members))) * 2
        heights += [h] * (2 * len(members))
        widths += [w] * (2 * len(members))
    rows_d, local_d, heights, widths = to_device(torch.tensor([rows, local, heights, widths]), device)
    boxes = crop_boxes(heights, widths, draws.take(rows_d), None if params is None else params.take(rows_d))
    crops, start = [], 0
    for members in groups.values():
        part = slice(start, start + 2 * len(members))
        stack = torch.stack([images[k] for k in members]).float()
        crops.append(resized_crop(stack, Boxes(*(f[part] for f in boxes)), size, local_d[part]))
        start = part.stop
    return crops[0].new_empty((2 * b, 3, size, size)).index_copy_(0, rows_d, torch.cat(crops)) / 255


class DecodeBatches:
    """Batches from image files decoded on the device, a batch at a time."""

    def __init__(self, images, device: torch.device, image_size: int, seed: int, channels_last: bool,
                 skip_corrupt: bool, workers: int = WORKERS, prefetch: int = PREFETCH,
                 worker_init_fn: Callable[[int], None] | None = None, compile_augment: bool = False,
                 pin_memory: bool | None = None, augment: AugmentSettings | None = None):
        if not hasattr(images, "paths"):
            raise HnmixError("GPU JPEG decoding reads image files; this dataset has none")
        self.paths: list[Path] = list(images.paths)
        self.device, self.size, self.seed, self.skip_corrupt = device, image_size, seed, skip_corrupt
        self.workers, self.prefetch, self.worker_init_fn = workers, prefetch, worker_init_fn
        self.pin_memory = device.type == "cuda" if pin_memory is None else pin_memory
        self.labels = torch.tensor(images.labels, dtype=torch.long, device=device)
        self.generator = torch.Generator(device=device)
        # the views' settings, and the statistics and memory format the views are normalised into
        self.augment = TensorAugment(image_size, channels_last, settings=augment).to(device)
        # about 65 elementwise passes over the (2B, 3, S, S) views: compiling fuses them (same views to 1e-6;
        # 1.7x on a CPU core for 64 views of 112 px) but costs about a minute before the first step
        self.finish = torch.compile(finish_views, dynamic=False) if compile_augment else finish_views

    def loader(self, sampler: RunBatches) -> DataLoader:
        return DataLoader(EncodedFiles(self.paths), batch_sampler=sampler, num_workers=self.workers,
                          collate_fn=collate_encoded, pin_memory=self.pin_memory,
                          prefetch_factor=self.prefetch if self.workers else None,
                          worker_init_fn=self.worker_init_fn)

    def __call__(self, sampler: RunBatches) -> Iterator[Batch]:
        local, world_batch = sampler.local, sampler.batch
        rows, view = rank_rows(sampler)
        rows, view = to_device(rows, self.device), view.to(self.device)  # queries: view 1, keys: view 2
        params = self.augment.params(view)
        for (step, _, _), batch in zip(sampler.positions(), self.loader(sampler), strict=True):
            images, used, skipped = self.decode(batch)
            self.generator.manual_seed(sample_seed(self.seed, step, DECODE_DRAWS))
            draws = draw_augment(2 * world_batch, generator=self.generator, device=self.device).take(rows)
            views = self.normalize(self.finish(crop_each(images, draws, self.size, params), draws, params))
            yield Batch(views[:local], views[local:], self.labels[to_device(used, self.device)], skipped)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        a = self.augment
        return normalize(x, a.mean, a.std, a.memory_format)

    # ------------------------------------------------------------------------------------- decoding
    def decode(self, batch: EncodedBatch) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
        """Every sample's (3, h, w) uint8 image on the device, the dataset index each sample used (an
        unreadable file replaced) and how many unreadable files each skipped."""
        jpegs = [k for k, n in enumerate(batch.lengths) if n]
        chunks = batch.data.split(batch.lengths)
        decoded = dict(zip(jpegs, decode_all([chunks[k] for k in jpegs], self.device), strict=True))
        first, indices = [], batch.indices.tolist()
        for k, index in enumerate(indices):
            if k in decoded:
                image, why = decoded[k]
                first.append((image, why and f"cannot read image {self.paths[index]}: {why}"))
            else:
                first.append((self._upload(batch.pixels[k]), batch.errors[k]))
        if all(image is not None for image, _ in first):  # the usual case: no replacement
            return [image for image, _ in first], batch.indices, torch.zeros(len(first), dtype=torch.long)
        images, used, skipped = fill_batch(indices, len(self.paths), lambda slot, i: self.load(i),
                                           self.skip_corrupt, lambda i: str(self.paths[i]), first)
        return images, torch.tensor(used), torch.tensor(skipped)

    def _upload(self, pixels: torch.Tensor | None) -> torch.Tensor | None:
        return None if pixels is None else pixels.to(self.device, non_blocking=True)

    def load(self, index: int) -> tuple[torch.Tensor | None, str | None]:
        """One file, read and decoded here in the training process (the rare replacement path)."""
        item = read_encoded(self.paths[index], index)
        if not item.data:
            return self._upload(item.pixels), item.error
        image, why = decode_one(torch.frombuffer(bytearray(item.data), dtype=torch.uint8), self.device)
        return image, why and f"cannot read image {self.paths[index]}: {why}"


def open_decode(images, setup: Setup) -> tuple[DecodeBatches, str]:
    if not hasattr(images, "paths"):
        raise HnmixError("--pipeline decode reads image files; the built-in demo data is an array "
                         "(use resident or pil)")
    workers = min(setup.workers, WORKERS)
    source = DecodeBatches(images, setup.device, setup.image_size, setup.seed, setup.channels_last,
                           setup.skip_corrupt, workers=workers, worker_init_fn=setup.worker_init_fn,
                           compile_augment=setup.compile, augment=setup.augment)
    return source, f"{workers} workers read bytes, {setup.device.type} decodes and augments each batch"


# ------------------------------------------------------------------------------------- for `auto`


def jpeg_share(images, count: int = 64) -> float:
    """The share of up to `count` evenly spaced files that the device decodes (the others: the workers)."""
    n = len(images.paths)
    picks = sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(min(count, n))})
    readable = []
    for i in picks:
        try:
            readable.append(device_decodable(images.paths[i].read_bytes()))
        except OSError:
            continue
    return sum(readable) / max(len(readable), 1)


def device_decode_refusal(device: torch.device) -> str | None:
    """Why `device` cannot decode JPEGs (e.g. a torchvision built without nvjpeg), or None."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 100, 50)).save(buffer, "JPEG")
    try:
        decode_jpeg([torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)], mode=ImageReadMode.RGB,
                    device=device)
    except (RuntimeError, ValueError) as e:
        return reason(e)
    return None


PIPELINE = Pipeline("decode", open_decode)
