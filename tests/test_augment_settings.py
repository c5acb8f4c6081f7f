"""Augmentation settings: presets by name, resolution and its round trip through YAML, clear errors, and every
setting changing what it should in both pipelines (PIL and device)."""

import colorsys
import math

import numpy as np
import pytest
import torch
import yaml
from helpers import OFF, PIPELINES
from pydantic import ValidationError

from hnmix.data.augment.settings import PRESETS, AugmentSettings, ViewAugment
from hnmix.data.order import RunBatches
from hnmix.data.pipelines.resident import Decoded, ResidentBatches

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------- the model


def test_presets_load_by_name_with_their_sources_recipes():
    mocov2 = AugmentSettings.model_validate("mocov2").views()
    assert mocov2 == AugmentSettings().views() and mocov2[0] == mocov2[1]
    assert mocov2[0] == ViewAugment(crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), brightness=0.4, contrast=0.4,
                                    saturation=0.4, hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5,
                                    blur_sigma=(0.1, 2.0), solarize_p=0.0, flip_p=0.5)
    cifar = AugmentSettings(preset="cifar").views()
    assert cifar[0] == cifar[1] == mocov2[0].model_copy(update={"crop_scale": (0.08, 1.0), "blur_p": 0.0})
    byol1, byol2 = AugmentSettings.model_validate({"preset": "byol"}).views()
    assert byol1 == mocov2[0].model_copy(update={"crop_scale": (0.08, 1.0), "saturation": 0.2, "blur_p": 1.0})
    assert byol2 == byol1.model_copy(update={"blur_p": 0.1, "solarize_p": 0.2})
    for name, preset in PRESETS.items():
        assert name in AugmentSettings.model_fields["preset"].description and preset.source


def test_a_preset_fills_only_what_the_user_did_not_set():
    settings = AugmentSettings(preset="byol", hue=0.2, view2={"solarize_p": 0.5})
    view1, view2 = settings.views()
    assert view1.hue == view2.hue == 0.2 and view1.crop_scale == (0.08, 1.0)  # user's, then the preset's
    assert view2.solarize_p == 0.5 and view2.blur_p == 0.1  # user's view-2 field, the preset's other one


@pytest.mark.parametrize("settings", [
    {}, {"preset": "cifar"}, {"preset": "byol"}, {"preset": "byol", "view2": {"blur_p": 1.0}},
    {"preset": "mocov2", "flip_p": 0.0, "view2": {"crop_scale": [0.5, 0.9], "grayscale_p": 1.0}},
])
def test_the_dump_holds_every_resolved_value_and_loads_to_the_same_views(settings):
    original = AugmentSettings.model_validate(settings)
    dumped = yaml.safe_load(yaml.safe_dump(original.model_dump(mode="json")))
    assert set(ViewAugment.model_fields) <= set(dumped)  # every view-1 value, without the preset table
    again = AugmentSettings.model_validate(dumped)
    assert again.views() == original.views() and again.model_dump() == original.model_dump()


def test_a_saved_symmetric_config_still_follows_a_later_change_in_both_views():
    dumped = AugmentSettings(preset="cifar").model_dump(mode="json")
    assert dumped["view2"] == {}
    view1, view2 = AugmentSettings.model_validate({**dumped, "hue": 0.3}).views()
    assert view1.hue == view2.hue == 0.3


def test_every_setting_is_described():
    for model in (ViewAugment, AugmentSettings):
        for name, field in model.model_fields.items():
            assert field.description and len(field.description) > 15, name


