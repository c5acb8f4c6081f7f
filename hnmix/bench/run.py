"""`hnmix bench`: the pretraining step's speed, timed on the real code path (Trainer.train_step with its
data source, model, method and precision), warm-up excluded, device-synchronised.

With `--data synthetic` the views are random tensors already on the device: the compute ceiling. With a
dataset, the same step is fed by the real data pipeline (--pipeline), the pipeline is timed alone (the
feed), and the ceiling afterwards in the same process: which of data and compute limits the run. Last,
the bare MoCo-v2 step of the same model on the same views: share_of_bare is what hnmix's step costs
beyond the algorithm itself.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hnmix.bench.bare import bare_step_timer, synthetic_views
from hnmix.bench.profile import profile_step, profile_table
from hnmix.config import SYNTHETIC, BenchConfig
from hnmix.core.device import synchronize
from hnmix.errors import HnmixError


def seconds_since_launch() -> float | None:
    """Age of this process (Linux /proc), so 'first step' includes interpreter start and imports."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def synthetic_batches(trainer, batch: int, size: int) -> Iterator[tuple]:
    """The same two normalised random batches every step (the bare step's draws): no data work at all."""
    device = trainer.info.device
    views = synthetic_views(batch, size, device, trainer.cfg.channels_last)
    labels = torch.arange(batch, device=device) % 10
    skipped = torch.zeros(batch, dtype=torch.long)
    while True:
        yield views[0], views[1], labels, skipped


def real_step(trainer, batches: Iterator[tuple]) -> Callable[[], None]:
    """Trainer.train_step on the next batch (the lr schedule is irrelevant to speed: kept from its end)."""
    total = 10**9

    def step() -> None:
        im_q, im_k, labels, _ = next(batches)
        trainer.train_step(im_q, im_k, labels, total, total)
    return step


