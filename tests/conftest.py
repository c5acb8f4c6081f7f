"""Shared fixtures: tiny image folders made on the fly, and a runner for the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
# the smallest settings that still exercise every part of a pretraining run
TINY = ["--arch", "test_resnet", "--image-size", "16", "--batch-size", "8", "--queue-size", "32",
        "--dim", "16", "--workers", "0", "--set", "log_every=1"]


def write_images(root: Path, n: int, classes: list[str] | None = None, size: int = 20, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / classes[i % len(classes)] if classes else root
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"img{i:04d}.jpg")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return write_images(tmp_path / "data", 32, classes=["a", "b"])


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # decoded datasets and PIL's colour tables go to a cache of this test session, not the user's
    if "HNMIX_CACHE_DIR" not in os.environ:
        os.environ["HNMIX_CACHE_DIR"] = str(tmp_path_factory.mktemp("hnmix-cache"))


@pytest.fixture(autouse=True)
def _few_threads(monkeypatch):
    # tests run several processes on small CI machines: avoid oversubscribing the cores
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))


@pytest.fixture
def one_torch_thread():
    """Many tiny ops: one intra-op thread avoids OpenMP waits when other jobs hold the cores (a busy 2-core
    machine made a 10 ms test step take 3 s with two threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
