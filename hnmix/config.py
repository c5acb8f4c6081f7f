"""Pydantic settings: the single source of truth for every option, its default, its help and its checks.

Precedence: field defaults < ``--config FILE.yaml`` < explicit CLI flags < ``--set key=value``.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hnmix.data.demo import DEMO
from hnmix.errors import HnmixError


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def save_yaml(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def _check_data_path(value: str) -> str:
    if value != DEMO and not Path(value).exists():
        raise ValueError(f"data path does not exist: {value}")
    return value


class PretrainConfig(Settings):
    # data
    data: str = Field(DEMO, description="ImageFolder root, a root holding train/, a flat folder of images "
                      "(searched recursively), or 'demo' for the built-in dataset")
    image_size: int = Field(224, ge=8, description="crop size in pixels")
    workers: int = Field(8, ge=0, description="data-loader worker processes per rank")
    data_on_gpu: Literal["auto", "on", "off"] = Field(
        "auto", description="decode the dataset once (cached on disk), hold it on the device and augment whole "
        "batches there, without loader workers; auto = on for a CUDA device when the images are <= 256 px and "
        "fit a quarter of its memory")
    skip_corrupt: bool = Field(False, description="replace unreadable images by the next one (counted) "
                               "instead of stopping")
    # model
    arch: str = Field("resnet50", description="any timm model name")
    cifar_stem: bool = Field(False, description="3x3 stride-1 stem without max-pool, for 32 px images")
    zero_init_residual: bool = Field(True, description="start the last BN of each residual branch at weight 0 "
                                     "(timm's ResNet init); false = torchvision's init, which official MoCo uses")
    dim: int = Field(128, ge=1, description="embedding dimension")
    mlp: bool = Field(True, description="2-layer MLP projection head (MoCo-v2)")
    queue_size: int = Field(65536, ge=1, description="K, the number of queued negatives")
    momentum: float = Field(0.999, ge=0, le=1, description="key-encoder EMA momentum m")
    temperature: float = Field(0.2, gt=0, description="softmax temperature T")
    bn: str = Field("auto", description="batch-norm mode: shuffle (DDP, as MoCo), split:G (G sub-batches on "
                    "one device, emulates shuffle BN), sync, plain; auto = shuffle with several ranks, "
                    "with one split:G, G <= 8 sub-batches of >= 32")
    # hard negatives (hnmix.negatives; docs/methods.md)
    method: str = Field("moco", description="moco (MoCo-v2), mochi (hard negative mixing), synco (six synthetic "
                        "kinds), ring (conditional negative sampling)")
    n_hard: int = Field(1024, ge=1, description="N: hardest queue negatives to synthesise from (mochi, synco)")
    s: int = Field(1024, ge=0, description="MoCHi s: mixes of two hard negatives per query (under torchrun, "
                   "whose parser takes --s for its own, write --mochi-s)")
    s_prime: int = Field(128, ge=0, description="MoCHi s': mixes of the query with a hard negative")
    mochi_start_epoch: int = Field(0, ge=0, description="MoCHi: first epoch (0-based) with synthetic negatives")
    synco_counts: list[int] = Field([256, 256, 256, 64, 64, 64], description="SynCo: points per query of each "
                                    "kind: interpolation, extrapolation, mixup, noise, gradient, adversarial "
                                    "(0 switches one off)")
    synco_sigma: float = Field(0.01, ge=0, description="SynCo: noise scale of kind 4")
    synco_delta: float = Field(0.01, ge=0, description="SynCo: gradient step of kind 5")
    synco_eta: float = Field(0.01, ge=0, description="SynCo: adversarial step of kind 6")
    synco_start_epoch: int = Field(10, ge=0, description="SynCo: first epoch (0-based) with synthetic negatives")
    ring_outer: float = Field(0.1, gt=0, le=1, description="Ring: share of the queue (hardest first) in the ring")
    ring_inner: float = Field(0.1, ge=0, lt=1, description="Ring: share of the ring's hardest dropped as likely "
                              "false negatives")
    ring_anneal: Literal["none", "linear", "step", "exp"] = Field(
        "linear", description="Ring: how the outer share shrinks from 1.0 to --ring-outer")
    ring_anneal_epochs: int = Field(100, ge=0, description="Ring: epochs over which the outer share anneals")
    oracle_labels: bool = Field(False, description="remove same-class queue negatives from each query's loss and "
                                "from synthesis (needs labelled data: an upper bound, not self-supervised)")
    # optimisation
    epochs: int = Field(200, ge=1, description="training epochs")
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (schedule shortened to match)")
    batch_size: int = Field(256, ge=1, description="GLOBAL batch size over all ranks")
    lr: float = Field(0.03, gt=0, description="base learning rate for batch 256; effective = lr x batch/256")
    wd: float = Field(1e-4, ge=0, description="weight decay")
    sgd_momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    cos: bool = Field(True, description="cosine learning-rate schedule (else x0.1 at --schedule epochs)")
    schedule: list[int] = Field([120, 160], description="epochs of the x0.1 steps when --no-cos")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="autocast precision; auto = bf16 on GPU, fp32 on CPU")
    channels_last: bool = Field(True, description="channels-last memory format for conv nets")
    compile: bool = Field(False, description="torch.compile the two encoders in place (checkpoint keys "
                          "unchanged); the first steps compile (tens of seconds, longer on a CPU)")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda when available")
    seed: int = Field(0, description="seed of data order, augmentations and synthetic draws")
    # run directory
    output: str = Field("runs/pretrain", description="run directory")
    resume: str | None = Field(None, description="'auto' (last.pt in --output, if any) or a checkpoint path")
    save_every: int = Field(0, ge=0, description="also checkpoint every this many steps (0 = each epoch end only)")
    keep_every: int = Field(0, ge=0, description="keep a copy epoch_NNNN.pt every this many epochs (0 = none)")
    log_every: int = Field(10, ge=1, description="steps between metric read-backs (metrics.jsonl, TensorBoard)")
    knn_every: int = Field(0, ge=0, description="run the kNN monitor every this many epochs (0 = off)")
    knn_data: str | None = Field(None, description="kNN monitor data: 'demo' or a root holding train/ (bank) and "
                                 "val/ (queries); default: --data")

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: str) -> str:
        return _check_data_path(v)

    @field_validator("knn_data")
    @classmethod
    def _knn_data_exists(cls, v: str | None) -> str | None:
        return v if v is None else _check_data_path(v)

    @field_validator("arch")
    @classmethod
    def _arch_exists(cls, v: str) -> str:
        from hnmix.models.backbone import check_arch

        try:
            return check_arch(v)
        except HnmixError as e:
            raise ValueError(str(e)) from None

    @field_validator("method")
    @classmethod
    def _method_known(cls, v: str) -> str:
        from hnmix.negatives import METHODS

        if v not in METHODS:
            raise ValueError(f"unknown method '{v}' (choose from {', '.join(METHODS)})")
        return v

    @field_validator("synco_counts")
    @classmethod
    def _six_counts(cls, v: list[int]) -> list[int]:
        if len(v) != 6 or min(v) < 0:
            raise ValueError(f"needs six non-negative counts, got {v}")
        return v

    @field_validator("bn")
    @classmethod
    def _bn_mode(cls, v: str) -> str:
        if v in ("auto", "shuffle", "sync", "plain") or re.fullmatch(r"split:[1-9]\d*", v):
            return v
        raise ValueError(f"'{v}' is not one of shuffle, split:G (G >= 1), sync, plain, auto")

    @field_validator("data_on_gpu", mode="before")
    @classmethod
    def _yaml_on_off(cls, v):
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v  # YAML reads on/off as bools

    @field_validator("resume")
    @classmethod
    def _resume_exists(cls, v: str | None) -> str | None:
        if v not in (None, "auto") and not Path(v).is_file():
            raise ValueError(f"checkpoint not found: {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        if self.queue_size % self.batch_size:
            raise ValueError(f"queue_size K={self.queue_size} must be a multiple of the global batch size "
                             f"{self.batch_size}")
        if self.bn.startswith("split:") and self.batch_size % int(self.bn[6:]):
            raise ValueError(f"batch_size {self.batch_size} does not split into {self.bn[6:]} BN groups")
        synthetic = {"mochi": self.s + self.s_prime, "synco": sum(self.synco_counts)}.get(self.method, 0)
        if synthetic:
            if self.n_hard > self.queue_size:
                raise ValueError(f"N={self.n_hard} hardest negatives cannot exceed the queue size "
                                 f"K={self.queue_size}")
            if self.n_hard < 2:
                raise ValueError(f"synthetic negatives ({self.method}) need N >= 2, got N={self.n_hard}")
        return self

    @property
    def bn_splits(self) -> int | None:
        return int(self.bn[6:]) if self.bn.startswith("split:") else None


SYNTHETIC = "synthetic"


class BenchConfig(PretrainConfig):
    """`hnmix bench`: a pretraining configuration plus how to time its step."""

    data: str = Field(SYNTHETIC, description="'synthetic' (random views already on the device: the compute "
                      "ceiling), 'demo', or an image folder (as pretrain --data)")
    steps: int = Field(20, ge=1, description="timed steps per repeat")
    warmup: int = Field(5, ge=0, description="untimed steps first (allocator, cuDNN autotuning, loader start)")
    repeats: int = Field(1, ge=1, description="timed blocks; the median is reported (for noisy, shared machines)")
    ceiling: bool = Field(True, description="with a dataset, also time synthetic views: the compute ceiling")
    mochi_naive: bool = Field(False, description="MoCHi in the naive form (materialised (B, s, D) points), to "
                              "measure what the fused form saves")

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: str) -> str:
        return v if v == SYNTHETIC else _check_data_path(v)

    @model_validator(mode="after")
    def _naive_is_mochi(self) -> BenchConfig:
        if self.mochi_naive and self.method != "mochi":
            raise ValueError("--mochi-naive needs --method mochi")
        return self


# --------------------------------------------------------------------------------------------- loading


def parse_sets(sets: list[str]) -> dict:
    """``--set key=value`` pairs; values are parsed as YAML scalars/lists (``5``, ``true``, ``[1,2]``)."""
    out = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise HnmixError(f"--set expects key=value, got '{item}'")
        out[key.strip().replace("-", "_")] = yaml.safe_load(raw) if raw.strip() else None
    return out


def _check_keys(cls: type[Settings], values: dict, origin: str) -> None:
    fields = list(cls.model_fields)
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise HnmixError(f"{origin}: unknown setting '{key}'{hint}")


def load_config(cls: type[Settings], config_file: str | Path | None = None, overrides: dict | None = None,
                sets: list[str] | None = None) -> Settings:
    values: dict = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise HnmixError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise HnmixError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, dict):
            raise HnmixError(f"{path} must hold a mapping of settings")
        _check_keys(cls, loaded, str(path))
        values.update(loaded)
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    set_values = parse_sets(sets or [])
    _check_keys(cls, set_values, "--set")
    values.update(set_values)
    try:
        return cls(**values)
    except ValidationError as e:
        raise HnmixError(format_validation_error(e)) from None


def format_validation_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        where = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "invalid settings: " + "; ".join(parts)