@pytest.mark.parametrize(("values", "message"), [
    ({"crop_scale": (0.6, 0.2)}, "crop_scale must satisfy 0 < lo <= hi <= 1"),
    ({"crop_scale": (0.0, 1.0)}, "crop_scale must satisfy 0 < lo <= hi <= 1"),
    ({"crop_ratio": (2.0, 1.0)}, "crop_ratio must satisfy 0 < lo <= hi"),
    ({"blur_sigma": (2.0, 0.1)}, "blur_sigma must satisfy 0 <= lo <= hi"),
    ({"blur_p": 1.5}, "less than or equal to 1"),
    ({"flip_p": -0.1}, "greater than or equal to 0"),
    ({"hue": 0.7}, "less than or equal to 0.5"),
    ({"brightness": -1}, "greater than or equal to 0"),
    ({"preset": "simclr"}, "unknown augmentation preset 'simclr'; choose one of mocov2, cifar, byol"),
    ({"view2": {"solarize_p": 2}}, "view2.solarize_p: Input should be less than or equal to 1"),
    ({"view2": {"crop_scale": (0.9, 0.1)}}, "view2: crop_scale must satisfy"),
    ({"blur": 0.5}, "Extra inputs are not permitted"),
])
def test_invalid_values_fail_with_a_clear_message(values, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AugmentSettings(**values)


# ----------------------------------------------------- each setting, in both pipelines (pil, gpu)

pipelines = pytest.mark.parametrize("views", list(PIPELINES.values()), ids=list(PIPELINES))


def only(**values) -> AugmentSettings:
    """Every random op off except those given."""
    return AugmentSettings(**{**OFF, **values})


def colour(size=16, rgb=(150, 90, 45)):
    return np.full((size, size, 3), rgb, np.uint8)


def ramp(size=32):
    return np.tile(np.linspace(40, 160, size).astype(np.uint8)[None, :, None], (size, 1, 3))


@pipelines
def test_crop_scale_sets_how_much_of_the_image_a_view_shows(views):
    halves = np.zeros((64, 64, 3), np.uint8)
    halves[:, 32:] = 255

    def both_halves(v):
        return ((v.amax(dim=(1, 2, 3)) > 200) & (v.amin(dim=(1, 2, 3)) < 50)).float().mean()

    whole = views(halves, 16, 100, only(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0)))
    assert both_halves(whole) == 1
    tiny = views(halves, 16, 200, only(crop_scale=(0.01, 0.01)))
    assert both_halves(tiny) < 0.25  # a 6 px crop straddles the edge only when it starts within 6 px of it


