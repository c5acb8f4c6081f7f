"""The MoCo detection recipes as detectron2 configs, and the ROI head they need. Imports detectron2.

MoCo's ``detection/configs``: Faster/Mask R-CNN R50-C4 with BN in the backbone (SyncBN across GPUs),
an extra BN after res5 (Res5ROIHeadsExtraNorm), nothing frozen (FREEZE_AT 0), precise BN before
evaluation, batch 16 at LR 0.02. The FPN variant adds SyncBN to FPN and the box/mask heads (4conv1fc),
as detectron2's ``Misc/mask_rcnn_R_50_FPN_3x_syncbn.yaml``.
"""

from __future__ import annotations

import difflib
from typing import Any

from detectron2.config import CfgNode, get_cfg
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads

from hnmix.errors import HnmixError

_C4 = {
    "MODEL.RPN.PRE_NMS_TOPK_TEST": 6000, "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "Res5ROIHeadsExtraNorm",
}
_FPN = {
    "MODEL.BACKBONE.NAME": "build_resnet_fpn_backbone",
    "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.FPN.IN_FEATURES": ["res2", "res3", "res4", "res5"], "MODEL.FPN.NORM": "SyncBN",
    "MODEL.ANCHOR_GENERATOR.SIZES": [[32], [64], [128], [256], [512]],
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": [[0.5, 1.0, 2.0]],
    "MODEL.RPN.IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"],
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": 2000, "MODEL.RPN.PRE_NMS_TOPK_TEST": 1000,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 1000, "MODEL.RPN.POST_NMS_TOPK_TEST": 1000,
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads", "MODEL.ROI_HEADS.IN_FEATURES": ["p2", "p3", "p4", "p5"],
    "MODEL.ROI_BOX_HEAD.NAME": "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_CONV": 4,
    "MODEL.ROI_BOX_HEAD.NUM_FC": 1, "MODEL.ROI_BOX_HEAD.NORM": "SyncBN", "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": 7,
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NUM_CONV": 4,
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": 14, "MODEL.ROI_MASK_HEAD.NORM": "SyncBN",
}
_MOCO_BASE = {
    "MODEL.META_ARCHITECTURE": "GeneralizedRCNN", "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.NORM": "SyncBN", "MODEL.RESNETS.DEPTH": 50, "TEST.PRECISE_BN.ENABLED": True,
    "SOLVER.IMS_PER_BATCH": 16, "SOLVER.BASE_LR": 0.02,
}
_COCO_SIZES = (640, 672, 704, 736, 768, 800)
_COCO_1X = {"SOLVER.STEPS": (60000, 80000), "SOLVER.MAX_ITER": 90000}
_COCO_2X = {"SOLVER.STEPS": (120000, 160000), "SOLVER.MAX_ITER": 180000}
_COCO = {"INPUT.MIN_SIZE_TRAIN": _COCO_SIZES, "INPUT.MIN_SIZE_TEST": 800}

RECIPES: dict[tuple[str, str], dict[str, Any]] = {
    ("voc", "c4"): {**_MOCO_BASE, **_C4, "MODEL.MASK_ON": False,
                    "INPUT.MIN_SIZE_TRAIN": tuple(range(480, 801, 32)), "INPUT.MIN_SIZE_TEST": 800,
                    "SOLVER.STEPS": (18000, 22000), "SOLVER.MAX_ITER": 24000, "SOLVER.WARMUP_ITERS": 100},
    ("coco", "c4-1x"): {**_MOCO_BASE, **_C4, **_COCO, **_COCO_1X, "MODEL.MASK_ON": True},
    ("coco", "c4-2x"): {**_MOCO_BASE, **_C4, **_COCO, **_COCO_2X, "MODEL.MASK_ON": True},
    ("coco", "fpn-1x"): {**_MOCO_BASE, **_FPN, **_COCO, **_COCO_1X, "MODEL.MASK_ON": True},
    ("coco", "fpn-2x"): {**_MOCO_BASE, **_FPN, **_COCO, **_COCO_2X, "MODEL.MASK_ON": True},
}
# --smoke: the cost of R50-C4 is the res5 head run on every RoI (~0.8 GMAC each): few RoIs, few proposals
SMOKE = {"SOLVER.MAX_ITER": 10, "SOLVER.IMS_PER_BATCH": 2, "INPUT.MIN_SIZE_TRAIN": (128,),
         "INPUT.MIN_SIZE_TEST": 128, "INPUT.MAX_SIZE_TRAIN": 213, "INPUT.MAX_SIZE_TEST": 213,
         "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 32, "MODEL.RPN.POST_NMS_TOPK_TRAIN": 200,
         "MODEL.RPN.PRE_NMS_TOPK_TEST": 500, "MODEL.RPN.POST_NMS_TOPK_TEST": 50,
         "TEST.DETECTIONS_PER_IMAGE": 50, "SOLVER.WARMUP_ITERS": 0}
SYNC_NORMS = ("SyncBN", "naiveSyncBN", "nnSyncBN", "naiveSyncBN_N")


def _register_extra_norm_head() -> None:
    if "Res5ROIHeadsExtraNorm" in ROI_HEADS_REGISTRY:
        return

    @ROI_HEADS_REGISTRY.register()
    class Res5ROIHeadsExtraNorm(Res5ROIHeads):
        """Res5ROIHeads with a norm layer after res5, the "extra BN" of the MoCo paper's detection setup."""

        @classmethod
        def _build_res5_block(cls, cfg):
            res5, out_channels = super()._build_res5_block(cfg)
            res5.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
            return res5, out_channels


