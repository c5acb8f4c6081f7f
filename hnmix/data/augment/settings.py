"""Augmentation settings: one recipe per view, presets by name, validated before anything runs.

Both kinds of ops read these: hnmix.data.augment.pil (one image at a time, in loader workers) and
hnmix.data.augment.tensor (whole batches, on the device). Presets, each from its source:

- mocov2 (default): MoCo v2 `aug+`, facebookresearch/moco main_moco.py (`--aug-plus`).
- cifar: the MoCo CIFAR-10 demo, facebookresearch/moco colab/moco_cifar10_demo.ipynb (`train_transform`).
- byol: BYOL (Grill et al. 2020, arXiv:2006.07733, Table 6), asymmetric views; as facebookresearch/moco-v3
  main_moco.py (`augmentation1`, `augmentation2`).

A preset fills the fields the user did not set; the dumped model holds every resolved value, so a saved
config re-creates the run without the preset table (and loads again to the same settings).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_serializer,
    model_validator,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOLARIZE_THRESHOLD = 128  # on uint8 levels, as BYOL and PIL's ImageOps.solarize


class ViewAugment(BaseModel):
    """One view's augmentations, in the order they run: crop, colour jitter, grayscale, blur, solarise, flip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    crop_scale: tuple[float, float] = Field(
        (0.2, 1.0), description="RandomResizedCrop: range of the crop's area as a share of the image's (0 < lo <= hi <= 1)")
    crop_ratio: tuple[float, float] = Field(
        (3 / 4, 4 / 3), description="RandomResizedCrop: range of the crop's aspect ratio, width / height (0 < lo <= hi)")
    brightness: float = Field(0.4, ge=0, description="ColorJitter: brightness factor drawn from [max(0, 1 - b), 1 + b] "
                              "(0 = off)")
    contrast: float = Field(0.4, ge=0, description="ColorJitter: contrast factor drawn from [max(0, 1 - c), 1 + c] "
                            "(0 = off)")
    saturation: float = Field(0.4, ge=0, description="ColorJitter: saturation factor drawn from [max(0, 1 - s), 1 + s] "
                              "(0 = off)")
    hue: float = Field(0.1, ge=0, le=0.5, description="ColorJitter: hue shift drawn from [-h, h] turns (0 = off)")
    jitter_p: float = Field(0.8, ge=0, le=1, description="probability of the colour jitter (its four ops in a random "
                            "order)")
    grayscale_p: float = Field(0.2, ge=0, le=1, description="probability of turning the view grayscale")
    blur_p: float = Field(0.5, ge=0, le=1, description="probability of a Gaussian blur (PIL's ImageFilter.GaussianBlur, "
                          "as official MoCo)")
    blur_sigma: tuple[float, float] = Field(
        (0.1, 2.0), description="range of the blur's sigma in pixels of the output view (0 <= lo <= hi)")
    solarize_p: float = Field(0.0, ge=0, le=1, description=f"probability of solarising (levels >= "
                              f"{SOLARIZE_THRESHOLD} of 255 inverted, as BYOL)")
    flip_p: float = Field(0.5, ge=0, le=1, description="probability of a horizontal flip")

    @model_validator(mode="after")
    def _ranges(self) -> ViewAugment:
        (s_lo, s_hi), (r_lo, r_hi), (b_lo, b_hi) = self.crop_scale, self.crop_ratio, self.blur_sigma
        if not 0 < s_lo <= s_hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got ({s_lo}, {s_hi})")
        if not 0 < r_lo <= r_hi:
            raise ValueError(f"crop_ratio must satisfy 0 < lo <= hi, got ({r_lo}, {r_hi})")
        if not 0 <= b_lo <= b_hi:
            raise ValueError(f"blur_sigma must satisfy 0 <= lo <= hi, got ({b_lo}, {b_hi})")
        return self


VIEW_FIELDS = tuple(ViewAugment.model_fields)

# view 2's overrides: every ViewAugment field, optional (None = as view 1)
ViewOverride = create_model(
    "ViewOverride", __config__=ConfigDict(extra="forbid"),
    **{name: (field.annotation | None, Field(None, description=field.description))
       for name, field in ViewAugment.model_fields.items()},
)


class Preset(BaseModel):
    view1: dict[str, Any]  # fields that differ from ViewAugment's defaults (MoCo v2 aug+)
    view2: dict[str, Any] = {}  # view 2's fields that differ from view 1
    source: str


