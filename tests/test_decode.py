"""GPU JPEG decoding, run on the CPU (the same code, libjpeg for nvjpeg): views against the tensor ops on
PIL-decoded images and against the PIL pipeline in distribution, images of mixed sizes in one batch, every
kind of awkward file, determinism across resuming and ranks, the feed measurement and auto's choice.
Tests marked with DEVICES also run on CUDA where there is one (nvjpeg: close to PIL, not equal)."""

import io
import math

import numpy as np
import pytest
import torch
from helpers import assert_same_distribution
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from hnmix.bench.feed import measure_feed
from hnmix.data.augment.draws import draw_augment
from hnmix.data.augment.settings import IMAGENET_MEAN, IMAGENET_STD
from hnmix.data.augment.tensor import augment, crop_views
from hnmix.data.folder import ImageFiles, load_rgb
from hnmix.data.order import DECODE_DRAWS, RunBatches, sample_seed
from hnmix.data.pipelines import auto
from hnmix.data.pipelines import decode as decode_pipeline
from hnmix.data.pipelines.decode import DecodeBatches, crop_each
from hnmix.data.pipelines.encoded import EncodedFiles, collate_encoded, device_decodable, read_encoded
from hnmix.data.pipelines.pil import PilBatches, TwoViews
from hnmix.errors import CorruptImageError

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),  # torchvision 0.29 warns on every decode call
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]

CPU = torch.device("cpu")
DEVICES = [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                              reason="no CUDA device"))]
SIZES = [(24, 32), (32, 24), (24, 32), (20, 40), (28, 28), (24, 32), (32, 24), (40, 20)]


def ramp(h: int, w: int, seed: int) -> np.ndarray:
    """Red rises left to right, green top to bottom, blue is noise: a view's gradients show its crop box
    (relative to its image's size) and its flip."""
    y, x = np.mgrid[0:h, 0:w]
    blue = np.random.default_rng(seed).integers(60, 200, (h, w))
    return np.stack([40 + 180 * x / (w - 1), 40 + 180 * y / (h - 1), blue], axis=-1).astype(np.uint8)


def jpeg_bytes(array: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "JPEG", quality=95, **kw)
    return buffer.getvalue()


def mixed_folder(root, sizes=SIZES):
    """Labelled JPEGs of several sizes (label = index % 2)."""
    for i, (h, w) in enumerate(sizes):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.jpg").write_bytes(jpeg_bytes(ramp(h, w, i)))
    return ImageFiles(root)


def source(images, skip_corrupt=False, size=16, seed=0, device=CPU):
    return DecodeBatches(images, device, size, seed, channels_last=False, skip_corrupt=skip_corrupt, workers=0)


def run(images, rank=0, world=1, start=0, steps=3, batch=4, seed=0, **kw):
    sampler = RunBatches(len(images), batch, rank, world, seed, epochs=10**4, start_step=start, total_steps=steps)
    return [[part.cpu() for part in step] for step in source(images, seed=seed, **kw)(sampler)], sampler


def normalize(x):
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ------------------------------------------------------------------------------------------- views


def test_views_are_gpu_augment_of_the_pil_decoded_images(tmp_path):
    images = mixed_folder(tmp_path / "d")
    steps, sampler = run(images, batch=8, steps=2)
    for (step, epoch, lo), (q, k, labels, skipped) in zip(sampler.positions(), steps, strict=True):
        order = sampler.epoch_order(epoch)[lo:lo + 8].tolist()
        assert labels.tolist() == [images.labels[i] for i in order] and skipped.tolist() == [0] * 8
        draws = draw_augment(16, generator=torch.Generator().manual_seed(sample_seed(0, step, DECODE_DRAWS)))
        for p, i in enumerate(order):  # each image alone, from PIL, through the combined augment()
            pixels = pil_to_tensor(load_rgb(images.paths[i]))[None]
            expected = normalize(augment(pixels, draws.take(torch.tensor([p, 8 + p])), 16, source=torch.zeros(2, dtype=torch.long)))
            torch.testing.assert_close(torch.stack([q[p], k[p]]), expected, atol=2e-3, rtol=0)  # libjpeg vs PIL


