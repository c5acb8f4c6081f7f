"""The built-in demo dataset: procedurally drawn 32 px shapes in 10 classes, no download.

Colours, positions, sizes and backgrounds are random, so only shape identifies the class: a pretrained
backbone must learn shape to separate them, which makes lineval/analyze on the demo meaningful. Colours come
from a small palette, as in real photos: with a unique RGB pair per image, colour alone would tell instances
apart and contrastive learning would take that shortcut (colour jitter does not hide it) instead of shape.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# eight well-separated colours; each image draws a distinct foreground/background pair, lightly perturbed
PALETTE = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [240, 240, 240], [20, 20, 20]], np.float64)
DEMO = "demo"  # the --data value that selects this dataset
CLASSES = ["disc", "square", "triangle", "hstripes", "vstripes", "dstripes", "checker", "ring", "cross", "dots"]


def _shape_mask(kind: int, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(0.35, 0.65, 2) * size
    r = rng.uniform(0.22, 0.38) * size
    dy, dx = yy - cy, xx - cx
    period = rng.uniform(4, 7)
    phase = rng.uniform(0, period)
    name = CLASSES[kind]
    if name == "disc":
        return dy**2 + dx**2 <= r**2
    if name == "square":
        return (abs(dy) <= r * 0.85) & (abs(dx) <= r * 0.85)
    if name == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
    if name == "hstripes":
        return ((yy + phase) % period) < period / 2
    if name == "vstripes":
        return ((xx + phase) % period) < period / 2
    if name == "dstripes":
        return ((xx + yy + phase) % (period * 1.4)) < period * 0.7
    if name == "checker":
        return (((yy + phase) // period + (xx + phase) // period) % 2) == 0
    if name == "ring":
        d = np.sqrt(dy**2 + dx**2)
        return (d <= r) & (d >= r * 0.55)
    if name == "cross":
        return ((abs(dy) <= r * 0.28) & (abs(dx) <= r)) | ((abs(dx) <= r * 0.28) & (abs(dy) <= r))
    # dots: a lattice of small discs
    return (((yy + phase) % period - period / 2) ** 2 + ((xx + phase) % period - period / 2) ** 2) <= (period / 4) ** 2


def make_demo_images(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(n, size, size, 3) uint8 images and (n,) labels, balanced over the 10 classes."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    rng.shuffle(labels)
    images = np.empty((n, size, size, 3), np.uint8)
    for i, kind in enumerate(labels):
        fg_index, bg_index = rng.choice(len(PALETTE), 2, replace=False)
        fg, bg = PALETTE[fg_index] + rng.normal(0, 10, 3), PALETTE[bg_index] + rng.normal(0, 10, 3)
        mask = _shape_mask(int(kind), rng, size)[..., None]
        noise = rng.normal(0, 8, (size, size, 3))
        images[i] = np.clip(np.where(mask, fg, bg) + noise, 0, 255).astype(np.uint8)
    return images, labels


class DemoImages:
    """Same interface as ImageFiles: `load(i)`, `labels`, `classes`."""

    SIZES = {"train": (2000, 0), "val": (500, 1)}

    def __init__(self, split: str = "train"):
        n, seed = self.SIZES[split]
        self.images, labels = make_demo_images(n, seed=seed)
        self.labels = labels.tolist()
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def describe(self, i: int) -> str:
        return f"demo[{i}]"
