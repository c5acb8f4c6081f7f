"""Settings of `hnmix analyze`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hnmix.core.settings import Settings, setting
from hnmix.data.demo import DEMO
from hnmix.data.folder import check_data_path

HELD_OUT = "held-out"  # the split lineval and the kNN monitor evaluate on: val/, else test/

METRICS = ("uniformity", "alignment", "false-negatives", "hardness", "proxy-accuracy", "separation")
NEEDS_LABELS = ("false-negatives", "separation")


class AnalyzeConfig(Settings):
    metric: Literal["uniformity", "alignment", "false-negatives", "hardness", "proxy-accuracy", "separation",
                    "all"] = setting(..., "what to measure; all = every metric", argument=True, metavar="METRIC")
    weights: list[str] = setting(..., flags=("--weights", "-w"), metavar="FILE", min_length=1, description="weights files to compare (hnmix checkpoint, "
                               "backbone.pt, official MoCo checkpoint); one plot series each")
    data: str = Field(..., description="'demo', an ImageFolder root, a root holding SPLIT/, or a flat folder")
    split: str = Field(HELD_OUT, description="split of --data to use when it holds split folders; held-out = val/, "
                       "else test/ (what lineval and the kNN monitor hold out); demo: train or val")
    features: Literal["head", "backbone"] = Field(
        "head", description="head: L2-normalised projection-head output (what the loss sees); backbone: the "
        "L2-normalised pooled backbone features")
    arch: str | None = Field(None, description="timm architecture, for weights files that do not say it")
    cifar_stem: bool | None = Field(None, description="the weights have the CIFAR stem (files without config)")
    image_size: int | None = Field(None, ge=8, description="crop size (default: the checkpoint's, else 224)")
    eval_transform: Literal["auto", "at-size", "resize-crop"] = Field(
        "auto", description="the center-cropped view (uniformity, separation, class alignment): at-size = short "
        "side to the crop size; resize-crop = to 256/224 of it; auto = what the run recorded at its own size, "
        "else at-size up to 64 px (as lineval)")
    max_images: int = Field(10000, ge=2, description="analyse a fixed random subset of at most this many images")
    # metric parameters
    t: float = Field(2.0, gt=0, description="uniformity temperature t")
    alpha: float = Field(2.0, gt=0, description="alignment exponent alpha")
    top_k: int = Field(1024, ge=1, description="false-negatives / hardness: the k highest memory logits")
    temperature: float | None = Field(None, gt=0, description="softmax temperature for hardness (default: the "
                                      "checkpoint's, else 0.2)")
    memory: Literal["auto", "queue", "dataset"] = Field(
        "auto", description="negatives: the checkpoint's queue, or keys of the analysed images (the query's own "
        "key excluded); auto = the queue when there is one (false negatives: when its labels are known)")
    n_hard: int | None = Field(None, ge=2, description="MoCHi N for synthetic points (default: the checkpoint's "
                               "when it trained MoCHi, else 1024)")
    s: int | None = Field(None, ge=0, description="MoCHi s (default: the checkpoint's, else 1024)")
    s_prime: int | None = Field(None, ge=0, description="MoCHi s' (default: the checkpoint's, else 128)")
    # run
    batch_size: int = Field(256, ge=1, description="images per forward pass")
    workers: int = Field(8, ge=0, description="data-loader worker processes")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda when available")
    precision: Literal["auto", "bf16", "fp32"] = Field("fp32", description="forward precision (fp32: metrics "
                                                       "compare exactly across runs)")
    seed: int = Field(0, description="seed of the image subset, augmentations and MoCHi draws")
    output: str = setting("runs/analyze", flags=("--output", "-o"), metavar="DIR", description="directory for analysis.json and the plots")

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: list[str]) -> list[str]:
        missing = [w for w in v if not Path(w).is_file()]
        if missing:
            raise ValueError(f"weights file not found: {', '.join(missing)}")
        return v

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: str) -> str:
        return check_data_path(v)

    @model_validator(mode="after")
    def _demo_split(self) -> AnalyzeConfig:
        if self.data == DEMO and self.split not in ("train", "val", HELD_OUT):
            raise ValueError(f"the demo dataset has the splits train and val, not '{self.split}'")
        return self

    @property
    def metrics(self) -> tuple[str, ...]:
        return METRICS if self.metric == "all" else (self.metric,)
