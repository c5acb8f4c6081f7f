"""hnmix: self-supervised visual pretraining with hard negatives."""

__version__ = "0.1.0"
