"""Device-resident data: decoding, the disk cache and its invalidation, unreadable files, the batch order and
its independence from world size and resuming, and `--data-on-gpu` end to end (on the CPU)."""

import json
import os

import numpy as np
import pytest
import torch
from helpers import TINY, write_images
from PIL import Image

from hnmix.cli import app
from hnmix.data.folder import ImageFiles, load_rgb, open_images
from hnmix.data.order import RunBatches
from hnmix.data.pipelines import resident
from hnmix.errors import CorruptImageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("HNMIX_CACHE_DIR", str(tmp_path / "cache"))


def mixed_folder(root):
    """Six labelled images of three sizes."""
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(12, 20), (16, 16), (9, 14), (12, 20), (16, 16), (9, 14)]):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return ImageFiles(root)


def test_decode_pads_each_image_with_its_own_edge(tmp_path):
    images = mixed_folder(tmp_path / "d")
    decoded = resident.decode_all(images)
    assert decoded.images.shape == (6, 3, 16, 20) and decoded.images.dtype == torch.uint8 and not decoded.uniform
    for i, path in enumerate(images.paths):
        pixels = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1)
        h, w = pixels.shape[1:]
        assert decoded.sizes[i].tolist() == [h, w]
        slot = decoded.images[i]
        assert torch.equal(slot[:, :h, :w], pixels)
        assert torch.equal(slot[:, :h, w:], pixels[:, :, -1:].expand(-1, -1, 20 - w))
        assert torch.equal(slot[:, h:, :], slot[:, h - 1:h, :].expand(-1, 16 - h, -1))
    assert decoded.skipped.tolist() == [0] * 6 and decoded.corrupt == []


def test_cache_is_reused_and_invalidated_by_any_file_change(tmp_path, monkeypatch):
    root = write_images(tmp_path / "d", 6, classes=["a", "b"])
    first = resident.load_or_decode(ImageFiles(root), log=lambda _: None)
    path = resident.cache_path(ImageFiles(root))
    assert path.parent == tmp_path / "cache" and path.is_file()

    def no_decoding(images):
        raise AssertionError("decoded again")

    with monkeypatch.context() as m:
        m.setattr(resident, "decode_all", no_decoding)
        again = resident.load_or_decode(ImageFiles(root), log=lambda _: None)
    assert torch.equal(again.images, first.images)
    changed = sorted(root.rglob("*.jpg"))[3]
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(changed)
    os.utime(changed, ns=(1, 1))  # even with an old mtime, the size changed
    assert resident.cache_path(ImageFiles(root)) != path
    rebuilt = resident.load_or_decode(ImageFiles(root), log=lambda _: None)
    assert not torch.equal(rebuilt.images, first.images)
    write_images(root / "a", 1, seed=9)  # an added file
    assert resident.cache_path(ImageFiles(root)) not in (path, resident.cache_path(ImageFiles(root / "b")))


def test_a_damaged_cache_is_rebuilt(tmp_path):
    root = write_images(tmp_path / "d", 4)
    path = resident.cache_path(ImageFiles(root))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    decoded = resident.load_or_decode(ImageFiles(root), log=lambda _: None)
    assert decoded.images.shape[0] == 4 and torch.load(path, weights_only=True)["format"] == resident.CACHE_FORMAT


def test_unreadable_files_are_named_or_replaced_by_the_next(tmp_path):
    root = write_images(tmp_path / "d", 6, classes=["a", "b"])
    images = ImageFiles(root)
    images.paths[2].write_bytes(b"not an image")
    images.paths[3].write_bytes(b"nor this")
    decoded = resident.load_or_decode(ImageFiles(root), log=lambda _: None)
    assert decoded.skipped.tolist() == [0, 0, 2, 1, 0, 0] and torch.equal(decoded.images[2], decoded.images[4])
    with pytest.raises(CorruptImageError, match=images.paths[2].name):
        resident.check_corrupt(decoded, skip_corrupt=False)
    with pytest.warns(UserWarning, match="skipping 2 unreadable images"):
        resident.check_corrupt(decoded, skip_corrupt=True)


def batches(decoded, labels, rank=0, world=1, start=0, steps=4, batch=4, seed=0):
    sampler = RunBatches(len(labels), batch, rank, world, seed, epochs=10, start_step=start, total_steps=steps)
    source = resident.ResidentBatches(decoded, labels, torch.device("cpu"), 8, seed, channels_last=False)
    return list(source(sampler)), sampler


