"""`hnmix bench`: the pretraining step's speed (run.py), against a bare MoCo-v2 step of the same model."""

from hnmix.bench.run import bench, run_bench

__all__ = ["bench", "run_bench"]
