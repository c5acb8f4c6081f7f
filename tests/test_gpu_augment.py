"""Batched augmentations against torchvision and PIL: each op exactly with fixed parameters, and the whole
pipeline in distribution against the PIL pipeline (hnmix.data.augment) for every preset and view.

Two-sample Kolmogorov-Smirnov tests at alpha = 0.001 with fixed seeds: deterministic, and they fail on
a pipeline whose ranges are off by a quarter (e.g. brightness 0.3 for 0.4, blur p 0.4 for 0.5)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from helpers import assert_same_distribution, gpu_views, pil_views
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from hnmix.data.augment import draws as D
from hnmix.data.augment import tensor as G
from hnmix.data.augment.settings import AugmentSettings, ViewAugment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 4000  # draws per distribution test
N_VIEWS = 2000  # views per whole-pipeline sharpness test (still fails on blur p 0.4 for 0.5, or sigma <= 1.5 for 2)
PRESET_VIEWS = [("mocov2", 0), ("cifar", 0), ("byol", 0), ("byol", 1)]


# ------------------------------------------------------------------------------ ops, exactly


def rand_images(n=5, h=20, w=24, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("mine", "reference", "lo", "hi"), [
    (G.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (G.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (G.adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
    (G.adjust_hue, TF.adjust_hue, -0.1, 0.1),
])
def test_colour_ops_match_torchvision_per_sample(mine, reference, lo, hi):
    x = rand_images(6)
    x[3:] = (x[3:] * 2).round() / 2  # gray pixels and ties between channels: the hue's edge cases
    factors = lo + (hi - lo) * torch.rand(6, generator=torch.Generator().manual_seed(1))
    expected = torch.stack([reference(x[k], float(factors[k])) for k in range(6)])
    torch.testing.assert_close(mine(x, factors), expected, atol=1e-6, rtol=0)


def test_grayscale_matches_torchvision():
    x = rand_images()
    torch.testing.assert_close(G.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [(5, 7), (24, 20), (64, 64)])
def test_blur_is_pils_gaussian_blur(size):
    # PIL's three extended-box passes per axis, edges repeated; PIL rounds each pass to uint8, hence the tolerance
    array = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    sigma = torch.tensor([0.0, 0.1, 0.5, 1.0, 1.7, 2.0, 3.5], dtype=torch.float64)
    x = torch.from_numpy(array).permute(2, 0, 1)[None].expand(len(sigma), -1, -1, -1).double() / 255
    mine = G.gaussian_blur(x, sigma, int(G.pil_box_radius(3.5)) + 1) * 255
    for k, s in enumerate(sigma.tolist()):
        pil = Image.fromarray(array).filter(ImageFilter.GaussianBlur(s)) if s else Image.fromarray(array)
        diff = (mine[k] - torch.from_numpy(np.array(pil)).permute(2, 0, 1)).abs()
        assert diff.max() <= 3 and diff.mean() <= 1.1, f"sigma {s}: max {diff.max():.2f}, mean {diff.mean():.3f}"
    assert torch.equal(mine[0] / 255, x[0])  # sigma 0: the identity kernel


def test_box_radius_has_the_variance_of_sigma():
    # three passes of an extended box of radius r: variance 3 (r (r + 1) (2 r + 1) / 3 - ...) = sigma^2
    for sigma in (0.3, 1.0, 2.0, 5.0):
        kernel = G.box_kernels(G.pil_box_radius(torch.tensor([sigma], dtype=torch.float64)), 20)[0]
        composite = kernel
        for _ in range(2):
            composite = torch.from_numpy(np.convolve(composite.numpy(), kernel.numpy()))
        offsets = torch.arange(len(composite), dtype=torch.float64) - len(composite) // 2
        assert abs(float(composite.sum()) - 1) < 1e-12
        assert abs(float((composite * offsets**2).sum()) - sigma**2) < 1e-6


def test_solarize_is_pils_on_uint8_levels():
    levels = torch.arange(256, dtype=torch.float64).reshape(1, 1, 16, 16).expand(2, 3, -1, -1)
    out = G.solarize(levels / 255, torch.tensor([True, False])) * 255
    pil = np.array(ImageOps.solarize(Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16)), 128))
    torch.testing.assert_close(out[0, 0], torch.from_numpy(pil).double(), atol=1e-9, rtol=0)
    assert torch.equal(out[1], levels[1])


def test_resized_crop_is_a_crop_or_a_bilinear_resize():
    images = rand_images(2, 16, 16) * 255

    def boxes(top, left, h, w):
        return G.Boxes(*(torch.tensor(v, dtype=torch.float64) for v in (top, left, h, w)))

    same = G.resized_crop(images, boxes([3, 5], [2, 0], [8, 8], [8, 8]), 8, torch.arange(2))
    assert torch.equal(same[0], images[0, :, 3:11, 2:10]) and torch.equal(same[1], images[1, :, 5:13, 0:8])
    whole = G.resized_crop(images, boxes([0, 0], [0, 0], [16, 16], [16, 16]), 40, torch.arange(2))
    torch.testing.assert_close(whole, F.interpolate(images, size=40, mode="bilinear", align_corners=False),
                               atol=1e-3, rtol=0)
    # several crops of one source image
    twice = G.resized_crop(images, boxes([3, 5], [2, 0], [8, 8], [8, 8]), 8, torch.tensor([1, 1]))
    assert torch.equal(twice[0], images[1, :, 3:11, 2:10])


def test_flip_and_jitter_identity_when_not_drawn():
    x = rand_images(4, 8, 8)
    assert torch.equal(G.flip(x, torch.tensor([True, False, True, False]))[0], x[0].flip(-1))
    draws = D.draw_augment(4, generator=torch.Generator().manual_seed(0))._replace(jitter=torch.ones(4))
    assert torch.equal(G.color_jitter(x, draws), x)


def test_color_jitter_applies_each_samples_ops_in_its_own_order():
    x = rand_images(6, 10, 12, seed=3)
    draws = D.draw_augment(6, generator=torch.Generator().manual_seed(7))._replace(jitter=torch.zeros(6))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    u = draws.jitter_factors
    factors = [0.6 + 0.8 * u[:, 0], 0.6 + 0.8 * u[:, 1], 0.6 + 0.8 * u[:, 2], 0.1 * (2 * u[:, 3] - 1)]
    expected = []
    for k in range(6):
        img = x[k]
        for op in draws.jitter_order[k].tolist():
            img = ops[op](img, float(factors[op][k]))
        expected.append(img)
    assert len({tuple(o) for o in draws.jitter_order.tolist()}) > 1
    torch.testing.assert_close(G.color_jitter(x, draws), torch.stack(expected), atol=1e-5, rtol=0)


def test_jitter_orders_are_uniform_over_the_24_permutations():
    orders = D.draw_augment(24 * 500, generator=torch.Generator().manual_seed(0)).jitter_order
    assert (orders.sort(dim=1).values == torch.arange(4)).all()
    _, counts = torch.unique(orders, dim=0, return_counts=True)
    chi2 = float(((counts - 500.0) ** 2 / 500.0).sum())
    assert len(counts) == 24 and chi2 < 49.7  # chi-square, 23 degrees of freedom, alpha = 0.001


# ------------------------------------------------------------------------- crop parameters


@pytest.mark.parametrize(("height", "width", "scale", "ratio"), [
    (32, 32, (0.2, 1.0), (3 / 4, 4 / 3)), (24, 60, (0.2, 1.0), (3 / 4, 4 / 3)), (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
    (40, 30, (0.3, 0.6), (0.5, 2.0))])
def test_crop_boxes_follow_random_resized_crop(height, width, scale, ratio):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
                            for _ in range(N)], dtype=torch.float64)
    draws = D.draw_augment(N, generator=torch.Generator().manual_seed(1))
    params = G.aug_params([ViewAugment(crop_scale=scale, crop_ratio=ratio)], torch.zeros(N, dtype=torch.long))
    b = G.crop_boxes(torch.full((N,), height), torch.full((N,), width), draws, params)
    mine = torch.stack([b.top, b.left, b.height, b.width], dim=1)
    assert (mine[:, 2] + mine[:, 0] <= height).all() and (mine[:, 3] + mine[:, 1] <= width).all()
    assert (mine == mine.round()).all() and (mine[:, 2:] > 0).all()
    for name, stat in [("area", lambda p: p[:, 2] * p[:, 3] / (height * width)),
                       ("log aspect", lambda p: torch.log(p[:, 3] / p[:, 2])),
                       ("top", lambda p: p[:, 0] / (height - p[:, 2] + 1)),
                       ("left", lambda p: p[:, 1] / (width - p[:, 3] + 1))]:
        assert_same_distribution(stat(ref), stat(mine), name)


def test_crop_boxes_fall_back_to_torchvisions_central_crop():
    # no 3/4..4/3 crop of >= 20 % fits a 10 x 200 strip: all ten tries fail, the fallback is deterministic
    draws = D.draw_augment(50, generator=torch.Generator().manual_seed(0))
    for height, width in [(10, 200), (200, 10)]:
        b = G.crop_boxes(torch.full((50,), height), torch.full((50,), width), draws)
        ref = T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
        assert {(int(t), int(lft), int(h), int(w)) for t, lft, h, w in zip(*b, strict=True)} == {ref}
    # per-sample sizes: each row uses its own image's extent
    b = G.crop_boxes(torch.tensor([10, 32]), torch.tensor([200, 32]), draws.take(slice(0, 2)))
    assert (int(b.height[0]), int(b.width[0])) == (10, 13) and b.height[1] <= 32


# ----------------------------------------------------------------- the pipeline in distribution


@pytest.mark.parametrize(("preset", "view"), [("mocov2", 0), ("byol", 1)])
def test_colour_statistics_match_the_pil_pipeline(preset, view):
    # a constant colour: crop, blur and flip leave it constant, so each view is one colour that only
    # jitter (in its random order), grayscale and solarisation moved
    array = np.full((16, 16, 3), (200, 120, 60), np.uint8)
    settings = AugmentSettings(preset=preset)
    pil, gpu = pil_views(array, 16, N, settings, view), gpu_views(array, 16, N, settings, view)

    def stats(views):
        c = views.mean(dim=(2, 3))
        value, low = c.max(dim=1).values, c.min(dim=1).values
        r, g, b = c.unbind(1)
        return {"value (brightness)": value, "saturation": (value - low) / value.clamp_min(1e-6),
                "hue angle": torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b), "luma": c.mean(1)}

    for (name, a), b in zip(stats(pil).items(), stats(gpu).values(), strict=True):
        assert_same_distribution(a, b, name)
    p_gray = settings.views()[view].grayscale_p
    sd = math.sqrt(p_gray * (1 - p_gray) / N)
    for views in (pil, gpu):
        gray = (views[:, 0] == views[:, 1]).all(dim=(1, 2)) & (views[:, 1] == views[:, 2]).all(dim=(1, 2))
        assert abs(gray.float().mean() - p_gray) < 4 * sd


@pytest.mark.parametrize(("preset", "view"), PRESET_VIEWS)
def test_crop_and_blur_sharpness_matches_the_pil_pipeline(preset, view):
    # gray noise: how sharp a view is depends on its crop scale (enlargement) and its blur
    base = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    array = np.stack([base] * 3, axis=-1)
    settings = AugmentSettings(preset=preset)

    def sharpness(views):
        g = views.mean(1)
        step = (g[:, :, 1:] - g[:, :, :-1]).abs().mean(dim=(1, 2))
        return step / (g - g.mean(dim=(1, 2), keepdim=True)).abs().mean(dim=(1, 2)).clamp_min(1e-6)

    assert_same_distribution(sharpness(pil_views(array, 32, N_VIEWS, settings, view)),
                             sharpness(gpu_views(array, 32, N_VIEWS, settings, view)), f"{preset} view {view} sharpness")


@pytest.mark.parametrize(("preset", "view"), [("mocov2", 0), ("byol", 1)])
def test_flip_and_solarize_frequencies_match_the_pil_pipeline(preset, view):
    # a left-to-right ramp stays increasing through crop, jitter, grayscale and blur; flip reverses it, and
    # solarisation turns its bright end dark
    ramp = np.tile(np.linspace(40, 250, 32).astype(np.uint8)[None, :, None], (32, 1, 3))
    n, settings = 1000, AugmentSettings(preset=preset, jitter_p=0, crop_scale=(0.9, 1))
    expected = settings.views()[view]
    for views in (pil_views(ramp, 32, n, settings, view), gpu_views(ramp, 32, n, settings, view)):
        columns = views.mean(dim=(1, 2))
        flipped = (columns[:, :4].mean(1) > columns[:, -4:].mean(1)) ^ (columns.max(1).values < 128)
        solarized = columns.max(1).values < 128
        assert abs(flipped.float().mean() - expected.flip_p) < 4 * math.sqrt(0.25 / n)
        assert abs(solarized.float().mean() - expected.solarize_p) < 4 * math.sqrt(0.25 / n) + 1e-9


# ----------------------------------------------------------------------------- module, draws


def test_gpu_augment_views_are_reproducible_normalised_and_split_invariant():
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = G.TensorAugment(16, channels_last=True)
    q1, k1 = aug.views(images, torch.Generator().manual_seed(5))
    q2, k2 = aug.views(images, torch.Generator().manual_seed(5))
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and not torch.equal(q1, k1)
    assert q1.shape == (6, 3, 16, 16) and q1.dtype == torch.float32 and q1.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(G.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(G.IMAGENET_STD).view(1, 3, 1, 1)
    raw = q1 * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # rows of one draw applied to half the images give the same views as the whole batch (DDP ranks)
    draws = D.draw_augment(6, generator=torch.Generator().manual_seed(2))
    whole = aug(images, draws)
    half = aug(images[3:], draws.take(slice(3, 6)))
    torch.testing.assert_close(half, whole[3:])


def test_each_row_follows_its_views_settings_in_one_call():
    # view 1 never flips and stays in colour, view 2 always flips and is always gray
    settings = AugmentSettings(jitter_p=0, blur_p=0, grayscale_p=0, flip_p=0, crop_scale=(1, 1), crop_ratio=(1, 1),
                               view2={"grayscale_p": 1, "flip_p": 1})
    images = torch.randint(0, 256, (4, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = G.TensorAugment(12, settings=settings)
    q, k = (v * aug.std + aug.mean for v in aug.views(images, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(q, images / 255, atol=1e-5, rtol=0)  # whole image, untouched
    gray = G.rgb_to_grayscale(images.float() / 255).expand(-1, 3, -1, -1).flip(-1)
    torch.testing.assert_close(k, gray, atol=1e-5, rtol=0)


def test_padded_images_crop_only_their_valid_region():
    # a 12 x 8 image stored top-left in a 20 x 20 tensor, edge-repeated: views equal those of the bare image
    small = torch.randint(0, 256, (1, 3, 12, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = F.pad(small.float(), (0, 12, 0, 8), mode="replicate").to(torch.uint8)
    draws = D.draw_augment(64, generator=torch.Generator().manual_seed(1))
    source = torch.zeros(64, dtype=torch.long)
    bare = G.augment(small, draws, 10, source=source)
    stored = G.augment(padded, draws, 10, source=source, sizes=torch.tensor([[12, 8]]))
    torch.testing.assert_close(stored, bare, atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_pipeline_never_waits_for_the_host():
    aug = G.TensorAugment(32, settings=AugmentSettings(preset="byol")).cuda()
    images = torch.randint(0, 256, (8, 3, 40, 48), dtype=torch.uint8, device="cuda")
    generator = torch.Generator(device="cuda").manual_seed(0)
    view = (torch.arange(16, device="cuda") >= 8).long()
    source = torch.arange(8, device="cuda").repeat(2)
    aug(images, D.draw_augment(16, generator=generator, device="cuda"), source=source, view=view)  # warm-up
    torch.cuda.set_sync_debug_mode("error")
    try:
        draws = D.draw_augment(16, generator=generator, device="cuda")
        aug(images, draws, source=source, view=view, sizes=torch.tensor([[40, 48]] * 8, device="cuda"))
    finally:
        torch.cuda.set_sync_debug_mode("default")
