"""Skip-corrupt keeps labels honest, in every pipeline: a replacement image carries its own label, and it is
never an image the batch already holds. Which image each slot used is read back from the pixels (every
image a flat colour of its own, augmentations off), independently of the pipelines' bookkeeping."""

import numpy as np
import pytest
import torch
from PIL import Image

from hnmix.data.augment.settings import IMAGENET_MEAN, IMAGENET_STD, AugmentSettings
from hnmix.data.folder import ImageFiles
from hnmix.data.order import RunBatches
from hnmix.data.pipelines import PIPELINES
from hnmix.data.pipelines.base import Setup
from hnmix.errors import CorruptImageError

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:skipping"),
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]

N, BATCH, SIZE = 12, 8, 16
COLOURS = np.array([[20 * k, 250 - 20 * k, (97 * k) % 256] for k in range(N)], dtype=np.uint8)
# every view the whole image, unchanged: its colour names the image
PLAIN = AugmentSettings(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), brightness=0, contrast=0, saturation=0,
                        hue=0, jitter_p=0, grayscale_p=0, blur_p=0, flip_p=0)


def flat_folder(root) -> ImageFiles:
    """N flat-colour PNGs, one class each: label = index, so a neighbour's label is never the same."""
    for k, colour in enumerate(COLOURS):
        (root / f"c{k:02d}").mkdir(parents=True)
        Image.fromarray(np.tile(colour, (20, 20, 1))).save(root / f"c{k:02d}" / "img.png")
    return ImageFiles(root)


def images_seen(views: torch.Tensor) -> list[int]:
    """The image of each normalised view, by its mean colour."""
    pixels = (views.cpu() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    colours = (pixels * 255).mean(dim=(2, 3))
    distance = (colours[:, None, :] - torch.from_numpy(COLOURS).float()[None]).abs().amax(dim=2)
    assert (distance.min(dim=1).values < 1).all()
    return distance.argmin(dim=1).tolist()


def corrupt_in_first_batch(images: ImageFiles, sampler: RunBatches) -> list[int]:
    """Break two images of the first batch whose next file is in the batch too (where 'the next readable
    file' alone would repeat an image of the batch)."""
    batch = sampler.epoch_order(0)[:BATCH].tolist()
    bad = [i for i in batch if (i + 1) % N in batch][:2]
    assert len(bad) == 2
    for i in bad:
        images.paths[i].write_bytes(b"not an image")
    return bad


def folder_with_two_bad_files(tmp_path, monkeypatch, epochs: int):
    """The flat-colour folder, its run order, and the two unreadable files of its first batch."""
    monkeypatch.setenv("HNMIX_CACHE_DIR", str(tmp_path / "cache"))
    images = flat_folder(tmp_path / "d")
    sampler = RunBatches(N, BATCH, 0, 1, seed=0, epochs=epochs)
    return images, sampler, corrupt_in_first_batch(images, sampler)


@pytest.mark.parametrize("name", ["pil", "resident", "decode"])
def test_a_replacement_carries_its_own_label_and_is_not_in_the_batch(tmp_path, monkeypatch, name):
    images, sampler, bad = folder_with_two_bad_files(tmp_path, monkeypatch, epochs=2)
    setup = Setup(torch.device("cpu"), SIZE, seed=0, skip_corrupt=True, augment=PLAIN)
    source, _ = PIPELINES[name].open(images, setup)
    steps = list(source(sampler))
    assert len(steps) == 2
    for (q, k, labels, skipped), wanted in zip(steps, sampler, strict=True):
        used = images_seen(q)
        assert images_seen(k) == used
        assert labels.tolist() == [images.labels[i] for i in used]  # the images actually used
        assert len(set(used)) == BATCH and not set(used) & set(bad)  # no image twice, none unreadable
        slots = [i for i, _ in wanted]
        assert [u for u, i in zip(used, slots, strict=True) if i not in bad] == [i for i in slots if i not in bad]
        assert skipped.tolist() == [int(i in bad) for i in slots]


@pytest.mark.parametrize("name", ["pil", "resident", "decode"])
def test_without_skip_corrupt_the_file_is_named(tmp_path, monkeypatch, name):
    images, sampler, bad = folder_with_two_bad_files(tmp_path, monkeypatch, epochs=1)
    named = "|".join(images.paths[i].parent.name for i in bad)
    setup = Setup(torch.device("cpu"), SIZE, seed=0, augment=PLAIN)
    with pytest.raises(CorruptImageError, match=f"({named})/img.png.*use --skip-corrupt"):
        source, _ = PIPELINES[name].open(images, setup)
        next(source(sampler))


def test_the_rule_stops_when_nothing_is_left_to_replace_with():
    from hnmix.data.pipelines.base import fill_batch
    from hnmix.errors import HnmixError

    readable = [False, True, False, True]

    def load(slot, i):
        return (i, None) if readable[i] else (None, f"cannot read image {i}")

    assert fill_batch([0, 1], 4, load, skip_corrupt=True)[1:] == ([3, 1], [2, 0])  # 1 in the batch, 2 unreadable
    with pytest.raises(HnmixError, match="no image left to replace unreadable 0"):
        fill_batch([0, 1, 3], 4, load, skip_corrupt=True)