def mocov2() -> Preset:
    """MoCo v2 aug+: RandomResizedCrop(scale 0.2-1), ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2,
    PIL Gaussian blur sigma 0.1-2 p 0.5, flip. Source: facebookresearch/moco main_moco.py (--aug-plus)."""
    return Preset(view1={}, source="MoCo v2 aug+, facebookresearch/moco main_moco.py --aug-plus")


def cifar() -> Preset:
    """MoCo's CIFAR-10 demo: RandomResizedCrop(32) (default scale 0.08-1), flip, ColorJitter(0.4, 0.4, 0.4, 0.1)
    p 0.8, grayscale p 0.2, no blur. Source: facebookresearch/moco colab/moco_cifar10_demo.ipynb
    (train_transform; it normalises with CIFAR statistics, which are not an augmentation setting)."""
    return Preset(view1={"crop_scale": (0.08, 1.0), "blur_p": 0.0},
                  source="MoCo CIFAR-10 demo, facebookresearch/moco colab/moco_cifar10_demo.ipynb")


def byol() -> Preset:
    """BYOL's asymmetric views: RandomResizedCrop(scale 0.08-1), ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8,
    grayscale p 0.2, blur p 1.0 / 0.1, solarise p 0 / 0.2, flip. Source: Grill et al. 2020, BYOL
    (arXiv:2006.07733) Table 6; as facebookresearch/moco-v3 main_moco.py augmentation1 / augmentation2."""
    return Preset(view1={"crop_scale": (0.08, 1.0), "saturation": 0.2, "blur_p": 1.0},
                  view2={"blur_p": 0.1, "solarize_p": 0.2},
                  source="BYOL, arXiv:2006.07733 Table 6 (facebookresearch/moco-v3 main_moco.py)")


PRESETS = {make.__name__: make() for make in (mocov2, cifar, byol)}
PresetName = Literal["mocov2", "cifar", "byol"]


def _describe(err: dict, prefix: str) -> str:
    where = ".".join([prefix, *map(str, err["loc"])])
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


class AugmentSettings(ViewAugment):
    """View 1's settings (and view 2's, except where `view2` says otherwise), filled from a preset.

    Accepts a preset name alone (`AugmentSettings.model_validate("byol")`, `augment: byol` in YAML)."""

    preset: PresetName = Field("mocov2", description="fills every setting not given: " + "; ".join(
        f"{name}: {p.source}" for name, p in PRESETS.items()))
    view2: ViewOverride = Field(default_factory=ViewOverride, description="view 2's settings where they differ from "
                                "view 1 (BYOL-style asymmetric views); the preset's view-2 settings apply unless "
                                "given here (byol: blur_p 0.1, solarize_p 0.2)")

    @model_validator(mode="before")
    @classmethod
    def _fill_from_preset(cls, data: Any) -> Any:
        if isinstance(data, str):
            data = {"preset": data}
        if not isinstance(data, dict):
            return data
        name = data.get("preset", "mocov2")
        if name not in PRESETS:
            raise ValueError(f"unknown augmentation preset {name!r}; choose one of {', '.join(PRESETS)}")
        return {**PRESETS[name].view1, **data}

    @model_validator(mode="after")
    def _view2_valid(self) -> AugmentSettings:
        self.views()  # view 2's merged settings pass ViewAugment's checks too
        return self

    def views(self) -> tuple[ViewAugment, ViewAugment]:
        """The two views' resolved settings."""
        view1 = ViewAugment(**{name: getattr(self, name) for name in VIEW_FIELDS})
        overrides = {**PRESETS[self.preset].view2, **self.view2.model_dump(exclude_none=True)}
        try:
            view2 = ViewAugment(**{**view1.model_dump(), **overrides})
        except ValidationError as e:
            raise ValueError("; ".join(_describe(err, "view2") for err in e.errors())) from None
        return view1, view2

    @field_serializer("view2")
    def _dump_view2(self, view2) -> dict[str, Any]:
        """View 2's fields that differ from view 1, and every field the preset sets for view 2: loading the
        dump gives the same views, and a later change of a view-1 field still reaches view 2."""
        view1, resolved = self.views()
        keep = set(PRESETS[self.preset].view2)
        return {name: value for name, value in resolved.model_dump().items()
                if name in keep or value != getattr(view1, name)}
