"""The pipelines that turn images into normalised views on the device, by name (the --pipeline values).

A new pipeline is one module with a `PIPELINE = Pipeline(name, open)` (hnmix.data.pipelines.base) and one
line here."""

from hnmix.data.pipelines import decode, pil, resident
from hnmix.data.pipelines.base import Pipeline

PIPELINES: dict[str, Pipeline] = {
    "resident": resident.PIPELINE,
    "decode": decode.PIPELINE,
    "pil": pil.PIPELINE,
}
