"""Per-core cost of the PIL pretraining pipeline against official MoCo's aug+ on the same JPEG files.

    OMP_NUM_THREADS=1 python scripts/pil_pipeline_bench.py DIR [--images 64] [--rounds 5] [--size 224]

Each round runs every pipeline on each image (two views per image, from the file) in a rotating order;
the figures are medians over rounds of CPU milliseconds per image (this process, one thread), with wall
milliseconds beside them. Pipelines:
- official: facebookresearch/moco main_moco.py --aug-plus (torchvision transforms, PIL GaussianBlur, ToTensor,
  Normalize), loader Image.open().convert("RGB"), TwoCropsTransform;
- old: hnmix before this change (torchvision's tensor GaussianBlur with a blur_kernel(size)-tap kernel,
  PILToTensor, one torch.random.fork_rng per sample);
- new: hnmix.data.pipelines.pil.TwoViews (decode once, Pillow stages, draws as the device pipeline).
Then the new pipeline's stages, timed one by one over the same images (decode, crop/resize, jitter,
grayscale, blur, solarise, flip, to-tensor, and the parameter draw).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from hnmix.data.augment import pil as A
from hnmix.data.augment.draws import draw_uniforms
from hnmix.data.folder import ImageFiles, decode, load_rgb
from hnmix.data.order import sample_seed
from hnmix.data.pipelines.pil import TwoViews


class MocoBlur:
    """moco.loader.GaussianBlur (facebookresearch/moco)."""

    def __call__(self, x):
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class Timed:
    """A transform whose CPU time adds up in costs[name]."""

    def __init__(self, name, transform, costs):
        self.name, self.transform, self.costs = name, transform, costs

    def __call__(self, *args):
        start = time.process_time()
        out = self.transform(*args)
        self.costs[self.name] += time.process_time() - start
        return out


def official(size: int, costs: dict | None = None):
    steps = [
        ("crop/resize", T.RandomResizedCrop(size, scale=(0.2, 1.0))),
        ("jitter", T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)),
        ("grayscale", T.RandomGrayscale(p=0.2)),
        ("blur", T.RandomApply([MocoBlur()], p=0.5)),
        ("flip", T.RandomHorizontalFlip()),
        ("to-tensor", T.ToTensor()),
        ("normalize", T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])),
    ]
    wrap = (lambda name, t: Timed(name, t, costs)) if costs is not None else (lambda name, t: t)
    transform = T.Compose([wrap(name, t) for name, t in steps])

    def load(path: Path):
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")  # torchvision's pil_loader

    load = wrap("decode (+convert)", load)

    def views(index: int, path: Path):
        img = load(path)
        return transform(img), transform(img)
    return views


def old_hnmix(size: int, costs: dict | None = None):
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    steps = [
        ("crop/resize", T.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True)),
        ("jitter", T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)),
        ("grayscale", T.RandomGrayscale(p=0.2)),
        ("blur", T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)),
        ("flip", T.RandomHorizontalFlip()),
        ("to-tensor", T.PILToTensor()),
    ]
    wrap = (lambda name, t: Timed(name, t, costs)) if costs is not None else (lambda name, t: t)
    transform = T.Compose([wrap(name, t) for name, t in steps])
    load = wrap("decode (+convert)", load_rgb)

    def seeded(index: int):
        fork = torch.random.fork_rng(devices=[])
        fork.__enter__()
        torch.manual_seed(sample_seed(0, 0, index))
        return fork

    seed = wrap("fork_rng + seed", seeded)

    def views(index: int, path: Path):
        img = load(path)
        fork = seed(index)
        try:
            return transform(img), transform(img)
        finally:
            fork.__exit__(None, None, None)
    return views


def new_hnmix(size: int, root: Path):
    dataset = TwoViews(ImageFiles(root), size, seed=0)
    return lambda index, path: dataset[(index, 0)]


def new_stages(size: int, paths: list[Path], costs: dict[str, float]) -> None:
    """The new pipeline's steps (hnmix.data.augment.pil.PilAugment.__call__ and render), each timed."""
    augment = A.PilAugment(None, size)
    generator = torch.Generator()

    def timed(name, fn, *args, **kwargs):
        start = time.process_time()
        out = fn(*args, **kwargs)
        costs[name] += time.process_time() - start
        return out

    for i, path in enumerate(paths):
        generator.manual_seed(i)
        img = timed("open (header)", Image.open, path)
        uniforms = timed("draw parameters", draw_uniforms, 2, generator=generator)
        plans = timed("draw parameters", A.plan_views, img.height, img.width, uniforms, augment.views)
        scale = A.draft_scale(plans, size, img)
        img = timed("decode", decode, img, scale)
        for plan in plans:
            view = timed("crop/resize", A.crop_resize, img, plan.box, size, scale)
            view = timed("jitter", A.jitter, view, plan.jitter)
            if plan.grayscale:
                view = timed("grayscale", view.convert, "L")
            view = timed("blur", A.blur, view, plan.sigma)
            if plan.solarize:
                view = timed("solarize", ImageOps.solarize, view, 128)
            if plan.flip:
                view = timed("flip", view.transpose, Image.Transpose.FLIP_LEFT_RIGHT)
            timed("to-tensor", A.to_tensor, view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path, help="a folder of JPEG images (searched recursively)")
    parser.add_argument("--images", type=int, default=64, help="images per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    files = ImageFiles(args.dir)
    paths = files.paths[:args.images]
    pipelines = {"official": official(args.size), "old": old_hnmix(args.size), "new": new_hnmix(args.size, args.dir)}
    cpu, wall = defaultdict(list), defaultdict(list)
    names = list(pipelines)
    for _ in range(args.rounds):  # interleaved image by image, in a rotating order: drift hits all alike
        spent_cpu, spent_wall = defaultdict(float), defaultdict(float)
        for index, path in enumerate(paths):
            for name in names[index % 3:] + names[:index % 3]:
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                pipelines[name](index, path)
                spent_cpu[name] += time.process_time() - start_cpu
                spent_wall[name] += time.perf_counter() - start_wall
        for name in names:
            cpu[name].append(spent_cpu[name] / len(paths) * 1e3)
            wall[name].append(spent_wall[name] / len(paths) * 1e3)
    print(f"{len(paths)} images from {args.dir}, two {args.size} px views each, {args.rounds} rounds; "
          "ms per image (median over rounds)")
    print(f"{'pipeline':<10} {'cpu ms':>8} {'wall ms':>8} {'vs official (cpu)':>18}")
    base = statistics.median(cpu["official"])
    for name in pipelines:
        c, w = statistics.median(cpu[name]), statistics.median(wall[name])
        print(f"{name:<10} {c:8.2f} {w:8.2f} {base / c:17.2f}x")
    stages = {"new": defaultdict(float), "official": defaultdict(float), "old": defaultdict(float)}
    timed = {"official": official(args.size, stages["official"]), "old": old_hnmix(args.size, stages["old"])}
    for _ in range(args.rounds):
        new_stages(args.size, paths, stages["new"])
        for index, path in enumerate(paths):
            for run in timed.values():
                run(index, path)
    print("by stage, cpu ms per image (both views; a stage counts where it is drawn):")
    names = list(dict.fromkeys(name for costs in stages.values() for name in costs))
    print(f"  {'stage':<18}" + "".join(f" {name:>8}" for name in stages))
    for name in [*names, "sum"]:
        row = [sum(c.values()) if name == "sum" else c.get(name) for c in stages.values()]
        print(f"  {name:<18}" + "".join(f" {'-' if v is None else f'{v / args.rounds / len(paths) * 1e3:.2f}':>8}"
                                       for v in row))


if __name__ == "__main__":
    main()
