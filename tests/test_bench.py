"""`hnmix bench` on the CPU: it runs the pretraining step itself (Trainer.train_step, the configured method),
reports consistent figures as a table or as JSON, and rejects bad options cleanly. No timing is asserted."""

import importlib
import json

import pytest
from conftest import write_images

from hnmix.cli import app
from hnmix.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

mochi_module = importlib.import_module("hnmix.negatives.mochi")  # the package re-exports a function `mochi`

TINY_BENCH = ["--arch", "test_resnet", "--image-size", "16", "--batch-size", "8", "-K", "32", "--set", "dim=16",
              "--device", "cpu", "--workers", "0"]


@pytest.fixture
def counted_steps(monkeypatch):
    calls = []
    real = Trainer.train_step

    def counting(self, *args, **kwargs):
        calls.append(self.cfg.method)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", counting)
    return calls


def bench_json(runner, *args):
    result = runner.invoke(app, ["bench", *TINY_BENCH, "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)  # stdout holds the JSON object alone


def test_synthetic_bench_times_the_real_step(runner, counted_steps):
    out = bench_json(runner, "--steps", "3", "--warmup", "1", "--repeats", "2")
    assert counted_steps == ["moco"] * (1 + 3 * 2)
    assert out["data"] == "synthetic" and out["device"] == "cpu" and out["precision"] == "fp32"
    assert len(out["ms_per_step_repeats"]) == 2
    assert out["best_ms_per_step"] == pytest.approx(min(out["ms_per_step_repeats"]), abs=1e-3)
    assert out["best_ms_per_step"] <= out["ms_per_step"]
    assert out["img_per_s"] == pytest.approx(8 / out["ms_per_step"] * 1e3)
    assert out["peak_rss_gib"] > 0 and "ceiling_img_per_s" not in out


def test_dataset_bench_also_times_the_ceiling(runner, tmp_path, monkeypatch, counted_steps):
    monkeypatch.setenv("HNMIX_CACHE_DIR", str(tmp_path / "cache"))
    data = write_images(tmp_path / "d", 12, classes=["a", "b"])
    out = bench_json(runner, "--data", str(data), "--data-on-gpu", "on", "--steps", "2", "--warmup", "1",
                     "--method", "mochi", "--N", "4", "--s", "3", "--s-prime", "1")
    assert counted_steps == ["mochi"] * (3 + 3)  # the pipeline's steps, then the ceiling's
    assert "batched augmentations" in out["data"] and out["method"].startswith("mochi (N=4, s=3, s'=1")
    assert out["share_of_ceiling"] == pytest.approx(out["img_per_s"] / out["ceiling_img_per_s"])


def test_mochi_naive_switches_the_synthesis_form(runner, monkeypatch):
    seen = []
    for name in ("mochi_from_draws", "mochi_naive_from_draws"):
        real = getattr(mochi_module, name)
        monkeypatch.setattr(mochi_module, name, lambda *a, _real=real, _name=name, **k: seen.append(_name) or _real(*a, **k))
    mochi = ["--method", "mochi", "--N", "4", "--s", "3", "--s-prime", "1", "--steps", "1", "--warmup", "0"]
    bench_json(runner, *mochi)
    bench_json(runner, *mochi, "--mochi-naive")
    assert seen == ["mochi_from_draws", "mochi_naive_from_draws"]


def test_table_output(runner):
    result = runner.invoke(app, ["bench", *TINY_BENCH, "--steps", "1", "--warmup", "0"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for needle in ("hnmix bench", "img/s", "ms/step", "peak memory", "compute ceiling", "synthetic"):
        assert needle in result.stdout, needle


@pytest.mark.parametrize(("args", "message"), [
    (["--mochi-naive"], "--mochi-naive needs --method mochi"),
    (["--data", "/no/such/dir"], "does not exist"),
    (["--steps", "0"], "steps"),
    (["--batch-size", "12"], "must be a multiple of the global batch size 12"),
])
def test_bad_bench_options(runner, args, message):
    result = runner.invoke(app, ["bench", *TINY_BENCH, *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and message in result.stderr
