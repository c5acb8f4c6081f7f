"""How fast the pretraining DataLoader feeds two-view batches from a folder of JPEGs, against what its
workers' single-core cost predicts (no model, no device: the loader alone).

    python scripts/loader_bench.py DIR [--workers 1 2 4] [--batch 64] [--batches 8] [--pipeline new old]

For each pipeline and worker count: images per second after the first batch, the first batch's latency, the
main process's CPU time per batch, the workers' CPU time per image and how busy they were (a worker
short of a CPU or waiting on the queue is not busy), and the prediction workers / (wall time per image), with that time measured
in this process on one thread just before (so a busy machine slows both alike). Also
prints what bounds the workers: CPUs this process may run on (affinity), the cgroup CPU quota, and torch's
intra-op threads inside a worker. The loader is built as hnmix.train.loop builds it (batch_sampler =
RunBatches, persistent workers, prefetch_factor 4).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, get_worker_info
from torchvision import transforms as T

from hnmix.data.folder import ImageFiles, load_rgb
from hnmix.data.order import RunBatches, sample_seed
from hnmix.data.pipelines.pil import TwoViews


class OldTwoViews(TwoViews):
    """hnmix before this change: torchvision transforms with the tensor GaussianBlur, fork_rng per sample."""

    def __init__(self, images, size: int, seed: int):
        super().__init__(images, size, seed)
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
        self.transform = T.Compose([
            T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
        ])

    def __getitems__(self, keys):  # the DataLoader fetches whole batches: one item at a time here
        return [self[key] for key in keys]

    def __getitem__(self, key):
        index, epoch = key
        img = load_rgb(self.images.paths[index])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.transform(img), self.transform(img), self.images.labels[index], 0


def cgroup_cpus() -> str:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return "no quota" if quota == "max" else f"{int(quota) / int(period):.1f}"
    except (OSError, ValueError):
        return "unknown"


def threads_in_worker(_):
    return torch.get_num_threads() if get_worker_info() else -1


def per_image_ms(dataset, n: int) -> tuple[float, float]:
    """(cpu, wall) ms per image in this process, one thread: wall includes waiting for a busy machine's CPUs."""
    torch.set_num_threads(1)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        dataset[(i, 0)]
    return (time.process_time() - cpu) / n * 1e3, (time.perf_counter() - wall) / n * 1e3


def children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by this process's live children: the loader's workers."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for child in multiprocessing.active_children():
        fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def loader_rate(dataset, workers: int, batch: int, batches: int) -> dict[str, float]:
    """img/s after the first batch, the first batch's latency (s), the main process's cpu ms per batch, the
    workers' cpu ms per image and their busy share (cpu time / (wall time x workers)) after the first batch."""
    sampler = RunBatches(len(dataset), batch, 0, 1, seed=0, epochs=batches * batch // len(dataset) + 1,
                         total_steps=batches)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, persistent_workers=workers > 0,
                        prefetch_factor=4 if workers else None)
    start = time.perf_counter()
    it = iter(loader)
    next(it)
    first = time.perf_counter() - start
    start, cpu, worker_cpu = time.perf_counter(), time.process_time(), children_cpu_s()
    rest = sum(1 for _ in it)
    wall, worker_cpu = time.perf_counter() - start, children_cpu_s() - worker_cpu
    return {"rate": rest * batch / wall, "first": first, "main_ms": (time.process_time() - cpu) / max(rest, 1) * 1e3,
            "worker_ms": worker_cpu / max(rest * batch, 1) * 1e3, "busy": worker_cpu / (wall * max(workers, 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--pipeline", nargs="+", default=["new", "old"], choices=["new", "old"])
    args = parser.parse_args()
    images = ImageFiles(args.dir)
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    probe = DataLoader(range(2), batch_size=1, num_workers=1, collate_fn=lambda b: threads_in_worker(b))
    print(f"os.cpu_count {os.cpu_count()}, affinity {affinity}, cgroup quota {cgroup_cpus()}, "
          f"torch threads: main {torch.get_num_threads()}, in a worker {next(iter(probe))}")
    for name in args.pipeline:
        dataset = TwoViews(images, args.size, seed=0) if name == "new" else OldTwoViews(images, args.size, seed=0)
        for workers in args.workers:
            cpu, wall = per_image_ms(dataset, min(32, len(images)))  # just before: the same load on the machine
            m = loader_rate(dataset, workers, args.batch, args.batches)
            predicted = min(workers, affinity) / wall * 1e3
            print(f"{name}, {workers} workers: {m['rate']:.0f} img/s; one thread in-process {cpu:.1f} ms/img cpu, "
                  f"{wall:.1f} wall -> predicted {predicted:.0f} img/s ({m['rate'] / predicted:.0%}); first batch "
                  f"{m['first']:.1f} s; main process {m['main_ms']:.1f} cpu ms/batch; workers {m['worker_ms']:.1f} "
                  f"cpu ms/img, busy {m['busy']:.0%}")


if __name__ == "__main__":
    main()