def test_each_image_is_cropped_from_its_own_pixels_in_a_mixed_batch():
    gen = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in SIZES]
    assert len({im.shape for im in images}) == 5  # groups of 3, 2 and single images
    draws = draw_augment(16, generator=torch.Generator().manual_seed(1))
    crops = crop_each(images, draws, 12)
    assert crops.shape == (16, 3, 12, 12)
    for k, image in enumerate(images):
        rows = torch.tensor([k, 8 + k])
        alone = crop_views(image[None], draws.take(rows), 12, source=torch.zeros(2, dtype=torch.long))
        torch.testing.assert_close(crops[rows], alone, atol=1e-6, rtol=0)


def view_stats(views: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per view (n, 3, S, S in [0, 255]): the crop's extent and position through the ramps, flips, colour."""
    half = views.shape[-1] // 2
    right_minus_left = views[:, :, :, half:].mean(dim=(2, 3)) - views[:, :, :, :half].mean(dim=(2, 3))
    bottom_minus_top = views[:, :, half:].mean(dim=(2, 3)) - views[:, :, :half].mean(dim=(2, 3))
    c = views.mean(dim=(2, 3))
    value, low = c.max(dim=1).values, c.min(dim=1).values
    return {"horizontal ramp (crop width, flip)": right_minus_left[:, 0],
            "horizontal extent (crop width)": right_minus_left[:, 0].abs(),
            "vertical ramp (crop height)": bottom_minus_top[:, 1], "green level (crop top)": c[:, 1],
            "value (brightness)": value, "saturation": (value - low) / value.clamp_min(1e-6)}


def test_view_distributions_match_the_pil_pipeline(tmp_path):
    images = mixed_folder(tmp_path / "d")
    steps, sampler = run(images, batch=8, steps=100, size=16)
    std, mean = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    mine = torch.cat([torch.cat([q, k]) for q, k, _, _ in steps]) * std + mean
    mine = (mine * 255).round()  # the PIL pipeline's uint8 levels
    pil = TwoViews(images, 16, seed=0)
    keys = [key for batch in sampler for key in batch]
    theirs = torch.stack([view for key in keys for view in pil[key][:2]]).float()
    assert len(mine) == len(theirs) == 1600
    for (name, a), b in zip(view_stats(mine).items(), view_stats(theirs).values(), strict=True):
        assert_same_distribution(a, b, name)
    flipped = [(s["horizontal ramp (crop width, flip)"] < 0).float().mean() for s in (view_stats(mine), view_stats(theirs))]
    assert all(abs(f - 0.5) < 4 * math.sqrt(0.25 / 1600) for f in flipped), flipped


# ------------------------------------------------------------------------------- determinism, ranks


@pytest.mark.parametrize("device", DEVICES)
def test_views_depend_on_seed_and_step_only_not_on_resuming_or_ranks(tmp_path, device):
    images = mixed_folder(tmp_path / "d")
    full, _ = run(images, steps=4, device=device)
    again, _ = run(images, steps=4, device=device)
    for a, b in zip(full, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(full[0][0], full[0][1])  # two different views
    resumed, _ = run(images, start=2, steps=4, device=device)
    for a, b in zip(resumed, full[2:], strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    r0, _ = run(images, rank=0, world=2, steps=4, device=device)
    r1, _ = run(images, rank=1, world=2, steps=4, device=device)
    for whole, a, b in zip(full, r0, r1, strict=True):
        for part in range(4):
            torch.testing.assert_close(torch.cat([a[part], b[part]]), whole[part], atol=1e-6, rtol=0)
    other, _ = run(images, steps=4, seed=1, device=device)
    assert not torch.equal(other[0][0], full[0][0])


def test_workers_give_the_same_batches_as_the_main_process(tmp_path):
    images = mixed_folder(tmp_path / "d")
    inline, sampler = run(images, steps=2)
    with_workers = DecodeBatches(images, CPU, 16, 0, channels_last=True, skip_corrupt=False, workers=2)
    for a, b in zip(inline, with_workers(RunBatches(8, 4, 0, 1, 0, epochs=10, total_steps=2)), strict=True):
        assert b[0].is_contiguous(memory_format=torch.channels_last)
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# ------------------------------------------------------------------------------------ awkward files


def awkward_folder(root):
    """f0 a plain JPEG, f1 PNG, f2 CMYK JPEG, f3 grayscale JPEG, f4 progressive JPEG, f5 a plain JPEG."""
    root.mkdir()
    arrays = [ramp(24, 32, i) for i in range(6)]
    (root / "f0.jpg").write_bytes(jpeg_bytes(arrays[0]))
    Image.fromarray(arrays[1]).save(root / "f1.png")
    (root / "f2.jpg").write_bytes(jpeg_bytes(arrays[2], "CMYK"))
    (root / "f3.jpg").write_bytes(jpeg_bytes(arrays[3], "L"))
    (root / "f4.jpg").write_bytes(jpeg_bytes(arrays[4], progressive=True))
    (root / "f5.jpg").write_bytes(jpeg_bytes(arrays[5]))
    return ImageFiles(root)


def decode_files(images, indices, skip_corrupt=False, device=CPU):
    batch = collate_encoded([EncodedFiles(images.paths)[(i, 0)] for i in indices])
    decoded, _, skipped = source(images, skip_corrupt, device=device).decode(batch)
    assert all(image.device.type == device.type for image in decoded)
    return [image.cpu() for image in decoded], skipped


def assert_decoded_as_pil(image, path):
    """Equal to PIL's pixels where libjpeg or PIL decoded; within nvjpeg's IDCT and upsampling differences."""
    reference = pil_to_tensor(load_rgb(path))
    if image.device.type == "cuda" and device_decodable(path.read_bytes()):
        assert image.shape == reference.shape and (image.float() - reference.float()).abs().mean() < 2, path.name
    else:
        assert torch.equal(image, reference), path.name


@pytest.mark.parametrize("device", DEVICES)
def test_png_cmyk_grayscale_and_progressive_files_decode_as_pil_does(tmp_path, device):
    images = awkward_folder(tmp_path / "d")
    routes = [device_decodable(path.read_bytes()) for path in images.paths]
    assert routes == [True, False, False, False, False, True]  # the device takes only plain JPEGs
    decoded, skipped = decode_files(images, range(6), device=device)
    assert skipped.tolist() == [0] * 6
    for image, path in zip(decoded, images.paths, strict=True):
        assert_decoded_as_pil(image, path)


def break_files(images):
    """f1 truncated JPEG, f2 garbage, f4 a complete JPEG with a bogus Huffman table (only decoding finds it)."""
    whole = images.paths[1].with_suffix(".jpg")
    whole.write_bytes(jpeg_bytes(ramp(24, 32, 9)))
    data = whole.read_bytes()
    images.paths[1].write_bytes(data[:len(data) // 2])
    images.paths[2].write_bytes(b"not an image at all")
    huffman = data.index(b"\xff\xc4")
    images.paths[4].write_bytes(data[:huffman + 5] + bytes([255] * 16) + data[huffman + 21:])
    whole.unlink()
    return images


@pytest.mark.parametrize("bad", [1, 2, 4])
def test_an_unreadable_file_is_named_without_skip_corrupt(tmp_path, bad):
    images = break_files(mixed_folder(tmp_path / "d", SIZES[:6]))
    with pytest.raises(CorruptImageError, match=f"{images.paths[bad].name}.*use --skip-corrupt"):
        decode_files(images, [0, bad, 5])


@pytest.mark.parametrize("device", DEVICES)
def test_unreadable_files_are_replaced_by_the_next_readable_one_not_in_the_batch(tmp_path, device):
    images = break_files(mixed_folder(tmp_path / "d"))
    assert device_decodable(images.paths[4].read_bytes())  # a JPEG by its header: the batch decode fails
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        decoded, skipped = decode_files(images, [0, 1, 2, 3, 4], skip_corrupt=True, device=device)
    assert skipped.tolist() == [0, 1, 1, 0, 1]  # f1 -> f5 (2-4 in the batch); f2 -> f6 (5 taken); f4 -> f7
    for image, i in zip(decoded, (0, 5, 6, 3, 7), strict=True):
        assert_decoded_as_pil(image, images.paths[i])


@pytest.mark.parametrize("device", DEVICES)
def test_a_failing_batch_decode_is_retried_image_by_image(tmp_path, monkeypatch, device):
    images = break_files(mixed_folder(tmp_path / "d"))
    calls = []

    def spy(data, **kw):
        calls.append(len(data) if isinstance(data, list) else 1)
        return decode_jpeg(data, **kw)

    decode_jpeg = decode_pipeline.decode_jpeg
    monkeypatch.setattr(decode_pipeline, "decode_jpeg", spy)
    with pytest.warns(UserWarning, match=f"skipping unreadable image .*{images.paths[4].name}"):
        decoded, skipped = decode_files(images, [0, 3, 4, 5], skip_corrupt=True, device=device)
    assert calls[:5] == [4, 1, 1, 1, 1] and skipped.tolist() == [0, 0, 1, 0]
    assert_decoded_as_pil(decoded[1], images.paths[3])


def test_read_encoded_routes_and_collates(tmp_path):
    images = awkward_folder(tmp_path / "d")
    items = [read_encoded(path, i) for i, path in enumerate(images.paths)]
    batch = collate_encoded(items)
    assert batch.indices.tolist() == list(range(6)) and batch.errors == [None] * 6
    chunks = batch.data.split(batch.lengths)
    for k, path in enumerate(images.paths):
        if batch.lengths[k]:
            assert chunks[k].numpy().tobytes() == path.read_bytes() and batch.pixels[k] is None
        else:
            assert batch.pixels[k].dtype == torch.uint8
    missing = read_encoded(tmp_path / "gone.jpg", 7)
    assert "cannot read image" in missing.error and "gone.jpg" in missing.error
    trailing = images.paths[0].read_bytes() + b"appended"
    assert not device_decodable(trailing)  # no end marker last: PIL decides


# ------------------------------------------------------------------------------------ feed, auto


def test_measure_feed_drives_warmup_and_timed_steps_of_any_source(tmp_path):
    seen = []

    def counting(sampler):
        for step, _, _ in sampler.positions():
            seen.append(step)
            yield torch.zeros(4, 3, 2, 2), torch.zeros(4, 3, 2, 2), torch.zeros(4), torch.zeros(4)

    sampler = RunBatches(40, 4, 0, 1, 0, epochs=1)
    result = measure_feed(counting, sampler, steps=5, warmup=3)
    assert seen == list(range(8)) and result.img_per_s > 0 and result.first_batch_s >= 0
    images = mixed_folder(tmp_path / "d")
    for batches in (source(images), PilBatches(TwoViews(images, 16, 0), CPU, 0, channels_last=False)):
        assert measure_feed(batches, RunBatches(8, 4, 0, 1, 0, epochs=2), steps=2, warmup=1).img_per_s > 0
    with pytest.raises(Exception, match="fewer than"):
        measure_feed(counting, RunBatches(8, 4, 0, 1, 0, epochs=1), steps=2, warmup=1)


def test_auto_chooses_device_data_gpu_decode_or_workers(tmp_path, monkeypatch):
    small = mixed_folder(tmp_path / "small")
    large = mixed_folder(tmp_path / "large", [(300, 400), (400, 300)])
    pngs = tmp_path / "png"
    pngs.mkdir()
    for i in range(2):
        Image.fromarray(ramp(300, 300, i)).save(pngs / f"{i}.png")
    assert auto.choose_pipeline(large, CPU).name == "pil"

    class Props:
        total_memory = 2**34

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: Props)
    monkeypatch.setattr(auto, "device_decode_refusal", lambda device: None)
    cuda = torch.device("cuda", 0)
    assert auto.choose_pipeline(small, cuda).name == "resident"
    choice = auto.choose_pipeline(large, cuda)
    assert choice.name == "decode" and "400 px" in choice.reason and "100%" in choice.reason
    assert auto.choose_pipeline(ImageFiles(pngs), cuda).name == "pil"
    monkeypatch.setattr(auto, "device_decode_refusal", lambda device: "not compiled with nvJPEG support")
    assert "nvJPEG" in auto.choose_pipeline(large, cuda).reason
    assert decode_pipeline.device_decode_refusal(CPU) is None  # the probe itself, on a device that decodes
