"""The PIL pipeline (hnmix.data.augment): its parameters are the device pipeline's, its pixels torchvision's PIL
transforms', and its reduced JPEG decoding stays close to the full decoding."""

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from hnmix.data.augment import draws as D
from hnmix.data.augment import pil as A
from hnmix.data.augment import tensor as G
from hnmix.data.augment.settings import AugmentSettings, ViewAugment
from hnmix.data.folder import can_draft, decode, open_image
from hnmix.errors import CorruptImageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = [ViewAugment(), *AugmentSettings(preset="byol").views(),
            ViewAugment(crop_scale=(0.3, 0.6), crop_ratio=(0.5, 2.0), brightness=0, hue=0.3, blur_sigma=(0.0, 4.0))]


def photo(width=64, height=48, seed=0) -> Image.Image:
    """A smooth colour image with edges (gradients, a disc), as photos are: JPEG-friendly."""
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.05)
    rgb = np.stack([200 * xx + 30, 180 * yy + 40 * disc, 120 + 100 * disc - 60 * xx], axis=-1)
    noise = np.random.default_rng(seed).normal(0, 3, rgb.shape)
    return Image.fromarray(np.clip(rgb + noise, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------- parameters: the device's mapping


@pytest.mark.parametrize("view", SETTINGS)
@pytest.mark.parametrize(("height", "width"), [(48, 64), (375, 500), (10, 200), (200, 10)])
def test_crop_box_is_the_device_pipelines_crop(view, height, width):
    n = 500
    uniforms = D.draw_uniforms(n, generator=torch.Generator().manual_seed(3))
    draws = D.split_draws(uniforms)
    b = G.crop_boxes(torch.full((n,), height), torch.full((n,), width), draws, G.aug_params([view], torch.zeros(n).long()))
    device = torch.stack([b.left, b.top, b.left + b.width, b.top + b.height], 1).long().tolist()
    plans = A.plan_views(height, width, uniforms, [view] * n)
    assert [list(p.box) for p in plans] == device


@pytest.mark.parametrize("view", SETTINGS)
def test_plan_is_the_device_pipelines_jitter_blur_and_coin_flips(view):
    n = 2000
    uniforms = D.draw_uniforms(n, generator=torch.Generator().manual_seed(4))
    draws, params = D.split_draws(uniforms), G.aug_params([view], torch.zeros(n).long())
    plans = A.plan_views(32, 32, uniforms, [view] * n)
    factors, sigmas = G.jitter_factors(draws, params), G.blur_sigmas(draws, params)
    on = params.jitter_hi > params.jitter_lo
    for k, plan in enumerate(plans):
        ops = [op for op in draws.jitter_order[k].tolist() if on[k, op]] if draws.jitter[k] < view.jitter_p else []
        assert [op for op, _ in plan.jitter] == ops
        assert [f for _, f in plan.jitter] == pytest.approx([float(factors[k, op]) for op in ops], abs=1e-12)
        assert plan.sigma == pytest.approx(float(sigmas[k]), abs=1e-12)
        assert (plan.grayscale, plan.solarize, plan.flip) == (
            bool(draws.gray[k] < view.grayscale_p), bool(draws.solarize[k] < view.solarize_p),
            bool(draws.flip[k] < view.flip_p))


# -------------------------------------------------------------------- pixels: torchvision's on PIL


@pytest.mark.parametrize("seed", range(6))
def test_a_view_is_torchvisions_pil_transforms_with_the_planned_parameters(seed):
    img = photo(seed=seed)
    view = AugmentSettings(preset="byol").views()[1].model_copy(update={"solarize_p": 0.5, "grayscale_p": 0.5})
    uniforms = D.draw_uniforms(8, generator=torch.Generator().manual_seed(seed))
    for plan in A.plan_views(img.height, img.width, uniforms, [view] * 8):
        left, top, right, bottom = plan.box
        expected = TF.resized_crop(img, top, left, bottom - top, right - left, [24, 24],
                                   interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op, factor in plan.jitter:
            expected = ops[op](expected, factor)
        if plan.grayscale:
            expected = TF.rgb_to_grayscale(expected, num_output_channels=3)
        if plan.sigma:
            expected = expected.filter(ImageFilter.GaussianBlur(plan.sigma))  # official MoCo's blur
        if plan.solarize:
            expected = ImageOps.solarize(expected, 128)
        if plan.flip:
            expected = TF.hflip(expected)
        assert torch.equal(A.render(img, plan, 24), T.PILToTensor()(expected))


def test_gray_and_rgb_images_stay_as_they_are_others_become_rgb(tmp_path):
    rgb = photo()
    for mode in ("RGB", "L"):
        img = rgb.convert(mode)
        assert decode(img) is img  # no copy
    for mode in ("RGBA", "P", "CMYK", "LA"):
        assert decode(rgb.convert(mode)).mode == "RGB"
    gray = A.make_pil_transform(None, 16)(rgb.convert("L"))
    assert gray.shape == (3, 16, 16) and gray.dtype == torch.uint8 and (gray == gray[0]).all()


def test_unreadable_pixels_are_a_corrupt_image(tmp_path):
    path = tmp_path / "cut.jpg"
    photo(256, 256).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:2000])  # the header survives, most pixels do not
    img = open_image(path)
    with pytest.raises(CorruptImageError, match="cut.jpg"):
        decode(img)
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(CorruptImageError, match="junk.jpg"):
        open_image(tmp_path / "junk.jpg")


# ------------------------------------------------------------------------------- reduced decoding


def test_draft_scale_is_the_largest_at_which_both_crops_cover_the_view(tmp_path):
    path = tmp_path / "big.jpg"
    photo(640, 480).save(path, quality=90)

    def plan(width, height):
        return A.ViewPlan((0, 0, width, height), [], False, 0.0, False, False)

    img = open_image(path)
    assert can_draft(img)
    assert A.draft_scale([plan(640, 480), plan(300, 260)], 64, img) == 4  # 260 / 4 >= 64 > 260 / 8
    assert A.draft_scale([plan(640, 480), plan(120, 130)], 64, img) == 1
    assert A.draft_scale([plan(600, 480)], 60, img) == 8
    assert A.draft_scale([plan(600, 480)], 60, decode(open_image(path))) == 1  # already decoded
    png = tmp_path / "big.png"
    photo(640, 480).save(png)
    assert A.draft_scale([plan(600, 480)], 60, open_image(png)) == 1  # only JPEGs reduce


def test_reduced_decoding_gives_nearly_the_full_decodings_views(tmp_path):
    path = tmp_path / "big.jpg"
    photo(800, 600).save(path, quality=90)
    augment = A.PilAugment(AugmentSettings(crop_scale=(0.6, 1.0)), 96)
    for seed in range(4):
        generator = torch.Generator().manual_seed(seed)
        plans = A.plan_views(600, 800, D.draw_uniforms(2, generator=generator), augment.views)
        scale = A.draft_scale(plans, 96, open_image(path))
        assert scale >= 2  # crops of >= 0.6 x 480000 px: >= 4 x 96 px a side
        reduced = decode(open_image(path), scale)
        assert reduced.size == (800 // scale, 600 // scale)
        full = decode(open_image(path))
        for plan in plans:
            diff = (A.render(reduced, plan, 96, scale).float() - A.render(full, plan, 96).float()).abs()
            assert diff.mean() < 2.5 and diff.max() < 40, f"seed {seed}: mean {diff.mean():.2f}"
        views = augment(open_image(path), torch.Generator().manual_seed(seed))  # the same draws, reduced
        assert torch.equal(views[0], A.render(reduced, plans[0], 96, scale))


# ------------------------------------------------------------------------------------ the callables


def test_transforms_draw_from_the_generator_or_the_global_rng():
    img = photo()
    augment = A.PilAugment(AugmentSettings(preset="byol"), 16)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = augment(img, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # a generator leaves the global RNG alone
    b = augment(img, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and not torch.equal(*a)
    transform = A.make_pil_transform(AugmentSettings(preset="byol"), 16, view=1)
    torch.manual_seed(5)
    first = transform(img)
    torch.manual_seed(5)
    assert torch.equal(transform(img), first) and first.shape == (3, 16, 16)


@pytest.mark.parametrize("factor", [-0.5, -0.1, -0.003, 0.0, 0.002, 0.05, 0.1, 0.5])
def test_hue_through_the_lookup_table_is_torchvisions(factor):
    rng = np.random.default_rng(int(factor * 1000) % 97)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(A.adjust_hue(img, factor)), np.asarray(TF.adjust_hue(img, factor)))
    gray = img.convert("L")
    assert A.adjust_hue(gray, factor) is gray


@pytest.mark.parametrize("factor", [0.0, 0.37, 0.6, 0.999, 1.0, 1.13, 1.4, 2.7])
def test_brightness_and_contrast_through_lookup_tables_are_torchvisions(factor):
    rng = np.random.default_rng(int(factor * 100))
    for img in (Image.fromarray(rng.integers(0, 256, (29, 41, 3), dtype=np.uint8)),
                Image.fromarray(rng.integers(0, 256, (29, 41), dtype=np.uint8))):
        for ours, theirs in ((A.adjust_brightness, TF.adjust_brightness), (A.adjust_contrast, TF.adjust_contrast)):
            assert np.array_equal(np.asarray(ours(img, factor)), np.asarray(theirs(img, factor))), ours.__name__
