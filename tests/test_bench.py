"""`hnmix bench` on the CPU: it runs the pretraining step itself (Trainer.train_step, the configured method),
reports consistent figures as a table or as JSON, and rejects bad options cleanly. No timing is asserted."""

import importlib
import json

import pytest
from helpers import write_images

from hnmix.cli import app
from hnmix.train.trainer import Trainer

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


def test_share_of_bare_is_reported(runner):
    out = bench_json(runner, "--steps", "1", "--warmup", "1")
    assert out["bare_img_per_s"] > 0 and out["share_of_bare"] > 0
    assert out["share_of_bare"] == pytest.approx(out["img_per_s"] / out["bare_img_per_s"])
    assert out["bn"] == "split:1"  # batch 8: no sub-batch of 32 fits


def test_bare_step_is_a_correct_moco_step():
    import copy

    import torch

    from hnmix.bench.bare import bare_step_timer

    torch.manual_seed(0)
    step = bare_step_timer("test_resnet", False, 16, 8, 32, 16, True, torch.device("cpu"), "fp32", True, False)
    q_enc, k_enc, queue = copy.deepcopy(step.encoder_q), copy.deepcopy(step.encoder_k), step.queue.clone()
    loss = step()
    with torch.no_grad():  # naive: momentum-updated key weights, unit features, -log softmax of the positive
        for pk, pq in zip(k_enc.parameters(), q_enc.parameters(), strict=True):
            pk.copy_(0.999 * pk + 0.001 * pq)
        im_q, im_k = step.views
        q = q_enc(im_q).double()
        q = q / q.norm(dim=1, keepdim=True)
        k = k_enc(im_k).double()
        k = k / k.norm(dim=1, keepdim=True)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.double().T], dim=1) / 0.2
        naive = -torch.log(torch.exp(logits[:, 0]) / torch.exp(logits).sum(1)).mean()
    torch.testing.assert_close(loss.double(), naive, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step.queue[:8].double(), k, atol=1e-5, rtol=1e-5)  # written at pointer 0
    torch.testing.assert_close(step.queue[8:], queue[8:])
    assert step.ptr == 8
    assert any(not torch.equal(a, b) for a, b in zip(step.encoder_q.parameters(), q_enc.parameters(), strict=True))


def test_profile_step_lists_operators_by_self_time():
    import torch

    from hnmix.bench.profile import profile_step

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    rows, ms_per_step = profile_step(lambda: torch.relu(a @ b), torch.device("cpu"), steps=2)
    by_name = {r["name"]: r for r in rows}
    assert by_name["aten::mm"]["calls"] == 1 and by_name["aten::relu"]["calls"] == 1
    assert all(r["total_ms"] > 0 and 0 < r["share"] <= 1 for r in rows)
    assert sum(r["share"] for r in rows) <= 1 + 1e-9
    assert sum(r["total_ms"] for r in rows) <= ms_per_step * (1 + 1e-9)
    assert [r["total_ms"] for r in rows] == sorted((r["total_ms"] for r in rows), reverse=True)


def test_run_bench_profile():
    import io

    from rich.console import Console

    from hnmix.bench.run import print_table, run_bench
    from hnmix.config import BenchConfig

    cfg = BenchConfig(arch="test_resnet", image_size=16, batch_size=8, queue_size=32, dim=16, device="cpu",
                      workers=0, steps=1, warmup=1, profile=True)
    result = run_bench(cfg)
    assert all(set(r) == {"name", "calls", "total_ms", "share"} for r in result["profile"])
    assert any("conv" in r["name"] for r in result["profile"])  # the backbone's convolutions are in it
    assert result["profile_ms_per_step"] >= sum(r["total_ms"] for r in result["profile"])
    console = Console(file=io.StringIO(), width=200)
    print_table(result, console)
    assert "top operators, CPU self time per step" in console.file.getvalue()


def test_a_dataset_bench_reports_the_feed_alone(runner, tmp_path):
    data = write_images(tmp_path / "d", 24, classes=["a", "b"])
    out = bench_json(runner, "--data", str(data), "--pipeline", "pil", "--steps", "2", "--warmup", "1",
                     "--no-ceiling")
    assert out["feed_img_per_s"] > 0 and "share_of_bare" not in out  # no ceiling: nothing to compare
    assert out["data"].startswith(f"{data}: pil: ")