def time_steps(step: Callable[[], object], device: torch.device, cfg: BenchConfig,
               first_step: dict | None = None) -> dict:
    """Warm-up, then `repeats` timed blocks of `steps` steps, each ended by a device synchronisation."""
    for i in range(cfg.warmup):
        step()
        if i == 0 and first_step is not None:
            synchronize(device)
            first_step["since_launch"] = seconds_since_launch()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    blocks = []
    for _ in range(cfg.repeats):
        start = time.perf_counter()
        for _ in range(cfg.steps):
            step()
        synchronize(device)
        blocks.append((time.perf_counter() - start) / cfg.steps)
    ms = statistics.median(blocks) * 1e3
    out = {"ms_per_step": ms, "img_per_s": cfg.batch_size / ms * 1e3, "best_ms_per_step": min(blocks) * 1e3,
           "ms_per_step_repeats": [round(b * 1e3, 3) for b in blocks]}
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def run_bench(cfg: BenchConfig) -> dict:
    """Build the pretraining Trainer for cfg and time its step, then the bare MoCo-v2 step of the same model on
    the same synthetic views; with a dataset also the data pipeline alone (the feed) and the step it feeds;
    with --profile the step's top operators. Returns the figures as a dict."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise HnmixError("hnmix bench runs in one process; time one GPU, then multiply by the ranks")
    from hnmix.bench.feed import measure_feed
    from hnmix.core import dist
    from hnmix.data.order import RunBatches
    from hnmix.negatives.mochi import strategy as mochi_strategy
    from hnmix.train.data import TrainingData
    from hnmix.train.trainer import Trainer

    synthetic = cfg.data == SYNTHETIC
    info = dist.setup(cfg.device)
    device = info.device
    data = None if synthetic else TrainingData(cfg, info)  # synthetic views need no dataset
    strategy = mochi_strategy(cfg.mochi, fused=False) if cfg.mochi_naive else None
    trainer = Trainer(cfg, info, steps_per_epoch=10**9, strategy=strategy)
    trainer.prepare_steps()

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": cfg.arch + (" + CIFAR stem" if cfg.cifar_stem else ""), "image_size": cfg.image_size,
        "batch_size": cfg.batch_size, "method": cfg.describe_method() + (" [naive]" if cfg.mochi_naive else ""),
        "queue_size": cfg.queue_size, "precision": str(trainer.dtype or "fp32").replace("torch.", ""),
        "compiled": cfg.compile, "bn": str(trainer.bn),
        "data": SYNTHETIC if synthetic else f"{cfg.data}: {data.description}",
        "torch_threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
    first: dict = {}
    compute_step = real_step(trainer, synthetic_batches(trainer, cfg.batch_size, cfg.image_size))
    if synthetic:
        result.update(time_steps(compute_step, device, cfg, first))
        compute_img_per_s = result["img_per_s"]
    else:
        def sampler(steps: int) -> RunBatches:
            return RunBatches(len(data), cfg.batch_size, 0, 1, cfg.seed, epochs=10**6, total_steps=steps)

        batches = data.batches(sampler(cfg.warmup + cfg.steps * cfg.repeats))
        try:
            result.update(time_steps(real_step(trainer, batches), device, cfg, first))
        finally:
            batches.close()  # stops the loader's workers
        feed = measure_feed(data.batches, sampler(max(cfg.warmup, 1) + cfg.steps), cfg.steps, cfg.warmup)
        result["feed_img_per_s"] = feed.img_per_s
        compute_img_per_s = None
        if cfg.ceiling:
            compute_img_per_s = result["ceiling_img_per_s"] = time_steps(compute_step, device, cfg)["img_per_s"]
            result["share_of_ceiling"] = result["img_per_s"] / compute_img_per_s
    result["first_step_s"] = None if first.get("since_launch") is None else round(first["since_launch"], 2)
    if device.type == "cpu":
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if cfg.profile:
        result["profile"], result["profile_ms_per_step"] = profile_step(compute_step, device)
    if compute_img_per_s is not None and cfg.bare:
        result.update(time_bare_step(cfg, device, compute_img_per_s))
    dist.teardown()
    return result


def time_bare_step(cfg: BenchConfig, device: torch.device, compute_img_per_s: float) -> dict:
    """The bare MoCo-v2 step of the same model, precision and synthetic views, timed the same way."""
    bare = bare_step_timer(cfg.arch, cfg.cifar_stem, cfg.image_size, cfg.batch_size, cfg.queue_size, cfg.dim,
                           cfg.mlp, device, cfg.precision, cfg.channels_last, cfg.compile, cfg.compile_mode)
    timed = time_steps(bare, device, cfg)
    return {"bare_img_per_s": timed["img_per_s"], "bare_ms_per_step": timed["ms_per_step"],
            "bare_best_ms_per_step": timed["best_ms_per_step"], "share_of_bare": compute_img_per_s / timed["img_per_s"]}


def print_table(result: dict, console: Console) -> None:
    t = Table(title="hnmix bench", show_header=False, title_justify="left")
    for key in ("device", "arch", "image_size", "batch_size", "method", "queue_size", "precision", "bn", "compiled",
                "data"):
        t.add_row(key.replace("_", " "), str(result[key]))
    t.add_row("img/s", f"[bold]{result['img_per_s']:,.0f}[/]")
    repeats = result["ms_per_step_repeats"]
    t.add_row("ms/step", f"{result['ms_per_step']:.2f}" + (
        f"  (median of {len(repeats)}: {', '.join(map(str, repeats))}; best {result['best_ms_per_step']:.2f})"
        if len(repeats) > 1 else ""))
    if "peak_memory_gib" in result:
        t.add_row("peak memory", f"{result['peak_memory_gib']:.2f} GiB (max allocated, timed steps)")
    else:
        t.add_row("peak memory", f"{result['peak_rss_gib']:.2f} GiB (process peak RSS; no allocator stats on CPU)")
    if "ceiling_img_per_s" in result:
        t.add_row("compute ceiling", f"{result['ceiling_img_per_s']:,.0f} img/s (synthetic views on the device); "
                                     f"data pipeline reaches {result['share_of_ceiling']:.0%} of it")
    elif result["data"] == SYNTHETIC:
        t.add_row("compute ceiling", "this is it: views already on the device")
    if "feed_img_per_s" in result:
        t.add_row("data pipeline alone", f"{result['feed_img_per_s']:,.0f} img/s (no step: what the feed can give)")
    if "share_of_bare" in result:
        t.add_row("bare MoCo-v2 step", f"{result['bare_img_per_s']:,.0f} img/s (plain BN, no key shuffle, same views); "
                                       f"this step on synthetic views reaches {result['share_of_bare']:.0%} of it")
    if result["first_step_s"] is not None:
        t.add_row("first step", f"{result['first_step_s']:.1f} s after launch")
    console.print(t)
    if "profile" in result:
        timed = 1e3 * result["batch_size"] / result.get("ceiling_img_per_s", result["img_per_s"])  # synthetic views
        console.print(profile_table(result["profile"], result["device"] != "cpu", result["profile_ms_per_step"], timed))


def bench(cfg: BenchConfig, as_json: bool) -> dict:
    """Run and report; with as_json, stdout holds only the JSON object (everything else goes to stderr)."""
    import json

    stdout = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        result = run_bench(cfg)
    if as_json:
        stdout.write(json.dumps(result) + "\n")
    else:
        print_table(result, Console())
    return result
