"""Pretraining and benchmark settings: the single source of truth for every option of `hnmix pretrain` and
`hnmix bench` - default, help, flags, checks (see hnmix.core.settings). Each hard-negative method brings
its own section (hnmix.negatives.METHODS): `mochi: {n_hard, s, s_prime, start_epoch}`, ...

Precedence: field defaults < `--config FILE.yaml` < flags < `--set key=value` (`--set mochi.s=512`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, create_model, field_validator, model_validator

from hnmix.core.settings import Settings, dotted, setting, setting_names
from hnmix.data.augment.settings import AugmentSettings
from hnmix.data.demo import DEMO
from hnmix.data.folder import check_data_path
from hnmix.errors import HnmixError
from hnmix.negatives import METHODS, MOCO, Method

DATA, MODEL, HN, OPTIM, RUN = "Data", "Model", "Hard negatives", "Optimisation", "Run directory and devices"
AUGMENT = "Augmentations (--augment-preset fills what is not given; --augment-view2-* for the second view)"


@dataclass(frozen=True)
class BatchNorm:
    """--bn, parsed: the mode, and G of split:G (1 otherwise). The one reader of the flag's text."""

    mode: Literal["auto", "shuffle", "split", "sync", "plain"]
    groups: int = 1

    @classmethod
    def parse(cls, text: str) -> BatchNorm:
        if text in ("auto", "shuffle", "sync", "plain"):
            return cls(text)
        if split := re.fullmatch(r"split:([1-9]\d*)", text):
            return cls("split", int(split[1]))
        raise ValueError(f"'{text}' is not one of shuffle, split:G (G >= 1), sync, plain, auto")

    def __str__(self) -> str:
        return f"split:{self.groups}" if self.mode == "split" else self.mode

    def resolve(self, world: int, local_batch: int) -> BatchNorm:
        """auto = shuffle BN across ranks, or on one process its split-BN emulation with sub-batches of at
        least 32 (MoCo's 256 images over 8 GPUs) and at most 8 of them."""
        if self.mode != "auto":
            return self
        if world > 1:
            return BatchNorm("shuffle")
        return BatchNorm("split", max([g for g in range(1, 9) if local_batch % g == 0 and local_batch // g >= 32]
                                      or [1]))

    @property
    def shuffles_keys(self) -> bool:
        """Whether the key encoder sees a permuted batch (shuffle BN, or its split-BN emulation)."""
        return self.mode == "shuffle" or self.groups > 1


class PretrainBase(Settings):
    # data
    data: str = setting(DEMO, "ImageFolder root, a root holding train/, a flat folder of images (searched "
                        "recursively), or 'demo' for the built-in dataset", metavar="DIR", panel=DATA)
    image_size: int = setting(224, "crop size in pixels", ge=8, panel=DATA)
    workers: int = setting(8, "data-loader worker processes per rank", ge=0, panel=DATA, resume="free")
    pipeline: Literal["auto", "resident", "decode", "pil"] = setting(
        "auto", "how images become views: resident = decoded once (cached on disk), held on the device, "
        "augmented there in whole batches; decode = workers read JPEG bytes, the device decodes and augments "
        "each batch; pil = DataLoader workers decode and augment with PIL. auto = resident for small images "
        "that fit a quarter of a CUDA device's memory, decode for JPEG photos on CUDA, pil otherwise; the "
        "choice is saved in config.yaml and kept by a resumed run (--data-on-gpu on/off: hnmix 0.1's names for "
        "resident/pil)", flags=("--pipeline", "--data-on-gpu"), panel=DATA,
        resume="free")
    skip_corrupt: bool = setting(False, "replace unreadable images by the next one (counted) instead of stopping",
                                 panel=DATA, resume="free")
    augment: AugmentSettings = Field(default_factory=AugmentSettings, description=AUGMENT,
                                     json_schema_extra={"panel": AUGMENT})
    # model
    arch: str = setting("resnet50", "any timm model name", panel=MODEL)
    cifar_stem: bool = setting(False, "3x3 stride-1 stem without max-pool, for 32 px images", panel=MODEL)
    zero_init_residual: bool = setting(False, "start the last BN of each residual branch at weight 0 (timm's "
                                       "ResNet init); off by default: torchvision's init, which official MoCo "
                                       "uses", panel=MODEL, resume="free")  # it only shapes step 0
    dim: int = setting(128, "embedding dimension", ge=1, panel=MODEL)
    mlp: bool = setting(True, "2-layer MLP projection head (MoCo-v2)", panel=MODEL)
    queue_size: int = setting(65536, "K, the number of queued negatives", flags=("--queue-size", "-K"), ge=1,
                              panel=MODEL)
    momentum: float = setting(0.999, "key-encoder EMA momentum m", ge=0, le=1, panel=MODEL)
    temperature: float = setting(0.2, "softmax temperature T", gt=0, panel=MODEL)
    symmetric: bool = setting(False, "symmetric loss: each view is also the query of the other's key, both keys "
                              "are enqueued (MoCo's CIFAR-10 demo, lightly); twice the encoder passes per step",
                              panel=MODEL)
    bn: str = setting("auto", "batch-norm mode: shuffle (DDP, as MoCo), split:G (G sub-batches on one device, "
                      "emulates shuffle BN), sync, plain; auto = shuffle with several ranks, with one split:G, G "
                      "<= 8 sub-batches of >= 32", metavar="MODE", panel=MODEL)
    # hard negatives (their own options: one section per method)
    method: str = setting(MOCO, "moco = MoCo-v2; " + "; ".join(f"{m.name} = {m.summary}" for m in METHODS.values()),
                          metavar="|".join((MOCO, *METHODS)), panel=HN)
    oracle_labels: bool = setting(False, "remove same-class queue negatives from each query's loss and from "
                                  "synthesis (needs labelled data: an upper bound, not self-supervised)", panel=HN)
    # optimisation
    epochs: int = setting(200, "training epochs", ge=1, panel=OPTIM)
    max_steps: int | None = setting(None, "stop after this many steps (schedule shortened to match)", ge=1,
                                    panel=OPTIM)
    batch_size: int = setting(256, "GLOBAL batch size over all ranks", ge=1, panel=OPTIM)
    lr: float = setting(0.03, "base learning rate for batch 256; effective = lr x batch/256", gt=0, panel=OPTIM)
    wd: float = setting(1e-4, "weight decay", ge=0, panel=OPTIM)
    sgd_momentum: float = setting(0.9, "SGD momentum", ge=0, lt=1, panel=OPTIM)
    cos: bool = setting(True, "cosine learning-rate schedule (else x0.1 at --schedule epochs)", panel=OPTIM)
    schedule: list[int] = setting([120, 160], "epochs of the x0.1 steps when --no-cos", metavar="E1,E2,...",
                                  panel=OPTIM)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = setting(
        "auto", "autocast precision; auto = bf16 on GPU, fp32 on CPU", panel=OPTIM)
    channels_last: bool = setting(True, "channels-last memory format for conv nets", panel=OPTIM,
                                  resume="free")
    compile: bool = setting(False, "torch.compile the two encoders in place (checkpoint keys unchanged): fused "
                            "kernels, split BN as grouped statistics; the first steps compile (tens of seconds, "
                            "minutes on a CPU; printed). Pays off for small models: docs/benchmarks.md", panel=OPTIM,
                            resume="free")
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = setting(
        "default", "torch.compile mode: reduce-overhead also replays each encoder pass as a CUDA graph (no "
        "launch cost: the lever for small models, at the price of memory for static buffers)", panel=OPTIM,
        resume="free")
    seed: int = setting(0, "seed of data order, augmentations and synthetic draws", panel=OPTIM)
    # run directory and devices
    device: Literal["auto", "cuda", "cpu"] = setting("auto", "auto = cuda when available", panel=RUN, resume="free")
    output: str = setting("runs/pretrain", "run directory", flags=("--output", "-o"), metavar="DIR", panel=RUN,
                         resume="free")
    resume: str | None = setting(None, "'auto' (last.pt in --output, if any) or a checkpoint path",
                                 metavar="auto|FILE", panel=RUN, resume="free")
    allow_change: list[str] = setting(
        [], "on --resume, let this setting of the experiment (not marked free) differ from the checkpoint's: a "
        "name as --set takes it (epochs, mochi.s, augment); repeatable. Recorded in history.jsonl; config.yaml "
        "keeps the original; compare marks the run", metavar="KEY", panel=RUN, resume="free")
    save_every: int = setting(0, "also checkpoint every this many steps (0 = each epoch end only)", ge=0,
                              panel=RUN, resume="free")
    keep_every: int = setting(0, "keep a copy epoch_NNNN.pt every this many epochs (0 = none)", ge=0, panel=RUN,
                              resume="free")
    log_every: int = setting(10, "steps between metric read-backs (metrics.jsonl, TensorBoard)", ge=1, panel=RUN,
                             resume="free")
    knn_every: int = setting(0, "run the kNN monitor every this many epochs (0 = off)", ge=0, panel=RUN,
                             resume="free")
    knn_data: str | None = setting(None, "kNN monitor data: 'demo' or a root holding train/ (bank) and val/ "
                                   "(queries); default: --data", metavar="DIR", panel=RUN, resume="free")
    eval_transform: Literal["auto", "at-size", "resize-crop"] = setting(
        "auto", "how the kNN monitor, lineval and analyze see an image of this run: at-size = short side to "
        "--image-size and centre crop (images already that size unchanged: MoCo's CIFAR-10 demo, solo-learn); "
        "resize-crop = short side to 256/224 of it, centre crop (MoCo's ImageNet validation); auto = at-size up "
        "to 64 px, else resize-crop. config.yaml records the choice", panel=RUN)

    @model_validator(mode="before")
    @classmethod
    def _resolve_eval_transform(cls, data):
        """auto -> the choice for this image size, so config.yaml and checkpoints name what was used."""
        if isinstance(data, dict) and data.get("eval_transform", "auto") == "auto":
            from hnmix.data.labelled import choose_eval_transform

            size = data.get("image_size", cls.model_fields["image_size"].default)
            if isinstance(size, int):  # a bad value is reported by the field's own check
                data = {**data, "eval_transform": choose_eval_transform(size)}
        return data

    @field_validator("data", "knn_data")
    @classmethod
    def _data_exists(cls, v: str | None) -> str | None:
        return v if v is None else check_data_path(v)

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
        if v != MOCO and v not in METHODS:
            raise ValueError(f"unknown method '{v}' (choose from {', '.join((MOCO, *METHODS))})")
        return v

    @field_validator("bn")
    @classmethod
    def _bn_mode(cls, v: str) -> str:
        return str(BatchNorm.parse(v))

    @field_validator("pipeline", mode="before")
    @classmethod
    def _legacy_on_off(cls, v):
        """hnmix 0.1's data_on_gpu on/off (which YAML reads as booleans) name resident/pil."""
        return {True: "resident", False: "pil", "on": "resident", "off": "pil"}.get(v, v)

    @field_validator("allow_change")
    @classmethod
    def _allow_change_known(cls, v: list[str]) -> list[str]:
        names, renamed, keys = setting_names(cls), cls.renamed(), []
        for key in (key.strip().replace("-", "_") for key in v):
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                raise ValueError(f"unknown setting '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
            # a flat name as the flag reads (--s, --synco-counts) allows the setting it names (mochi.s, ...)
            keys += [dotted(path) for path in renamed.get((key,), ((key,),))]
        return keys

    @field_validator("resume")
    @classmethod
    def _resume_exists(cls, v: str | None) -> str | None:
        from pathlib import Path

        if v not in (None, "auto") and not Path(v).is_file():
            raise ValueError(f"checkpoint not found: {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        keys = self.batch_size * (2 if self.symmetric else 1)  # keys enqueued per step
        if self.queue_size % keys:
            raise ValueError(f"--queue-size K={self.queue_size} must be a multiple of the global batch size "
                             f"{self.batch_size} (--batch-size)" + (", twice it with --symmetric" if self.symmetric else ""))
        if self.batch_size % self.batch_norm.groups:
            raise ValueError(f"--batch-size {self.batch_size} does not split into {self.batch_norm.groups} BN groups")
        if (options := self.method_settings) is not None:
            options.check(self.queue_size)
        return self

    @property
    def batch_norm(self) -> BatchNorm:
        """--bn as typed (auto not yet resolved: that needs the world size, BatchNorm.resolve)."""
        return BatchNorm.parse(self.bn)

    @property
    def method_settings(self):
        """The selected method's section (None for plain MoCo-v2)."""
        return getattr(self, self.method) if self.method != MOCO else None

    def describe_method(self) -> str:
        options = self.method_settings
        text = self.method + (f" ({options.describe()})" if options is not None else "")
        return text + (" + label oracle" if self.oracle_labels else "")

    def to_yaml_dict(self) -> dict:
        """Every setting, but only the selected method's section (the others are unused defaults)."""
        return self.experiment(self.model_dump(mode="json"))

    @staticmethod
    def experiment(values: dict) -> dict:
        """Saved settings without the sections of the methods they did not select."""
        return {k: v for k, v in values.items() if k not in METHODS or k == values.get("method")}

    @classmethod
    def renamed(cls) -> dict[tuple[str, ...], tuple[tuple[str, ...], ...]]:
        """Settings of hnmix <= 0.1.0 (flat method options) -> their sections; old config.yaml files load."""
        old = {("n_hard",): (("mochi", "n_hard"), ("synco", "n_hard")), ("s",): (("mochi", "s"),),
               ("data_on_gpu",): (("pipeline",),),
               ("s_prime",): (("mochi", "s_prime"),), ("mochi_start_epoch",): (("mochi", "start_epoch"),)}
        for name in ("counts", "sigma", "delta", "eta", "start_epoch"):
            old[(f"synco_{name}",)] = (("synco", name),)
        for name in ("outer", "inner", "anneal", "anneal_epochs"):
            old[(f"ring_{name}",)] = (("ring", name),)
        return {k: v for k, v in old.items() if all(p[0] in cls.model_fields for p in v)}


def with_methods(base: type[Settings], methods: dict[str, Method], name: str) -> type[Settings]:
    """`base` plus one nested section per method, named after it (its options' help panel: the method's)."""
    sections = {m.name: (m.settings, Field(default_factory=m.settings, description=m.title,
                                           json_schema_extra={"panel": m.title}))
                for m in methods.values()}
    return create_model(name, __base__=base, __module__=__name__, **sections)


PretrainConfig = with_methods(PretrainBase, METHODS, "PretrainConfig")

SYNTHETIC = "synthetic"
BENCH = "Timing"


class BenchBase(PretrainBase):
    """`hnmix bench`: a pretraining configuration plus how to time its step."""

    data: str = setting(SYNTHETIC, "'synthetic' (random views already on the device: the compute ceiling), "
                        "'demo', or an image folder (as pretrain --data)", metavar="DIR", panel=DATA)
    steps: int = setting(20, "timed steps per repeat", ge=1, panel=BENCH)
    warmup: int = setting(5, "untimed steps first (allocator, cuDNN autotuning, loader start)", ge=0, panel=BENCH)
    repeats: int = setting(1, "timed blocks; the median is reported (for noisy, shared machines)", ge=1,
                           panel=BENCH)
    ceiling: bool = setting(True, "with a dataset, also time synthetic views: the compute ceiling", panel=BENCH)
    bare: bool = setting(True, "also time the bare MoCo-v2 step of the same model (share_of_bare)", panel=BENCH)
    profile: bool = setting(False, "also list the step's top operators by device time (CUDA) or CPU time",
                            flags=("--profile",), panel=BENCH)
    mochi_naive: bool = setting(False, "MoCHi in the naive form (materialised (B, s, D) points), to measure what "
                                "the fused form saves", flags=("--mochi-naive/--mochi-fused",), panel=BENCH)

    @field_validator("data")
    @classmethod
    def _data_exists(cls, v: str) -> str:
        return v if v == SYNTHETIC else check_data_path(v)

    @model_validator(mode="after")
    def _naive_is_mochi(self):
        if self.mochi_naive and self.method != "mochi":
            raise ValueError("--mochi-naive needs --method mochi")
        return self


BenchConfig = with_methods(BenchBase, METHODS, "BenchConfig")