_register_extra_norm_head()


def set_key(cfg: CfgNode, key: str, value: Any) -> None:
    """Set a dotted detectron2 key, refusing unknown ones (with the closest existing key as a hint)."""
    *parents, leaf = key.split(".")
    node = cfg
    for i, p in enumerate(parents):
        if not isinstance(node, CfgNode) or p not in node:
            raise HnmixError(f"unknown detectron2 config key {key}{_hint(cfg, '.'.join(parents[: i + 1]))}")
        node = node[p]
    if not isinstance(node, CfgNode) or leaf not in node:
        raise HnmixError(f"unknown detectron2 config key {key}{_hint(cfg, key)}")
    node[leaf] = value


def _all_keys(node: CfgNode, prefix: str = "") -> list[str]:
    out = []
    for k, v in node.items():
        out += _all_keys(v, f"{prefix}{k}.") if isinstance(v, CfgNode) else [f"{prefix}{k}"]
    return out


def _hint(cfg: CfgNode, key: str) -> str:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def apply_overrides(cfg: CfgNode, pairs: list[tuple[str, str]]) -> None:
    """``--set KEY=VALUE`` with detectron2's own parsing (literal_eval, type checks)."""
    for key, raw in pairs:
        try:
            cfg.merge_from_list([key, raw])
        except (KeyError, AssertionError):
            raise HnmixError(f"--set {key}: unknown detectron2 config key{_hint(cfg, key)}") from None
        except ValueError as e:
            raise HnmixError(f"--set {key}={raw}: {e}") from None


def scaled_steps(steps: tuple[int, ...], recipe_iters: int, iters: int) -> tuple[int, ...]:
    """LR drops at the same fractions of a shortened (or lengthened) schedule."""
    return tuple(s for s in (round(s * iters / recipe_iters) for s in steps) if 0 < s < iters)


def build_detectron2_config(task: str, recipe: str, *, num_classes: int, train: list[str], test: list[str],
                            masks: bool, weights_path: str, weights_settings: dict[str, Any], output_dir: str,
                            seed: int, device: str, world_size: int, batch_size: int | None, lr: float | None,
                            iters: int | None, input_size: int | None, workers: int, smoke: bool = False,
                            overrides: list[tuple[str, str]]) -> tuple[CfgNode, list[str]]:
    """The full detectron2 config, and notes on what was adapted. Precedence:
    recipe < weights' input convention < --smoke < hnmix options < --set; then SyncBN -> BN on one process."""
    cfg, notes = get_cfg(), []
    base = RECIPES[(task, recipe)]
    for key, value in {**base, **weights_settings, **(SMOKE if smoke else {})}.items():
        set_key(cfg, key, value)
    if smoke and iters is None:
        iters = SMOKE["SOLVER.MAX_ITER"]
    if task == "coco":
        cfg.MODEL.MASK_ON = masks
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = tuple(train), tuple(test)
    cfg.MODEL.WEIGHTS = weights_path
    cfg.MODEL.DEVICE = device
    cfg.OUTPUT_DIR, cfg.SEED, cfg.DATALOADER.NUM_WORKERS = output_dir, seed, workers
    batch_size = batch_size or cfg.SOLVER.IMS_PER_BATCH
    cfg.SOLVER.IMS_PER_BATCH = batch_size
    cfg.SOLVER.BASE_LR = lr if lr is not None else base["SOLVER.BASE_LR"] * batch_size / 16
    if lr is None and batch_size != 16:
        notes.append(f"LR {cfg.SOLVER.BASE_LR:g} = 0.02 x {batch_size}/16 (linear scaling; --lr to override)")
    if iters is not None:
        cfg.SOLVER.STEPS = scaled_steps(tuple(base["SOLVER.STEPS"]), base["SOLVER.MAX_ITER"], iters)
        cfg.SOLVER.WARMUP_ITERS = min(cfg.SOLVER.WARMUP_ITERS, iters)
        cfg.SOLVER.MAX_ITER = iters
    # precise BN averages over 200 batches; a shorter run gets as many batches as it trained
    cfg.TEST.PRECISE_BN.NUM_ITER = min(cfg.TEST.PRECISE_BN.NUM_ITER, cfg.SOLVER.MAX_ITER)
    if input_size is not None:
        cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TEST = (input_size,), input_size
        cfg.INPUT.MAX_SIZE_TRAIN = cfg.INPUT.MAX_SIZE_TEST = round(input_size * 1333 / 800)
    apply_overrides(cfg, overrides)

    if world_size == 1:  # SyncBN needs several processes (and CUDA); on one process it is plain BN
        synced = [k for k in _all_keys(cfg) if k.endswith(".NORM") and _get(cfg, k) in SYNC_NORMS]
        for key in synced:
            set_key(cfg, key, "BN")
        if synced:
            notes.append(f"one process: SyncBN -> BN in {', '.join(k.removeprefix('MODEL.') for k in synced)}")
    if cfg.SOLVER.IMS_PER_BATCH % world_size:
        raise HnmixError(f"batch size {cfg.SOLVER.IMS_PER_BATCH} does not split over {world_size} GPUs")
    c4 = cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone"
    if c4 and cfg.MODEL.RESNETS.DEPTH < 50:
        raise HnmixError(f"the C4 recipes need a bottleneck ResNet (depth >= 50); these weights are "
                         f"R{cfg.MODEL.RESNETS.DEPTH}: use --recipe fpn-1x (coco)")
    return cfg, notes


def _get(cfg: CfgNode, key: str) -> Any:
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node
