"""Batched augmentations against torchvision: each op exactly with fixed parameters, and the whole
pipeline in distribution against the CPU pipeline (hnmix.data.augment.moco_v2_augment) on PIL images.

Two-sample Kolmogorov-Smirnov tests at alpha = 0.001 with fixed seeds: deterministic, and they fail on
a pipeline whose ranges are off by a quarter (e.g. brightness 0.3 for 0.4, blur p 0.4 for 0.5)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision import transforms as T

from hnmix.data import gpu_augment as G
from hnmix.data.augment import moco_v2_augment

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 4000  # draws per distribution test


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().sort().values, b.double().sort().values
    v = torch.cat([a, b])
    fa = torch.searchsorted(a, v, right=True) / len(a)
    fb = torch.searchsorted(b, v, right=True) / len(b)
    return float((fa - fb).abs().max())


def assert_same_distribution(a, b, what):
    critical = math.sqrt(-math.log(0.001 / 2) / 2) * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))
    d = ks_statistic(a, b)
    assert d < critical, f"{what}: KS statistic {d:.4f} >= {critical:.4f}"


def cpu_views(array: np.ndarray, size: int, n: int, seed: int = 0) -> torch.Tensor:
    transform, img = moco_v2_augment(size), Image.fromarray(array)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.stack([transform(img) for _ in range(n)]).float()


def gpu_views(array: np.ndarray, size: int, n: int, seed: int = 0) -> torch.Tensor:
    images = torch.from_numpy(array).permute(2, 0, 1)[None].expand(n, -1, -1, -1).contiguous()
    draws = G.draw_augment(n, generator=torch.Generator().manual_seed(seed))
    return (G.augment(images, draws, size) * 255).round()  # the CPU pipeline's uint8 levels


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


def test_grayscale_and_blur_match_torchvision():
    x = rand_images()
    torch.testing.assert_close(G.rgb_to_grayscale(x), TF.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    blurred = G.gaussian_blur(x, G.gaussian_kernels(sigma, 5))
    expected = torch.stack([TF.gaussian_blur(x[k], [5, 5], [float(sigma[k])] * 2) for k in range(5)])
    torch.testing.assert_close(blurred, expected, atol=1e-6, rtol=0)
    identity = F.one_hot(torch.tensor([2] * 5), 5).float()
    assert torch.equal(G.gaussian_blur(x, identity), x)  # the no-blur kernel changes nothing


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
    draws = G.draw_augment(4, generator=torch.Generator().manual_seed(0))._replace(jitter=torch.ones(4))
    assert torch.equal(G.color_jitter(x, draws), x)


def test_color_jitter_applies_each_samples_ops_in_its_own_order():
    x = rand_images(6, 10, 12, seed=3)
    draws = G.draw_augment(6, generator=torch.Generator().manual_seed(7))._replace(jitter=torch.zeros(6))
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
    orders = G.draw_augment(24 * 500, generator=torch.Generator().manual_seed(0)).jitter_order
    assert (orders.sort(dim=1).values == torch.arange(4)).all()
    _, counts = torch.unique(orders, dim=0, return_counts=True)
    chi2 = float(((counts - 500.0) ** 2 / 500.0).sum())
    assert len(counts) == 24 and chi2 < 49.7  # chi-square, 23 degrees of freedom, alpha = 0.001


# ------------------------------------------------------------------------- crop parameters


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 60)])
def test_crop_boxes_follow_random_resized_crop(height, width):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
                            for _ in range(N)], dtype=torch.float64)
    draws = G.draw_augment(N, generator=torch.Generator().manual_seed(1))
    b = G.crop_boxes(torch.full((N,), height), torch.full((N,), width), draws)
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
    draws = G.draw_augment(50, generator=torch.Generator().manual_seed(0))
    for height, width in [(10, 200), (200, 10)]:
        b = G.crop_boxes(torch.full((50,), height), torch.full((50,), width), draws)
        ref = T.RandomResizedCrop.get_params(torch.empty(3, height, width), [0.2, 1.0], [3 / 4, 4 / 3])
        assert {(int(t), int(lft), int(h), int(w)) for t, lft, h, w in zip(*b, strict=True)} == {ref}
    # per-sample sizes: each row uses its own image's extent
    b = G.crop_boxes(torch.tensor([10, 32]), torch.tensor([200, 32]), draws.take(slice(0, 2)))
    assert (int(b.height[0]), int(b.width[0])) == (10, 13) and b.height[1] <= 32


# ----------------------------------------------------------------- the pipeline in distribution


def test_colour_statistics_match_the_cpu_pipeline():
    # a constant colour: crop, blur and flip leave it constant, so each view is one colour that only
    # jitter (in its random order) and grayscale moved
    array = np.full((16, 16, 3), (200, 120, 60), np.uint8)
    cpu, gpu = cpu_views(array, 16, N), gpu_views(array, 16, N)

    def stats(views):
        c = views.mean(dim=(2, 3))
        value, low = c.max(dim=1).values, c.min(dim=1).values
        r, g, b = c.unbind(1)
        return {"value (brightness)": value, "saturation": (value - low) / value.clamp_min(1e-6),
                "hue angle": torch.atan2(math.sqrt(3) * (g - b), 2 * r - g - b), "luma": c.mean(1)}

    for (name, a), b in zip(stats(cpu).items(), stats(gpu).values(), strict=True):
        assert_same_distribution(a, b, name)
    gray_cpu = (cpu[:, 0] == cpu[:, 1]).all(dim=(1, 2)) & (cpu[:, 1] == cpu[:, 2]).all(dim=(1, 2))
    gray_gpu = (gpu[:, 0] == gpu[:, 1]).all(dim=(1, 2)) & (gpu[:, 1] == gpu[:, 2]).all(dim=(1, 2))
    sd = math.sqrt(0.2 * 0.8 / N)
    assert abs(gray_cpu.float().mean() - 0.2) < 4 * sd and abs(gray_gpu.float().mean() - 0.2) < 4 * sd


def test_crop_and_blur_sharpness_matches_the_cpu_pipeline():
    # gray noise: how sharp a view is depends on its crop scale (enlargement) and its blur
    base = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    array = np.stack([base] * 3, axis=-1)

    def sharpness(views):
        g = views.mean(1)
        step = (g[:, :, 1:] - g[:, :, :-1]).abs().mean(dim=(1, 2))
        return step / (g - g.mean(dim=(1, 2), keepdim=True)).abs().mean(dim=(1, 2)).clamp_min(1e-6)

    assert_same_distribution(sharpness(cpu_views(array, 32, N)), sharpness(gpu_views(array, 32, N)), "sharpness")


def test_flip_frequency_matches_the_cpu_pipeline():
    # a left-to-right ramp stays increasing through crop, jitter, grayscale and blur; only flip reverses it
    ramp = np.tile(np.linspace(40, 160, 32).astype(np.uint8)[None, :, None], (32, 1, 3))
    n = 1000
    for views in (cpu_views(ramp, 32, n), gpu_views(ramp, 32, n)):
        mean = views.mean(dim=(1, 2))
        flipped = (mean[:, :16].mean(1) > mean[:, 16:].mean(1)).float().mean()
        assert abs(flipped - 0.5) < 4 * math.sqrt(0.25 / n)


# ----------------------------------------------------------------------------- module, draws


def test_gpu_augment_views_are_reproducible_normalised_and_split_invariant():
    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    aug = G.GpuAugment(16, channels_last=True)
    q1, k1 = aug.views(images, torch.Generator().manual_seed(5))
    q2, k2 = aug.views(images, torch.Generator().manual_seed(5))
    assert torch.equal(q1, q2) and torch.equal(k1, k2) and not torch.equal(q1, k1)
    assert q1.shape == (6, 3, 16, 16) and q1.dtype == torch.float32 and q1.is_contiguous(memory_format=torch.channels_last)
    mean, std = torch.tensor(G.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(G.IMAGENET_STD).view(1, 3, 1, 1)
    raw = q1 * std + mean
    assert raw.min() >= -1e-5 and raw.max() <= 1 + 1e-5
    # rows of one draw applied to half the images give the same views as the whole batch (DDP ranks)
    draws = G.draw_augment(6, generator=torch.Generator().manual_seed(2))
    whole = aug(images, draws)
    half = aug(images[3:], draws.take(slice(3, 6)))
    torch.testing.assert_close(half, whole[3:])


def test_padded_images_crop_only_their_valid_region():
    # a 12 x 8 image stored top-left in a 20 x 20 tensor, edge-repeated: views equal those of the bare image
    small = torch.randint(0, 256, (1, 3, 12, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    padded = F.pad(small.float(), (0, 12, 0, 8), mode="replicate").to(torch.uint8)
    draws = G.draw_augment(64, generator=torch.Generator().manual_seed(1))
    source = torch.zeros(64, dtype=torch.long)
    bare = G.augment(small, draws, 10, source=source)
    stored = G.augment(padded, draws, 10, source=source, sizes=torch.tensor([[12, 8]]))
    torch.testing.assert_close(stored, bare, atol=1e-5, rtol=0)
