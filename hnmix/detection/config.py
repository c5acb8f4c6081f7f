"""Settings of `hnmix convert` and `hnmix transfer-detect` (validated like every hnmix command)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hnmix.core.settings import Settings, setting

RECIPES = {"voc": ("c4",), "coco": ("c4-1x", "c4-2x", "fpn-1x", "fpn-2x")}
DEFAULT_RECIPE = {"voc": "c4", "coco": "c4-1x"}


def _exists(value: str | None, what: str) -> str | None:
    if value is not None and not Path(value).exists():
        raise ValueError(f"{what} not found: {value}")
    return value


class ConvertConfig(Settings):
    weights: str = setting(..., "hnmix checkpoint, hnmix backbone.pt, or official MoCo checkpoint", flags=("--weights", "-w"),
                          metavar="FILE")
    to: Literal["detectron2", "timm", "torchvision"] = Field(
        "detectron2", description="target format: detectron2 (.pkl + .yaml of config keys), timm or torchvision")
    output: str = setting(..., "file to write", flags=("--output", "-o"), metavar="FILE")
    arch: str | None = Field(None, description="architecture, when the weights file does not say it")

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str) -> str:
        return _exists(v, "weights file")

    @model_validator(mode="after")
    def _pkl_for_detectron2(self) -> ConvertConfig:
        if self.to == "detectron2" and not self.output.endswith(".pkl"):
            raise ValueError(f"detectron2 reads converted weights only from a .pkl file, got --output {self.output}")
        return self


class TransferDetectConfig(Settings):
    task: Literal["voc", "coco"] = setting(..., "voc: Faster R-CNN, VOC AP; coco: Mask R-CNN, COCO AP", argument=True,
                                         metavar="voc|coco")
    data: str | None = Field(None, description="dataset root: $DETECTRON2_DATASETS-style (VOC2007 and VOC2012, or "
                             "coco/), any VOC-layout folder, or a folder with annotations/instances_*.json")
    images: str | None = Field(None, description="coco: image folder of a COCO-json dataset")
    annotations: str | None = Field(None, description="coco: COCO json of --images")
    val_images: str | None = Field(None, description="coco: image folder of a separate validation set")
    val_annotations: str | None = Field(None, description="coco: COCO json of --val-images")
    weights: str = setting(..., flags=("--weights", "-w"), metavar="FILE", description="converted .pkl, hnmix/MoCo checkpoint (converted on the fly), a "
                         "detectron2 .pth, or 'none' for the random-init baseline")
    recipe: str | None = Field(None, description="voc: c4 (MoCo R50-C4 24k); coco: c4-1x, c4-2x, fpn-1x, fpn-2x "
                               "(default: c4 / c4-1x)")
    masks: bool | None = Field(None, description="coco: Mask R-CNN (segm AP) (default: when the json has masks)")
    iters: int | None = Field(None, ge=1, description="training iterations (LR steps scale along) "
                              "(default: the recipe's)")
    batch_size: int | None = Field(None, ge=1, description="images per iteration over all GPUs (default: 16)")
    lr: float | None = Field(None, gt=0, description="base LR (default: 0.02 x batch/16)")
    input_size: int | None = Field(None, ge=32, description="shorter image side for train and test, e.g. 128 for "
                                   "CPU checks (default: the recipe's multi-scale sizes)")
    smoke: bool = Field(False, description="tiny CPU-sized pipeline check (meaningless AP): 10 iters, batch 2, "
                        "128 px, 32 RoIs/image, 50 test proposals; explicit options and --set still win")
    num_gpus: int = Field(1, ge=1, description="GPUs (processes spawned by detectron2's launch)")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda when available")
    workers: int = Field(4, ge=0, description="data-loader workers per process")
    trials: int = Field(1, ge=1, description="repeat with seeds seed..seed+N-1 and report mean +- std")
    seed: int = Field(0, description="seed of the first trial")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="share of images held out for testing when the "
                                "dataset has no split")
    split_seed: int = Field(0, description="seed of the held-out split made when the dataset has none")
    output: str = setting("runs/detect", "run directory", flags=("--output", "-o"), metavar="DIR")
    resume: bool = Field(False, description="continue from the last checkpoint in --output")
    eval_only: bool = Field(False, description="evaluate --weights (or with --resume the last checkpoint) only")
    d2_sets: list[str] = setting([], "raw detectron2 config override KEY=VALUE, e.g. --d2 MODEL.RPN.POST_NMS_TOPK_TEST=100 "
                                 "(repeatable)", flags=("--d2",), metavar="KEY=VALUE")
    verbose: bool = setting(False, flags=("--verbose/--quiet",), description="show detectron2's log on the console (always in log.txt)")

    @field_validator("data", "images", "annotations", "val_images", "val_annotations")
    @classmethod
    def _paths_exist(cls, v: str | None, info) -> str | None:
        return _exists(v, info.field_name.replace("_", "-"))

    @field_validator("weights")
    @classmethod
    def _weights_exist(cls, v: str) -> str:
        return v if v.lower() == "none" else _exists(v, "weights file")

    @field_validator("d2_sets")
    @classmethod
    def _key_value(cls, v: list[str]) -> list[str]:
        for item in v:
            key, sep, _ = item.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"--set expects KEY=VALUE (detectron2 config key), got '{item}'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TransferDetectConfig:
        if self.recipe is not None and self.recipe not in RECIPES[self.task]:
            raise ValueError(f"recipe '{self.recipe}' is not one of {', '.join(RECIPES[self.task])} for {self.task}")
        coco_only = ("images", "annotations", "val_images", "val_annotations", "masks")
        if self.task == "voc":
            used = [f for f in coco_only if getattr(self, f) is not None]
            if used:
                raise ValueError(f"{used[0].replace('_', '-')} applies to coco only; voc takes --data")
            if self.data is None:
                raise ValueError("voc needs --data (a VOC root or any VOC-layout folder)")
        else:
            if self.data is None and (self.images is None or self.annotations is None):
                raise ValueError("coco needs --data ROOT, or --images DIR with --annotations FILE")
            if self.data is not None and (self.images or self.annotations):
                raise ValueError("pass either --data or --images/--annotations, not both")
            if (self.val_images is None) != (self.val_annotations is None):
                raise ValueError("--val-images and --val-annotations go together")
        if self.num_gpus > 1 and self.device == "cpu":
            raise ValueError("--num-gpus > 1 needs CUDA; drop --device cpu")
        return self

    @classmethod
    def unknown_setting_hint(cls, key: str) -> str | None:
        return "detectron2's own config keys go through --d2 KEY=VALUE" if key.split(".")[0].isupper() else None

    @property
    def recipe_name(self) -> str:
        return self.recipe or DEFAULT_RECIPE[self.task]

    @property
    def d2_overrides(self) -> list[tuple[str, str]]:
        return [(k.strip(), v.strip()) for k, _, v in (s.partition("=") for s in self.d2_sets)]
