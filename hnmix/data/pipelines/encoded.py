"""The worker side of GPU JPEG decoding (hnmix.data.pipelines.decode): DataLoader workers read each file's bytes
and leave decoding to the device, which takes a whole batch of JPEGs at once.

A worker reads a JPEG header (no pixels) to route each file: a complete, baseline, colour JPEG goes to the
device as bytes; anything else - PNG and other formats, grayscale or CMYK JPEGs, progressive JPEGs (nvjpeg
Huffman-decodes those on the host, one by one, in the training process), files without an end marker
(truncated: nvjpeg may decode them silently) - the worker decodes with PIL, as the PIL pipeline would. In
photo datasets these are rare (ImageNet: about 0.1 %).

A batch crosses the process boundary as one flat uint8 tensor of back-to-back file bytes plus their lengths:
one shared-memory block and one pinned copy per batch, instead of one per image.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info
from torchvision.transforms.functional import pil_to_tensor

JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"
PIL_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)  # as hnmix.data.folder.load_rgb


class Encoded(NamedTuple):
    """One file as read by a worker: bytes for the device, pixels decoded here, or why it is unreadable."""

    index: int
    data: bytes = b""  # a JPEG for the device decoder
    pixels: torch.Tensor | None = None  # (3, h, w) uint8, decoded by the worker
    error: str | None = None


class EncodedBatch(NamedTuple):
    indices: torch.Tensor  # (B,) int64 dataset index of each sample
    data: torch.Tensor  # uint8: the device-bound files' bytes, back to back
    lengths: list[int]  # each sample's share of `data` (0: decoded by the worker, or unreadable)
    pixels: list[torch.Tensor | None]
    errors: list[str | None]


def device_decodable(data: bytes) -> bool:
    """A complete baseline colour (YCbCr) JPEG: what the device's batched decoder takes and decodes as PIL
    does. Everything else is decoded on the host (see the module's docstring)."""
    if not (data.startswith(JPEG_START) and data.endswith(JPEG_END)):
        return False
    try:
        with Image.open(io.BytesIO(data)) as img:  # parses the header only
            info = img.info
            return (img.format == "JPEG" and img.mode == "RGB" and not info.get("progressive")
                    and info.get("adobe_transform") != 0)  # Adobe transform 0: RGB stored without YCbCr
    except Exception:  # not an image PIL knows: the host decoder names the problem
        return False


def decode_on_host(data: bytes) -> torch.Tensor:
    """(3, h, w) uint8 RGB of any image PIL reads, converted as hnmix.data.folder.load_rgb converts;
    raises one of PIL_ERRORS when it cannot."""
    with Image.open(io.BytesIO(data)) as img:
        return pil_to_tensor(img.convert("RGB"))


def read_encoded(path: Path, index: int) -> Encoded:
    try:
        data = path.read_bytes()
    except OSError as e:
        return Encoded(index, error=f"cannot read image {path}: {e}")
    if device_decodable(data):
        return Encoded(index, data=data)
    try:
        return Encoded(index, pixels=decode_on_host(data))
    except PIL_ERRORS as e:
        return Encoded(index, error=f"cannot read image {path}: {e}")


class EncodedFiles(Dataset):
    """Item (index, epoch) -> Encoded of file `index` (RunBatches' keys; the epoch does not matter here)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> Encoded:
        return read_encoded(self.paths[key[0]], key[0])


def collate_encoded(items: list[Encoded]) -> EncodedBatch:
    lengths = [len(item.data) for item in items]
    flat = torch.empty(sum(lengths), dtype=torch.uint8)
    if get_worker_info() is not None:  # as default_collate: written once, into the block that crosses over
        flat.share_memory_()
    np.concatenate([np.frombuffer(item.data, dtype=np.uint8) for item in items], out=flat.numpy())
    return EncodedBatch(torch.tensor([item.index for item in items]), flat, lengths,
                        [item.pixels for item in items], [item.error for item in items])
