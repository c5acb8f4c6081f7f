"""Fixtures: tiny image folders, a CLI runner, a private cache, few threads (helpers: tests/helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import write_images
from typer.testing import CliRunner


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
