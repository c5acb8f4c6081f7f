"""The pipelines that turn images into normalised views on the device, by name (the --pipeline values).

A new pipeline is one module with a `PIPELINE = Pipeline(name, open)` (hnmix.data.pipelines.base) and its module
named here."""

from hnmix.data.pipelines import decode, pil, resident
from hnmix.data.pipelines.base import Pipeline

PIPELINES: dict[str, Pipeline] = {m.PIPELINE.name: m.PIPELINE for m in (resident, decode, pil)}