@pipelines
def test_crop_ratio_sets_the_crops_shape(views):
    stripes = np.repeat((np.arange(64) // 4 % 2 * 255).astype(np.uint8)[:, None], 64, axis=1)  # 4-row stripes
    image = np.stack([stripes] * 3, axis=-1)

    def stripe_rows(v):  # rows per stripe in the 32 px view: 4 x 32 / the crop's height
        dark = v[:, 0, :, 16] < 127.5
        return 32 / (dark[:, 1:] != dark[:, :-1]).sum(1).clamp_min(1).float()

    wide = stripe_rows(views(image, 32, 50, only(crop_scale=(0.25, 0.25), crop_ratio=(2.0, 2.0))))
    tall = stripe_rows(views(image, 32, 50, only(crop_scale=(0.25, 0.25), crop_ratio=(0.5, 0.5))))
    # a wide crop is 22.6 rows high (stripes 5.7 px), a tall one 45.3 (2.8 px)
    assert 5 < wide.median() < 6.5 and 2.4 < tall.median() < 3.3


def hue_turns(c: torch.Tensor) -> torch.Tensor:
    """HSV hue of (n, 3) colours, in turns from the test colour's (150, 90, 45) hue of 1/14."""
    h = torch.tensor([colorsys.rgb_to_hsv(*rgb)[0] for rgb in (c / 255).tolist()])
    return (h - 1 / 14 + 0.5) % 1 - 0.5


@pipelines
@pytest.mark.parametrize(("field", "strength", "measure", "spread"), [
    ("brightness", 0.4, lambda c: c.max(1).values / 150, (0.6, 1.4)),
    ("saturation", 0.4, lambda c: (c.max(1).values - c.min(1).values) / 105, (0.6, 1.4)),
    ("hue", 0.1, hue_turns, (-0.1, 0.1)),
])
def test_each_jitter_strength_sets_its_range(views, field, strength, measure, spread):
    n = 400
    strengths = {"brightness": 0, "contrast": 0, "saturation": 0, "hue": 0, field: strength}
    c = views(colour(), 8, n, only(jitter_p=1.0, **strengths)).mean(dim=(2, 3))
    values = measure(c)
    lo, hi = spread
    width = hi - lo
    assert values.min() > lo - 0.04 * width and values.max() < hi + 0.04 * width
    assert values.min() < lo + 0.1 * width and values.max() > hi - 0.1 * width  # the whole range is used
    unchanged = views(colour(), 8, 50, only(jitter_p=1.0, brightness=0, contrast=0, saturation=0, hue=0))
    assert (unchanged == torch.tensor([150.0, 90, 45]).view(1, 3, 1, 1)).all()  # zero strengths: no op


@pipelines
def test_contrast_strength_sets_the_spread_around_the_mean(views):
    v = views(ramp(), 32, 300, only(jitter_p=1.0, brightness=0, saturation=0, hue=0, contrast=0.4,
                                    crop_scale=(1, 1), crop_ratio=(1, 1)))
    spread = v[:, 0].std(dim=(1, 2)) / torch.from_numpy(ramp()).float()[..., 0].std()
    assert 0.55 < spread.min() < 0.68 and 1.32 < spread.max() < 1.45


@pipelines
@pytest.mark.parametrize("field", ["jitter_p", "grayscale_p", "solarize_p", "flip_p"])
def test_each_probability_sets_its_frequency(views, field):
    n, p = 1000, 0.3
    v = views(ramp(), 32, n, only(**{field: p, "crop_scale": (1, 1), "crop_ratio": (1, 1)}))
    base = torch.from_numpy(ramp()).permute(2, 0, 1).float()
    happened = {
        "jitter_p": (v - base).abs().amax(dim=(1, 2, 3)) > 2,
        "grayscale_p": torch.zeros(n, dtype=torch.bool),  # the ramp is gray: judged on a colour below
        "solarize_p": v.amax(dim=(1, 2, 3)) < 128,  # every level of 40..160 >= 128 inverted
        "flip_p": v[:, 0, :, 0].mean(1) > v[:, 0, :, -1].mean(1),
    }[field]
    if field == "grayscale_p":
        c = views(colour(), 8, n, only(grayscale_p=p)).mean(dim=(2, 3))
        happened = (c.max(1).values - c.min(1).values) < 1
    assert abs(happened.float().mean() - p) < 4 * math.sqrt(p * (1 - p) / n)


@pipelines
def test_blur_probability_and_sigma_set_how_blurred_views_are(views):
    noise = np.stack([np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)] * 3, axis=-1)

    def sharpness(v):
        g = v.mean(1)
        return (g[:, :, 1:] - g[:, :, :-1]).abs().mean(dim=(1, 2))

    crop = dict(crop_scale=(1, 1), crop_ratio=(1, 1))
    sharp = sharpness(views(noise, 32, 50, only(**crop)))
    light = sharpness(views(noise, 32, 50, only(blur_p=1.0, blur_sigma=(0.5, 0.5), **crop)))
    heavy = sharpness(views(noise, 32, 50, only(blur_p=1.0, blur_sigma=(2.0, 2.0), **crop)))
    assert heavy.max() < 0.3 * light.min() and light.max() < 0.9 * sharp.min()
    half = sharpness(views(noise, 32, 1000, only(blur_p=0.3, blur_sigma=(2.0, 2.0), **crop)))
    assert abs((half < 0.5 * sharp.min()).float().mean() - 0.3) < 4 * math.sqrt(0.21 / 1000)


@pipelines
def test_the_second_view_follows_view2(views):
    settings = only(view2={"grayscale_p": 1.0, "flip_p": 1.0})
    first, second = (views(colour(), 8, 20, settings, view=v).mean(dim=(2, 3)) for v in (0, 1))
    assert (first.max(1).values - first.min(1).values > 100).all()  # colour kept
    assert (second.max(1).values - second.min(1).values < 1).all()  # always gray


def test_device_batches_give_keys_the_second_views_settings():
    images = torch.randint(0, 256, (8, 3, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    decoded = Decoded(images, torch.tensor([[12, 12]] * 8), torch.zeros(8, dtype=torch.long), [])
    settings = only(view2={"grayscale_p": 1.0})
    source = ResidentBatches(decoded, [0] * 8, torch.device("cpu"), 12, seed=0, channels_last=False, augment=settings)
    q, k, _, _ = next(source(RunBatches(8, 4, 0, 1, seed=0, epochs=1)))
    k = k * source.augment.std + source.augment.mean
    q = q * source.augment.std + source.augment.mean
    assert torch.allclose(k, k[:, :1].expand_as(k), atol=1e-5) and not torch.allclose(q, q[:, :1].expand_as(q))