def test_batches_follow_the_sampler_and_do_not_depend_on_ranks_or_resuming(tmp_path):
    images = mixed_folder(tmp_path / "d")
    decoded = resident.decode_all(images)
    labels = [10 + i for i in range(6)]  # label = 10 + index: shows which images each step took
    full, sampler = batches(decoded, labels)
    expected = [[i for i, _ in step] for step in RunBatches(6, 4, 0, 1, 0, epochs=10, total_steps=4)]
    assert [(lab - 10).tolist() for _, _, lab, _ in full] == expected
    q, k, _, skipped = full[0]
    assert q.shape == k.shape == (4, 3, 8, 8) and not torch.equal(q, k) and skipped.tolist() == [0] * 4
    r0, _ = batches(decoded, labels, rank=0, world=2)
    r1, _ = batches(decoded, labels, rank=1, world=2)
    for whole, a, b in zip(full, r0, r1, strict=True):
        for part in range(3):
            torch.testing.assert_close(torch.cat([a[part], b[part]]), whole[part])
    resumed, _ = batches(decoded, labels, start=2)
    for a, b in zip(resumed, full[2:], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_auto_stays_off_on_cpu_and_for_large_or_too_many_images(monkeypatch):
    demo = open_images("demo")
    source, note = resident.resident_batches(demo, mode="auto", device=torch.device("cpu"), image_size=16, seed=0,
                                           channels_last=False, skip_corrupt=False)
    assert source is None and "not a CUDA device" in note
    cuda = torch.device("cuda", 0)
    assert "not small" in resident.auto_refusal(300, None, cuda)

    class Props:
        total_memory = 4 * 2**20

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    assert resident.auto_refusal(32, 2**20, cuda) is None
    assert "exceeds 25%" in resident.auto_refusal(32, 2 * 2**20, cuda)
    source, note = resident.resident_batches(demo, mode="on", device=torch.device("cpu"), image_size=16, seed=0,
                                           channels_last=False, skip_corrupt=False)
    assert source is not None and "2000 x 3x32x32 uint8" in note


def test_pretrain_with_data_on_device_on_cpu(runner, tmp_path):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])
    args = ["pretrain", "--data", str(data), *TINY, "--epochs", "2", "--data-on-gpu", "on", "--method", "mochi",
            "--N", "4", "--s", "2", "--s-prime", "1"]
    first = runner.invoke(app, [*args, "--output", str(tmp_path / "r1")])
    assert first.exit_code == 0, first.output
    assert "batched augmentations" in " ".join(first.stdout.replace("│", " ").split())
    records = [json.loads(line) for line in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(np.isfinite(r["loss"]) for r in records)
    second = runner.invoke(app, [*args, "--output", str(tmp_path / "r2")])  # from the cache, same run
    assert second.exit_code == 0 and "decoding" not in second.stdout
    a, b = (torch.load(tmp_path / r / "last.pt", weights_only=True)["model"] for r in ("r1", "r2"))
    assert all(torch.equal(a[key], b[key]) for key in a)
    bad = runner.invoke(app, [*args, "--data-on-gpu", "maybe", "--output", str(tmp_path / "r3")])
    assert bad.exit_code == 2 and "--data-on-gpu" in bad.stderr


@pytest.mark.slow
def test_two_ddp_processes_equal_one_process_with_device_data(tmp_path):
    # local rank 0 decodes and caches, rank 1 waits at the barrier and reads the cache; the views depend on
    # neither, so 2 x 4 images with shuffle BN train exactly like 8 with split:2 BN (as the loader path does)
    import subprocess
    import sys

    data = write_images(tmp_path / "d", 16, classes=["a", "b"])

    def run(out, nproc, bn):
        args = ["-m", "hnmix", "pretrain", "--data", str(data), "--output", str(out), *TINY, "--epochs", "1",
                "--max-steps", "3", "--bn", bn, "--data-on-gpu", "on"]
        prefix = [sys.executable] + ([] if nproc == 1 else ["-m", "torch.distributed.run",
                                                            f"--nproc_per_node={nproc}", "--standalone"])
        done = subprocess.run(prefix + args, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, cwd=tmp_path, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout, torch.load(out / "last.pt", weights_only=True)["model"]

    ddp_log, ddp = run(tmp_path / "ddp", 2, "shuffle")
    assert "decoding 16 images" in ddp_log  # the cache was built here, by local rank 0 only
    _, single = run(tmp_path / "single", 1, "split:2")
    for key, value in single.items():
        if "running_" not in key and "num_batches" not in key:  # rank 0 keeps its own BN statistics
            torch.testing.assert_close(ddp[key].float(), value.float(), atol=2e-5, rtol=1e-4, msg=key)
