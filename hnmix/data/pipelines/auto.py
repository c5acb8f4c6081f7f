"""--pipeline auto: which pipeline suits a dataset and a device, from a quick look at the files."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hnmix.data.pipelines.decode import device_decode_refusal, jpeg_share
from hnmix.data.pipelines.resident import auto_refusal, largest_side_sample

MIN_JPEG_SHARE = 0.5  # below this, GPU decoding would leave most decoding to its few workers


class Choice(NamedTuple):
    name: str  # resident, decode or pil (hnmix.data.pipelines.PIPELINES)
    reason: str  # one line for the run's header


def choose_pipeline(images, device: torch.device, sample: int = 64) -> Choice:
    """auto's choice from headers and bytes of `sample` files: small images live on the device (resident),
    large JPEGs are decoded there per batch (decode), anything else (or no CUDA) goes to PIL workers (pil).

    resident is provisional: resident.auto_refusal on the decoded size may still refuse it (memory); then
    `after_resident` is next in line."""
    if device.type != "cuda":
        return Choice("pil", "PIL DataLoader workers: not a CUDA device")
    side = largest_side_sample(images, sample)
    too_large = auto_refusal(side, None, device)
    if too_large is None:
        return Choice("resident", f"device-resident data: images up to {side} px")
    if not hasattr(images, "paths"):
        return Choice("pil", f"PIL DataLoader workers: {too_large}, and not image files")
    share = jpeg_share(images, sample)
    if share < MIN_JPEG_SHARE:
        return Choice("pil", f"PIL DataLoader workers: {too_large}, and only {share:.0%} of sampled files "
                             "are baseline colour JPEGs")
    if why := device_decode_refusal(device):
        return Choice("pil", f"PIL DataLoader workers: {too_large}, and no JPEG decoding on {device} ({why})")
    return Choice("decode", f"GPU JPEG decoding: {too_large}; {share:.0%} of sampled files decode on the "
                            "device, the rest in the workers")


def after_resident(images, device: torch.device) -> str:
    """The pipeline when auto's resident choice declines once the data is decoded (too large for memory)."""
    return "decode" if hasattr(images, "paths") and not device_decode_refusal(device) else "pil"
