"""Settings of `hnmix lineval`: the MoCo linear-classification protocol by default, every value overridable."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hnmix.core.settings import Settings, setting
from hnmix.data.demo import DEMO
from hnmix.data.folder import check_data_path


class LinevalConfig(Settings):
    weights: str = setting(..., flags=("--weights", "-w"), metavar="FILE", description="hnmix checkpoint (last.pt), hnmix backbone.pt, or official MoCo "
                         "checkpoint (state_dict with module.encoder_q. keys)")
    protocol: Literal["moco", "fast", "knn"] = Field(
        "moco", description="moco: the MoCo paper's linear protocol (frozen backbone, augmented images); fast: "
        "linear classifier on features extracted once without augmentation; knn: weighted kNN")
    # data
    data: str | None = Field(None, description="'demo' or a root holding train/ and val/ (or test/)")
    train: str | None = Field(None, description="training images (ImageFolder), instead of --data")
    val: str | None = Field(None, description="validation images (ImageFolder), instead of --data")
    image_size: int | None = Field(None, ge=8, description="crop size (default: the checkpoint's, else 224)")
    eval_transform: Literal["auto", "at-size", "resize-crop"] = Field(
        "auto", description="evaluation images (val; knn and fast: train too): at-size = short side to the crop "
        "size, centre crop; resize-crop = short side to 256/224 of it, centre crop; auto = what the run recorded "
        "(its config.yaml) when evaluated at its own size, else at-size up to 64 px, resize-crop above")
    min_scale: float = Field(0.08, gt=0, le=1, description="moco protocol: RandomResizedCrop's smallest area")
    workers: int = Field(8, ge=0, description="data-loader worker processes")
    # what W holds when it carries no config
    arch: str | None = Field(None, description="timm architecture of W (needed for backbone.pt / MoCo files)")
    cifar_stem: bool | None = Field(None, description="W has the 3x3 stride-1 CIFAR stem")
    # linear classifier (MoCo: lr 30, momentum 0.9, wd 0, batch 256, 100 epochs, x0.1 at 60 and 80)
    epochs: int = Field(100, ge=1, description="classifier training epochs (moco, fast)")
    batch_size: int = Field(256, ge=1, description="GLOBAL batch size")
    lr: float = Field(30.0, gt=0, description="base learning rate for batch 256; effective = lr x batch/256")
    sgd_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    wd: float = Field(0.0, ge=0, description="weight decay")
    schedule: list[int] = Field([60, 80], description="epochs at which the LR is multiplied by 0.1")
    eval_every: int = Field(1, ge=1, description="epochs between validation passes (the last epoch always)")
    # kNN
    knn_k: int = Field(200, ge=1, description="knn: neighbours")
    knn_t: float = Field(0.1, gt=0, description="knn: temperature of the exp(similarity / T) vote weights")
    # run
    precision: Literal["fp32", "bf16", "auto"] = Field("fp32", description="frozen forward precision: fp32 "
                                                       "as MoCo's protocol; bf16 (or auto = bf16 on GPU) when asked")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda when available")
    seed: int = Field(0, description="seed of the classifier init and data order")
    output: str | None = setting(None, flags=("--output", "-o"), metavar="DIR", description="run directory (default runs/lineval-PROTOCOL)")

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"weights file not found: {v}")
        return v

    @field_validator("data", "train", "val")
    @classmethod
    def _paths_exist(cls, v: str | None) -> str | None:
        return v if v is None else check_data_path(v)

    @model_validator(mode="after")
    def _consistent(self) -> LinevalConfig:
        if (self.train is None) != (self.val is None):
            raise ValueError("--train and --val go together")
        if self.data is None and self.train is None:
            raise ValueError("give --data DIR (holding train/ and val/) or --train DIR --val DIR")
        if self.data is not None and self.train is not None:
            raise ValueError("give either --data or --train/--val, not both")
        if self.train == DEMO or self.val == DEMO:
            raise ValueError("the demo dataset is --data demo")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output or f"runs/lineval-{self.protocol}")
