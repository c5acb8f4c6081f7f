"""Image files on disk: ImageFolder roots (labels from the first sub-folder), roots holding train/, and flat
folders searched recursively (no labels)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from hnmix.data.demo import DEMO, DemoImages
from hnmix.errors import CorruptImageError, HnmixError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def check_data_path(value: str) -> str:
    """A --data value: 'demo' or an existing path (raises ValueError for settings validators)."""
    if value != DEMO and not Path(value).exists():
        raise ValueError(f"data path does not exist: {value}")
    return value


def resolve_split(root: Path, split: str) -> Path:
    """`root/split` when it exists (a dataset root), else `root` itself."""
    return root / split if (root / split).is_dir() else root


def open_images(data: str, split: str = "train"):
    """ImageFiles for a path (using `path/split` when present), DemoImages for 'demo'."""
    if data == DEMO:
        return DemoImages(split)
    return ImageFiles(resolve_split(Path(data), split))


def scan_images(root: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """Sorted image paths, their labels (-1 when unlabelled) and class names.

    Labelled when every image sits inside a top-level sub-folder (the ImageFolder layout).
    """
    root = Path(root)
    if not root.exists():
        raise HnmixError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise HnmixError(f"data path is not a folder: {root}")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith(".")]
    if not files:
        raise HnmixError(f"no images ({', '.join(IMG_EXTENSIONS)}) found under {root}")
    files.sort()
    parts = [f.relative_to(root).parts for f in files]
    if all(len(p) >= 2 for p in parts):
        classes = sorted({p[0] for p in parts})
        index = {c: i for i, c in enumerate(classes)}
        return files, [index[p[0]] for p in parts], classes
    return files, [-1] * len(files), []


READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError)  # what Pillow raises on bad files


def open_image(path: Path) -> Image.Image:
    """The image's header (size, mode, format); its pixels are read by `decode`."""
    try:
        return Image.open(path)
    except READ_ERRORS as e:
        raise CorruptImageError(f"cannot read image {path}: {e}") from None


def can_draft(img: Image.Image) -> bool:
    """Whether `decode` can reduce this image: a JPEG not decoded yet."""
    return img.format == "JPEG" and len(getattr(img, "tile", ())) == 1 and not getattr(img, "decoderconfig", ())


def decode(img: Image.Image, scale: int = 1) -> Image.Image:
    """The pixels of an opened image, RGB or L (a gray image stays one band): no copy when already so.
    scale > 1 (only where can_draft) decodes a JPEG at 1/scale in the DCT domain (`Image.draft`); the size
    asked for makes Pillow pick exactly that scale."""
    if scale > 1 and img.draft(img.mode, (img.width // scale, img.height // scale)) is None:
        raise RuntimeError(f"decode: cannot reduce {img.format} image {img} (check can_draft first)")
    try:
        img.load()
        return img if img.mode in ("RGB", "L") else img.convert("RGB")
    except READ_ERRORS as e:
        raise CorruptImageError(f"cannot read image {getattr(img, 'filename', '')}: {e}") from None


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except READ_ERRORS as e:
        raise CorruptImageError(f"cannot read image {path}: {e}") from None


class ImageFiles:
    """Labelled (or not) image files; `load(i)` returns an RGB PIL image, `open(i)` an undecoded one."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.paths, self.labels, self.classes = scan_images(self.root)

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> Image.Image:
        return load_rgb(self.paths[i])

    def open(self, i: int) -> Image.Image:
        """Header only (see `decode`): pipelines that reduce or crop before decoding read fewer pixels."""
        return open_image(self.paths[i])

    def describe(self, i: int) -> str:
        return str(self.paths[i])
