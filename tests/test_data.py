"""Dataset discovery, the run-long batch sampler and per-sample reproducible augmentations."""

import numpy as np
import pytest
import torch
from helpers import write_images
from PIL import Image

from hnmix.data.augment.settings import AugmentSettings
from hnmix.data.folder import ImageFiles, open_images, scan_images
from hnmix.data.order import RunBatches
from hnmix.data.pipelines.pil import TwoViews
from hnmix.errors import CorruptImageError, HnmixError


def test_imagefolder_labels_from_first_subfolder(tmp_path):
    write_images(tmp_path / "d", 6, classes=["cat", "dog"])
    paths, labels, classes = scan_images(tmp_path / "d")
    assert classes == ["cat", "dog"] and len(paths) == 6
    assert labels == [0 if p.parent.name == "cat" else 1 for p in paths]


def test_root_with_train_split_and_flat_recursive_folder(tmp_path):
    write_images(tmp_path / "root" / "train", 4, classes=["x", "y"])
    write_images(tmp_path / "root" / "val", 2, classes=["x", "y"])
    assert len(open_images(str(tmp_path / "root"))) == 4
    write_images(tmp_path / "flat", 3)
    write_images(tmp_path / "flat" / "deep" / "er", 2, seed=1)
    files = ImageFiles(tmp_path / "flat")
    assert len(files) == 5 and files.labels == [-1] * 5 and files.classes == []


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    with pytest.raises(HnmixError, match="no images"):
        scan_images(tmp_path / "empty")
    with pytest.raises(HnmixError, match="does not exist"):
        scan_images(tmp_path / "nope")


def test_sampler_ranks_take_contiguous_slices_of_the_global_batch():
    single = list(RunBatches(20, 8, 0, 1, seed=3, epochs=2))
    r0 = list(RunBatches(20, 8, 0, 2, seed=3, epochs=2))
    r1 = list(RunBatches(20, 8, 1, 2, seed=3, epochs=2))
    assert len(single) == 4  # drop_last: 2 steps per epoch
    for s, a, b in zip(single, r0, r1, strict=True):
        assert s == a + b
    assert [e for _, e in single[0]] == [0] * 8 and [e for _, e in single[2]] == [1] * 8
    assert {i for i, _ in single[0]} != {i for i, _ in single[2]}  # a new order each epoch


def test_sampler_resumes_mid_run_and_respects_max_steps():
    full = list(RunBatches(20, 4, 0, 1, seed=0, epochs=3))
    assert list(RunBatches(20, 4, 0, 1, seed=0, epochs=3, start_step=7)) == full[7:]
    assert len(RunBatches(20, 4, 0, 1, seed=0, epochs=3, total_steps=6)) == 6
    with pytest.raises(HnmixError, match="fewer than one global batch"):
        RunBatches(3, 4, 0, 1, seed=0, epochs=1)


def test_views_depend_only_on_seed_epoch_and_index(image_folder):
    ds = TwoViews(open_images(str(image_folder)), size=16, seed=1)
    q1, k1, label, skipped = ds[(5, 0)]
    torch.manual_seed(123)  # the global RNG must neither matter nor be changed
    state = torch.get_rng_state()
    q2, k2, _, _ = ds[(5, 0)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and not torch.equal(q1, k1)
    assert q1.dtype == torch.uint8 and q1.shape == (3, 16, 16) and skipped == 0 and label in (0, 1)
    q3, _, _, _ = ds[(5, 1)]
    assert not torch.equal(q1, q3)


def test_corrupt_image_named_or_skipped(image_folder):
    bad = sorted(image_folder.rglob("*.jpg"))[2]
    bad.write_bytes(b"not a jpeg")
    images = open_images(str(image_folder))
    index = images.paths.index(bad)
    with pytest.raises(CorruptImageError, match=bad.name):
        TwoViews(images, 16, 0)[(index, 0)]
    with pytest.warns(UserWarning, match=bad.name):
        _, _, _, skipped = TwoViews(images, 16, 0, skip_corrupt=True)[(index, 0)]
    assert skipped == 1


def test_demo_dataset_is_deterministic_and_labelled():
    a, b = open_images("demo"), open_images("demo")
    assert len(a) == 2000 and len(open_images("demo", "val")) == 500
    assert (a.images == b.images).all() and sorted(set(a.labels)) == list(range(10))


def test_demo_colours_identify_neither_the_class_nor_the_instance():
    # shape is the only class cue, and a palette keeps colour from being an instance shortcut
    images = open_images("demo")
    pixels = torch.from_numpy(images.images).float().flatten(1, 2)  # (n, h*w, 3)
    corners = pixels[:, 0]  # background colour, up to noise
    labels = torch.tensor(images.labels)
    distances = torch.cdist(corners, corners).fill_diagonal_(float("inf"))
    nearest_label_hit = (labels[distances.argmin(1)] == labels).float().mean()
    assert nearest_label_hit < 0.15  # chance is 0.1
    # a typical background colour is shared by about one image in eight (uniform RGB colours: ~28 of 2000)
    assert (distances < 40).sum(1).float().median() > 150


def test_views_follow_the_augment_settings_view_by_view(image_folder):
    settings = AugmentSettings(grayscale_p=0.0, view2={"grayscale_p": 1.0})
    ds = TwoViews(open_images(str(image_folder)), size=16, seed=1, augment=settings)
    for index in range(4):
        q, k, _, _ = ds[(index, 0)]
        assert (k == k[0]).all() and not (q == q[0]).all()


def test_gray_and_transparent_files_give_three_channel_views(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (30, 40), dtype=np.uint8)).save(tmp_path / "gray.jpg")
    Image.fromarray(rng.integers(0, 256, (30, 40, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    ds = TwoViews(open_images(str(tmp_path)), size=16, seed=0)
    for index in range(2):
        for view in ds[(index, 0)][:2]:
            assert view.shape == (3, 16, 16) and view.dtype == torch.uint8
    gray_q = ds[(ds.images.paths.index(tmp_path / "gray.jpg"), 0)][0]
    assert (gray_q == gray_q[0]).all()
