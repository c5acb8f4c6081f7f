"""Every GPU figure of docs/benchmarks.md in one go, the same way on every machine.

    python3 scripts/gpu_bench.py prepare --shared ../shared/data   # here: data and wheels into .carry/ (~25 MB)
    python3 scripts/gpu_bench.py run --out $OUT                    # there: about 7 minutes on one H200

`run` installs the carried wheels (pydantic is not on the GPU image) into /tmp/site, unpacks the carried
data into /tmp/hnmix-gpu, then runs each group of figures in its own process with its own timeout; each
figure is one JSON line in OUT/figures.jsonl as soon as it is measured (a group that times out keeps the
lines it wrote), and a table at the end. `--groups` picks groups, `--list` lists them.

Carried data (.carry/, ignored by git): CIFAR-10's test split as JPEGs (cifar10-test.zip, 10,000 x 32 px;
the figures' "CIFAR-10": its images repeated 5x as a 50,000-image train/ with the originals as val/) and 96
coco128 photos re-encoded at 500 x 375, quality 90 (about 60 KB each; repeated to 3,072 files: the
"ImageNet-sized JPEGs").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".carry"
WORK = Path("/tmp/hnmix-gpu")
WHEELS = ("pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types", "typing-inspection",
          "typing-extensions>=4.16")

R50 = dict(arch="resnet50", image_size=224, batch_size=256, queue_size=65536)
R18 = dict(arch="resnet18", cifar_stem=True, image_size=32, batch_size=512, queue_size=65536)
TIMING = dict(steps=20, warmup=10, repeats=3)
MOCHI = {"method": "mochi", "mochi": {"n_hard": 1024, "s": 1024, "s_prime": 128}}
SYNCO = {"method": "synco", "synco": {"start_epoch": 0}}
RING = {"method": "ring"}

# group -> (timeout in s, figures: name -> (bench settings, what it is checked against))
GROUPS: dict[str, tuple[int, dict[str, tuple[dict, str]]]] = {
    "r50": (150, {
        "r50.moco": ({**R50}, ">= 2,900 img/s and share_of_bare >= 0.92"),
        "r50.mochi": ({**R50, **MOCHI, "bare": False}, "within 2 % of r50.moco"),
        "r50.synco": ({**R50, **SYNCO, "bare": False}, "within 3 % of r50.moco"),
        "r50.ring": ({**R50, **RING, "bare": False}, "within 2 % of r50.moco"),
        "r50.moco.plain-bn": ({**R50, "bn": "plain", "bare": False}, "what split BN + key shuffle cost"),
    }),
    "r18": (120, {
        "r18.moco": ({**R18, "steps": 50, "warmup": 20}, ">= 30,000 img/s eager"),
        "r18.mochi": ({**R18, **MOCHI, "bare": False}, "within 2 % of r18.moco"),
        "r18.synco": ({**R18, **SYNCO, "bare": False}, "within 3 % of r18.moco"),
        "r18.ring": ({**R18, **RING, "bare": False}, "within 2 % of r18.moco"),
        "r18.moco.plain-bn": ({**R18, "bn": "plain", "bare": False}, "what split BN + key shuffle cost"),
        "r18.moco.profile": ({**R18, "profile": True, "bare": False}, "profile_ms_per_step << ms_per_step: host-bound"),
    }),
    "r18-compile": (200, {
        "r18.moco.compile": ({**R18, "compile": True, "steps": 50, "warmup": 30}, ">= 40,000 img/s"),
    }),
    "resident": (120, {
        "cifar.resident.r18": ({**R18, "data": "{cifar}/train", "pipeline": "resident", "bare": False},
                               "share_of_ceiling >= 0.95"),
    }),
    "tests": (150, {}),  # the CUDA cases of the test suite
    "r18-graphs": (240, {  # not in the default run (time): CUDA graphs through torch.compile
        "r18.moco.compile-graphs": ({**R18, "compile": True, "compile_mode": "reduce-overhead", "steps": 50,
                                     "warmup": 30}, "against r18.moco.compile"),
    }),
}
# run as their own commands: first_step_s counts from the process's launch
COMMANDS = {
    "jpeg": (150, {
        "jpeg.decode.r50": (["bench", "--arch", "resnet50", "--batch-size", "256", "--data", "{jpeg}",
                             "--pipeline", "decode", "--workers", "8", "--steps", "20", "--warmup", "10",
                             "--no-bare", "--json"], ">= 2,800 img/s, first_step_s <= 15, feed_img_per_s >= 5,000"),
        "jpeg.pil.r50": (["bench", "--arch", "resnet50", "--batch-size", "256", "--data", "{jpeg}",
                          "--pipeline", "pil", "--workers", "15", "--steps", "10", "--warmup", "5",
                          "--no-ceiling", "--json"], "the PIL workers, for comparison (was 176 img/s)"),
    }),
    "e2e": (150, {
        "cifar.pretrain.r18": (["pretrain", "--data", "{cifar}", "--arch", "resnet18", "--cifar-stem",
                                "--image-size", "32", "--batch-size", "512", "-K", "65536", "--pipeline",
                                "resident", "--epochs", "30", "--knn-every", "10", "--set", "log_every=20",
                                "--output", "{work}/e2e"], ">= 0.9 x cifar.resident.r18 over the whole run"),
    }),
}
DEFAULT = ("r50", "r18", "resident", "jpeg", "e2e", "r18-compile", "tests")


def prepare(shared: Path) -> None:
    """Here: the carried folder (data + wheels), ignored by git."""
    from PIL import Image

    CARRY.mkdir(exist_ok=True)
    shutil.copy(shared / "cifar10-test.zip", CARRY / "cifar10-test.zip")
    jpeg = CARRY / "jpeg500"
    jpeg.mkdir(exist_ok=True)
    photos = sorted((shared / "coco128").rglob("*.jpg"))[:96]
    for photo in photos:
        with Image.open(photo) as img:
            img.convert("RGB").resize((500, 375), Image.Resampling.BICUBIC).save(jpeg / photo.name, quality=90)
    wheels = CARRY / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "-d", str(wheels), *WHEELS], check=True)
    size = sum(f.stat().st_size for f in CARRY.rglob("*") if f.is_file())
    print(f"{CARRY}: {size / 2**20:.1f} MiB ({len(photos)} photos, CIFAR-10 test zip, {len(list(wheels.iterdir()))} "
          f"wheels); carry it: run(carry=['.carry'], command='python3 scripts/gpu_bench.py run --out $OUT')")


def unpack() -> dict[str, str]:
    """There: CIFAR-10 as a 50,000-image train/ (the test split 5x) with the originals as val/; the photos
    repeated to 3,072 files."""
    cifar, jpeg = WORK / "cifar", WORK / "jpeg"
    if not (cifar / "val").is_dir():
        with zipfile.ZipFile(CARRY / "cifar10-test.zip") as z:
            z.extractall(WORK / "c10")
        cifar.mkdir(parents=True)
        (WORK / "c10" / "test").rename(cifar / "val")
        for cls in (cifar / "val").iterdir():
            out = cifar / "train" / cls.name
            out.mkdir(parents=True)
            for f in cls.iterdir():
                for r in range(5):
                    os.link(f, out / f"{f.stem}_{r}{f.suffix}")
    if not jpeg.is_dir():
        jpeg.mkdir(parents=True)
        photos = sorted((CARRY / "jpeg500").iterdir())
        for i in range(3072):
            os.link(photos[i % len(photos)], jpeg / f"{i:05d}.jpg")
    return {"cifar": str(cifar), "jpeg": str(jpeg), "work": str(WORK)}


def install_wheels() -> dict[str, str]:
    """There: the carried wheels into /tmp/site (pydantic is not on the GPU image), hnmix from this tree."""
    site = WORK / "site"
    wheels = sorted(str(w) for w in (CARRY / "wheels").glob("*.whl"))
    try:
        import pydantic  # noqa: F401  # already there (a CPU check of this script)
        wheels = []
    except ImportError:
        pass
    if wheels and not site.is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *wheels], check=True)
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


SMOKE = {"resnet50": "test_resnet", "resnet18": "test_resnet", "256": "16", "512": "16", "65536": "64",
         "224": "32", "8": "0", "15": "1", "30": "1"}  # --smoke: the same code paths, CPU-sized


def smoke(values: dict) -> dict:
    small = {"batch_size": 16, "queue_size": 64, "image_size": 32, "steps": 2, "warmup": 1, "repeats": 1,
             "workers": 0, "arch": "test_resnet", "cifar_stem": False, "epochs": 1}
    out = {k: small.get(k, v) for k, v in values.items()}
    if "mochi" in out:
        out["mochi"] = {"n_hard": 8, "s": 4, "s_prime": 2}
    if "synco" in out:
        out["synco"] = {**out["synco"], "n_hard": 8, "counts": [1, 1, 1, 1, 1, 1]}
    return out


def emit(out: Path, record: dict) -> None:
    with open(out / "figures.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def run_group(name: str, out: Path, paths: dict[str, str], device: str, small: bool = False) -> None:
    """In its own process: each figure through hnmix.bench.run_bench, one JSON line each."""
    from hnmix.bench import run_bench
    from hnmix.config import BenchConfig
    from hnmix.core.settings import load_config

    for figure, (settings, target) in GROUPS[name][1].items():
        values = {**TIMING, **settings, "device": device}
        values = {k: v.format(**paths) if isinstance(v, str) else v for k, v in values.items()}
        values = smoke(values) if small else values
        started = time.perf_counter()
        try:
            result = run_bench(load_config(BenchConfig, None, values))
            emit(out, {"figure": figure, "target": target, "seconds": round(time.perf_counter() - started, 1),
                       **{k: v for k, v in result.items() if k != "profile"},
                       **({"profile_top": result["profile"][:8]} if "profile" in result else {})})
        except Exception as e:  # one failed figure must not cost the others
            emit(out, {"figure": figure, "target": target, "error": f"{type(e).__name__}: {e}"})


def run_command(figure: str, args: list[str], target: str, out: Path, paths: dict, timeout: int, env: dict,
                small: bool = False) -> None:
    args = [SMOKE.get(a, a) if small else a.format(**paths) for a in args]
    args = [a.format(**paths) for a in args] + (["--device", "cpu", "--set", "workers=0"] if small else [])
    shutil.rmtree(Path(paths["work"]) / "e2e", ignore_errors=True)  # a rerun starts the run afresh
    if small and args[0] == "pretrain":
        args = [a for a in args if a != "--cifar-stem"] + ["--set", "epochs=2", "--set", "knn_every=1",
                                                           "--max-steps", "30"]
    started = time.time()
    try:
        done = subprocess.run([sys.executable, "-m", "hnmix", *args], capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        emit(out, {"figure": figure, "target": target, "error": f"timed out after {timeout} s"})
        return
    record = {"figure": figure, "target": target, "seconds": round(time.time() - started, 1)}
    if done.returncode:
        record["error"] = (done.stderr.strip().splitlines() or ["?"])[-1]
    elif args[0] == "bench":
        record.update(json.loads(done.stdout))
    else:  # pretrain: throughput over the whole run, from its first to its last step
        lines = [json.loads(line) for line in (Path(paths["work"]) / "e2e" / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in lines if "img_per_s" in r]
        knn = [r for r in lines if "knn_top1" in r]
        first, last = steps[0], steps[-1]  # throughput from the first logged step to the end: kNN and
        batch = int(args[args.index("--batch-size") + 1])  # checkpoints included, as the run goes
        record.update(steps=last["step"], last_loss=last["loss"], knn=[r["knn_top1"] for r in knn],
                      knn_s=[round(r["knn_s"], 2) for r in knn], wall_s=round(time.time() - started, 1),
                      img_per_s=(last["step"] - first["step"]) * batch / (last["elapsed_s"] - first["elapsed_s"]))
        (out / "e2e.log").write_text(done.stdout[-20000:])
    emit(out, record)


def run(out: Path, groups: list[str], device: str, small: bool = False) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HNMIX_CACHE_DIR": str(WORK / "cache"), **install_wheels()}
    paths = unpack()
    for group in groups:
        started = time.time()
        if group in COMMANDS:
            timeout, figures = COMMANDS[group]
            for figure, (args, target) in figures.items():
                run_command(figure, args, target, out, paths, timeout, env, small)
        elif group == "tests":
            done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-k", "cuda or CUDA or gpu",
                                   "tests/test_split_bn.py", "tests/test_memory_format.py", "tests/test_decode.py",
                                   "tests/test_train_step.py", "tests/test_gpu_augment.py"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, timeout=GROUPS["tests"][0])
            emit(out, {"figure": "cuda-tests", "returncode": done.returncode,
                       "summary": done.stdout.strip().splitlines()[-1:] or done.stderr[-500:]})
        else:
            try:
                subprocess.run([sys.executable, __file__, "group", group, "--out", str(out), "--device", device,
                                "--paths", json.dumps(paths), *(["--smoke"] if small else [])], env=env,
                               timeout=GROUPS[group][0])
            except subprocess.TimeoutExpired:
                emit(out, {"figure": f"group {group}", "error": f"timed out after {GROUPS[group][0]} s"})
        print(f"== {group}: {time.time() - started:.0f} s", flush=True)
    summary(out)


def summary(out: Path) -> None:
    print(f"\n{'figure':28} {'img/s':>9} {'share':>7} {'feed':>7} {'first':>6}  target")
    for line in (out / "figures.jsonl").read_text().splitlines():
        r = json.loads(line)
        share = r.get("share_of_bare") or r.get("share_of_ceiling") or 0
        img = r.get("img_per_s") or r.get("median_logged_img_per_s") or 0
        print(f"{r['figure']:28} {img:9,.0f} {share:7.3f} {r.get('feed_img_per_s') or 0:7,.0f} "
              f"{r.get('first_step_s') or 0:6.1f}  {r.get('target', '')}{'  ERROR ' + r['error'] if 'error' in r else ''}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--groups", nargs="*", default=list(DEFAULT), help=f"default: {' '.join(DEFAULT)}")
    r.add_argument("--device", default="cuda")
    r.add_argument("--list", action="store_true")
    r.add_argument("--smoke", action="store_true", help="CPU-sized settings: checks the script, measures nothing")
    g = sub.add_parser("group")
    g.add_argument("name")
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--device", default="cuda")
    g.add_argument("--paths", required=True)
    g.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    if args.verb == "prepare":
        prepare(args.shared)
    elif args.verb == "group":
        run_group(args.name, args.out, json.loads(args.paths), args.device, args.smoke)
    elif args.list:
        for name in [*GROUPS, *COMMANDS]:
            figures = GROUPS.get(name, COMMANDS.get(name))[1]
            print(f"{name}: {', '.join(figures) or 'pytest CUDA cases'}")
    else:
        run(args.out, args.groups, args.device, args.smoke)


if __name__ == "__main__":
    main()
