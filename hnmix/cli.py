"""The `hnmix` command line: one thin function per subcommand; settings live in hnmix.config."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from hnmix.analyze.config import AnalyzeConfig
from hnmix.config import BenchConfig, PretrainConfig, load_config
from hnmix.errors import HnmixError
from hnmix.eval.config import LinevalConfig

app = typer.Typer(
    help="Self-supervised pretraining with hard negatives: pretrain, evaluate, analyse, transfer.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        from hnmix import __version__

        typer.echo(f"hnmix {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="print the version and exit")] = False,
) -> None:
    """hnmix: MoCo-v2 pretraining with hard negatives (MoCHi, ...), evaluation, analysis and transfer."""


@contextlib.contextmanager
def user_errors():
    """Problems the user can fix end the command with one red line and exit code 2, never a traceback."""
    try:
        yield
    except HnmixError as e:
        code = getattr(e, "exit_code", 2)  # a signal's code when a run stopped cleanly on Ctrl-C / SIGTERM
        err_console.print(f"[bold red]error:[/] {e}" if code == 2 else f"[bold yellow]stopped:[/] {e}",
                          highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None
    except OSError as e:  # e.g. an --output path under an existing file, a full disk, no permission
        where = f": {e.filename}" if e.filename else ""
        err_console.print(f"[bold red]error:[/] {e.strerror or e}{where}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def field_option(cls: type, name: str, *flags: str, **kwargs: Any) -> Any:
    """A typer option whose help text and shown default come from the pydantic field."""
    f = cls.model_fields[name]
    default = f.default
    if isinstance(default, bool):
        default = flags[0].split("/")[0 if default else 1].lstrip("-") if "/" in flags[0] else default
    shown = "" if default is None else f" [default: {default}]"  # None: the description says what happens
    if f.is_required():
        shown = " [required]"
    help_text = escape(f"{f.description}{shown}")  # typer renders rich markup: keep the brackets
    return typer.Option(*flags, help=help_text, show_default=False, **kwargs)


P, B = PretrainConfig, BenchConfig
HN, MOCHI, SYNCO, RING = "Hard negatives", "MoCHi (--method mochi)", "SynCo (--method synco)", "Ring (--method ring)"
L = LinevalConfig
A = AnalyzeConfig
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="YAML file of settings (CLI flags override it)")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override any setting: --set key=value (repeatable)")]


def parse_int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise HnmixError(f"{flag} expects comma-separated integers, got '{text}'") from None


@app.command()
def pretrain(
    data: Annotated[str | None, field_option(P, "data", "--data")] = None,
    arch: Annotated[str | None, field_option(P, "arch", "--arch")] = None,
    cifar_stem: Annotated[bool | None, field_option(P, "cifar_stem", "--cifar-stem/--no-cifar-stem")] = None,
    method: Annotated[str | None, field_option(P, "method", "--method", rich_help_panel=HN)] = None,
    n_hard: Annotated[int | None, field_option(P, "n_hard", "--N", rich_help_panel=HN)] = None,
    s: Annotated[int | None, field_option(P, "s", "--s", "--mochi-s", rich_help_panel=MOCHI)] = None,
    s_prime: Annotated[int | None, field_option(P, "s_prime", "--s-prime", rich_help_panel=MOCHI)] = None,
    mochi_start_epoch: Annotated[int | None, field_option(P, "mochi_start_epoch", "--mochi-start-epoch",
                                                          rich_help_panel=MOCHI)] = None,
    synco_counts: Annotated[str | None, field_option(P, "synco_counts", "--synco-counts", rich_help_panel=SYNCO,
                                                     metavar="N1,...,N6")] = None,
    synco_sigma: Annotated[float | None, field_option(P, "synco_sigma", "--synco-sigma", rich_help_panel=SYNCO)] = None,
    synco_delta: Annotated[float | None, field_option(P, "synco_delta", "--synco-delta", rich_help_panel=SYNCO)] = None,
    synco_eta: Annotated[float | None, field_option(P, "synco_eta", "--synco-eta", rich_help_panel=SYNCO)] = None,
    synco_start_epoch: Annotated[int | None, field_option(P, "synco_start_epoch", "--synco-start-epoch",
                                                          rich_help_panel=SYNCO)] = None,
    ring_outer: Annotated[float | None, field_option(P, "ring_outer", "--ring-outer", rich_help_panel=RING)] = None,
    ring_inner: Annotated[float | None, field_option(P, "ring_inner", "--ring-inner", rich_help_panel=RING)] = None,
    ring_anneal: Annotated[str | None, field_option(P, "ring_anneal", "--ring-anneal", rich_help_panel=RING)] = None,
    ring_anneal_epochs: Annotated[int | None, field_option(P, "ring_anneal_epochs", "--ring-anneal-epochs",
                                                           rich_help_panel=RING)] = None,
    oracle_labels: Annotated[bool | None, field_option(P, "oracle_labels", "--oracle-labels/--no-oracle-labels",
                                                       rich_help_panel=HN)] = None,
    queue_size: Annotated[int | None, field_option(P, "queue_size", "--queue-size", "-K")] = None,
    momentum: Annotated[float | None, field_option(P, "momentum", "--momentum")] = None,
    temperature: Annotated[float | None, field_option(P, "temperature", "--temperature")] = None,
    dim: Annotated[int | None, field_option(P, "dim", "--dim")] = None,
    mlp: Annotated[bool | None, field_option(P, "mlp", "--mlp/--no-mlp")] = None,
    epochs: Annotated[int | None, field_option(P, "epochs", "--epochs")] = None,
    max_steps: Annotated[int | None, field_option(P, "max_steps", "--max-steps")] = None,
    batch_size: Annotated[int | None, field_option(P, "batch_size", "--batch-size")] = None,
    lr: Annotated[float | None, field_option(P, "lr", "--lr")] = None,
    wd: Annotated[float | None, field_option(P, "wd", "--wd")] = None,
    cos: Annotated[bool | None, field_option(P, "cos", "--cos/--no-cos")] = None,
    image_size: Annotated[int | None, field_option(P, "image_size", "--image-size")] = None,
    workers: Annotated[int | None, field_option(P, "workers", "--workers")] = None,
    data_on_gpu: Annotated[str | None, field_option(P, "data_on_gpu", "--data-on-gpu")] = None,
    seed: Annotated[int | None, field_option(P, "seed", "--seed")] = None,
    bn: Annotated[str | None, field_option(P, "bn", "--bn")] = None,
    precision: Annotated[str | None, field_option(P, "precision", "--precision")] = None,
    compile: Annotated[bool | None, field_option(P, "compile", "--compile/--no-compile")] = None,
    device: Annotated[str | None, field_option(P, "device", "--device")] = None,
    output: Annotated[str | None, field_option(P, "output", "--output", "-o")] = None,
    resume: Annotated[str | None, field_option(P, "resume", "--resume")] = None,
    save_every: Annotated[int | None, field_option(P, "save_every", "--save-every")] = None,
    skip_corrupt: Annotated[bool | None, field_option(P, "skip_corrupt", "--skip-corrupt/--no-skip-corrupt")] = None,
    knn_every: Annotated[int | None, field_option(P, "knn_every", "--knn-every")] = None,
    knn_data: Annotated[str | None, field_option(P, "knn_data", "--knn-data")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Pretrain a backbone with MoCo-v2 or a hard-negative method (single process, or DDP under torchrun).

    Methods (--method): moco = MoCo-v2; mochi = mix the N hardest negatives (s pairs, s' with the query);
    synco = six kinds of synthetic hard negatives; ring = keep a ring of hard-but-not-too-hard negatives.
    --oracle-labels adds the label oracle to any of them. See docs/methods.md.

    Example: hnmix pretrain --data DIR --method mochi --N 1024 --s 1024 --s-prime 128
    """
    overrides = {k: v for k, v in locals().items() if k not in ("config", "set_")}
    with user_errors():
        if synco_counts is not None:
            overrides["synco_counts"] = parse_int_list(synco_counts, "--synco-counts")
        cfg = load_config(PretrainConfig, config, overrides, set_)
        from hnmix.train.loop import pretrain as run_pretrain

        run_pretrain(cfg)


@app.command()
def lineval(
    weights: Annotated[str | None, field_option(L, "weights", "--weights", "-w")] = None,
    protocol: Annotated[str | None, field_option(L, "protocol", "--protocol")] = None,
    data: Annotated[str | None, field_option(L, "data", "--data")] = None,
    train: Annotated[str | None, field_option(L, "train", "--train")] = None,
    val: Annotated[str | None, field_option(L, "val", "--val")] = None,
    arch: Annotated[str | None, field_option(L, "arch", "--arch")] = None,
    cifar_stem: Annotated[bool | None, field_option(L, "cifar_stem", "--cifar-stem/--no-cifar-stem")] = None,
    image_size: Annotated[int | None, field_option(L, "image_size", "--image-size")] = None,
    epochs: Annotated[int | None, field_option(L, "epochs", "--epochs")] = None,
    batch_size: Annotated[int | None, field_option(L, "batch_size", "--batch-size")] = None,
    lr: Annotated[float | None, field_option(L, "lr", "--lr")] = None,
    wd: Annotated[float | None, field_option(L, "wd", "--wd")] = None,
    knn_k: Annotated[int | None, field_option(L, "knn_k", "--knn-k")] = None,
    knn_t: Annotated[float | None, field_option(L, "knn_t", "--knn-t")] = None,
    workers: Annotated[int | None, field_option(L, "workers", "--workers")] = None,
    device: Annotated[str | None, field_option(L, "device", "--device")] = None,
    seed: Annotated[int | None, field_option(L, "seed", "--seed")] = None,
    output: Annotated[str | None, field_option(L, "output", "--output", "-o")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate frozen backbone weights: linear classifier (moco / fast protocol) or weighted kNN.

    Example: hnmix lineval --weights runs/demo/last.pt --data demo --protocol fast
    """
    overrides = {k: v for k, v in locals().items() if k not in ("config", "set_")}
    with user_errors():
        from hnmix.eval.lineval import lineval as run_lineval

        run_lineval(load_config(LinevalConfig, config, overrides, set_))


@app.command()
def analyze(
    metric: Annotated[str, typer.Argument(help="uniformity, alignment, false-negatives, hardness, proxy-accuracy, "
                                               "separation, or all")],
    more_weights: Annotated[list[str] | None, typer.Argument(hidden=True, metavar="W2")] = None,
    weights: Annotated[list[str] | None, field_option(A, "weights", "--weights", "-w")] = None,
    data: Annotated[str | None, field_option(A, "data", "--data")] = None,
    split: Annotated[str | None, field_option(A, "split", "--split")] = None,
    features: Annotated[str | None, field_option(A, "features", "--features")] = None,
    arch: Annotated[str | None, field_option(A, "arch", "--arch")] = None,
    cifar_stem: Annotated[bool | None, field_option(A, "cifar_stem", "--cifar-stem/--no-cifar-stem")] = None,
    image_size: Annotated[int | None, field_option(A, "image_size", "--image-size")] = None,
    max_images: Annotated[int | None, field_option(A, "max_images", "--max-images")] = None,
    top_k: Annotated[int | None, field_option(A, "top_k", "--top-k")] = None,
    temperature: Annotated[float | None, field_option(A, "temperature", "--temperature")] = None,
    memory: Annotated[str | None, field_option(A, "memory", "--memory")] = None,
    batch_size: Annotated[int | None, field_option(A, "batch_size", "--batch-size")] = None,
    workers: Annotated[int | None, field_option(A, "workers", "--workers")] = None,
    device: Annotated[str | None, field_option(A, "device", "--device")] = None,
    seed: Annotated[int | None, field_option(A, "seed", "--seed")] = None,
    output: Annotated[str | None, field_option(A, "output", "--output", "-o")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print analysis.json to stdout (messages go to "
                                                         "stderr)")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Measure what pretraining did to the feature space; one PNG per metric, one series per weights file.

    Example: hnmix analyze all --weights runs/moco/last.pt runs/mochi/last.pt --data demo --output runs/cmp
    """
    overrides = {k: v for k, v in locals().items() if k not in ("config", "set_", "more_weights", "as_json")}
    if weights or more_weights:  # `--weights A B` leaves B as a positional argument: gather both
        overrides["weights"] = [*(weights or []), *(more_weights or [])]
    with user_errors():
        from hnmix.analyze.run import analyze as run_analyze

        report = run_analyze(load_config(AnalyzeConfig, config, overrides, set_),
                             Console(stderr=True) if as_json else None)
        if as_json:
            typer.echo(json.dumps(report, indent=2))


# --------------------------------------------------------------------------------- compare


from hnmix.compare.config import CompareConfig as C  # noqa: E402  (pydantic only: no torch import)


@app.command()
def compare(
    config: Annotated[str | None, field_option(C, "config", "--config")] = None,
    grid: Annotated[list[str] | None, field_option(C, "grid", "--grid", metavar="KEY=V1,V2")] = None,
    set_: Annotated[list[str] | None, field_option(C, "sets", "--set", metavar="KEY=VALUE")] = None,
    output: Annotated[str | None, field_option(C, "output", "--output", "-o")] = None,
    baseline: Annotated[str | None, field_option(C, "baseline", "--baseline", metavar="KEY=VALUE")] = None,
    probe: Annotated[str | None, field_option(C, "probe", "--probe")] = None,
    analyze: Annotated[bool | None, field_option(C, "analyze", "--analyze/--no-analyze")] = None,
    analyze_set: Annotated[list[str] | None, field_option(C, "analyze_sets", "--analyze-set",
                                                          metavar="KEY=VALUE")] = None,
    allow_budget_grid: Annotated[bool, field_option(C, "allow_budget_grid", "--allow-budget-grid")] = False,
    dry_run: Annotated[bool, field_option(C, "dry_run", "--dry-run")] = False,
    report_only: Annotated[bool, field_option(C, "report_only", "--report-only")] = False,
    results_doc: Annotated[str | None, field_option(C, "results_doc", "--results-doc")] = None,
    dataset_name: Annotated[str | None, field_option(C, "dataset_name", "--dataset-name")] = None,
) -> None:
    """Compare methods at equal budget: one pretrain run per grid point, mean +- std over seeds, differences
    to a baseline with 95 % confidence intervals, and the papers' claims marked reproduced or not.

    Example: hnmix compare --config examples/demo.yaml --grid method=moco,mochi --grid seed=0,1,2 -o runs/cmp
    """
    overrides = {k: v for k, v in locals().items() if k not in ("set_", "analyze_set")}
    overrides.update(sets=set_, analyze_sets=analyze_set)
    with user_errors():
        from hnmix.compare import run_compare

        run_compare(load_config(C, None, overrides))


# --------------------------------------------------------------------------------- convert / detection


# pydantic models only: importing them loads neither torch nor detectron2
from hnmix.detection.config import ConvertConfig  # noqa: E402
from hnmix.detection.config import TransferDetectConfig as DetectCfg  # noqa: E402


@app.command()
def convert(
    weights: Annotated[str | None, field_option(ConvertConfig, "weights", "--weights", "-w")] = None,
    to: Annotated[str | None, field_option(ConvertConfig, "to", "--to")] = None,
    output: Annotated[str | None, field_option(ConvertConfig, "output", "--output", "-o")] = None,
    arch: Annotated[str | None, field_option(ConvertConfig, "arch", "--arch")] = None,
) -> None:
    """Export a pretrained backbone to detectron2 (.pkl + the config keys it needs), timm or torchvision.

    Example: hnmix convert --weights runs/pretrain/last.pt --to detectron2 --output r50.pkl
    """
    with user_errors():
        if weights is None or output is None:
            raise HnmixError("convert needs --weights FILE and --output FILE")
        cfg = load_config(ConvertConfig, None, {"weights": weights, "to": to, "output": output, "arch": arch})
        from hnmix.models.export import convert as run_convert

        result = run_convert(cfg.weights, cfg.to, cfg.output, cfg.arch)
        console = Console()
        console.print(f"wrote {result.output} ({result.target}, {result.arch or 'arch unknown'}, "
                      f"from a {result.source} file)", highlight=False)
        if result.settings_file is not None:
            import yaml

            console.print(f"detectron2 config keys these weights need (also in {result.settings_file}):")
            console.print(yaml.safe_dump(result.settings, sort_keys=False, default_flow_style=None).rstrip(), highlight=False)


@app.command("transfer-detect")
def transfer_detect(
    task: Annotated[str, typer.Argument(help="voc (Faster R-CNN, VOC AP) or coco (Mask R-CNN, COCO AP)")],
    data: Annotated[str | None, field_option(DetectCfg, "data", "--data")] = None,
    images: Annotated[str | None, field_option(DetectCfg, "images", "--images")] = None,
    annotations: Annotated[str | None, field_option(DetectCfg, "annotations", "--annotations")] = None,
    val_images: Annotated[str | None, field_option(DetectCfg, "val_images", "--val-images")] = None,
    val_annotations: Annotated[str | None, field_option(DetectCfg, "val_annotations", "--val-annotations")] = None,
    weights: Annotated[str | None, field_option(DetectCfg, "weights", "--weights", "-w")] = None,
    recipe: Annotated[str | None, field_option(DetectCfg, "recipe", "--recipe")] = None,
    masks: Annotated[bool | None, field_option(DetectCfg, "masks", "--masks/--no-masks")] = None,
    iters: Annotated[int | None, field_option(DetectCfg, "iters", "--iters")] = None,
    batch_size: Annotated[int | None, field_option(DetectCfg, "batch_size", "--batch-size")] = None,
    lr: Annotated[float | None, field_option(DetectCfg, "lr", "--lr")] = None,
    input_size: Annotated[int | None, field_option(DetectCfg, "input_size", "--input-size")] = None,
    smoke: Annotated[bool | None, field_option(DetectCfg, "smoke", "--smoke/--no-smoke")] = None,
    num_gpus: Annotated[int | None, field_option(DetectCfg, "num_gpus", "--num-gpus")] = None,
    device: Annotated[str | None, field_option(DetectCfg, "device", "--device")] = None,
    workers: Annotated[int | None, field_option(DetectCfg, "workers", "--workers")] = None,
    trials: Annotated[int | None, field_option(DetectCfg, "trials", "--trials")] = None,
    seed: Annotated[int | None, field_option(DetectCfg, "seed", "--seed")] = None,
    val_fraction: Annotated[float | None, field_option(DetectCfg, "val_fraction", "--val-fraction")] = None,
    split_seed: Annotated[int | None, field_option(DetectCfg, "split_seed", "--split-seed")] = None,
    output: Annotated[str | None, field_option(DetectCfg, "output", "--output", "-o")] = None,
    resume: Annotated[bool | None, field_option(DetectCfg, "resume", "--resume/--no-resume")] = None,
    eval_only: Annotated[bool | None, field_option(DetectCfg, "eval_only", "--eval-only/--no-eval-only")] = None,
    verbose: Annotated[bool | None, field_option(DetectCfg, "verbose", "--verbose/--quiet")] = None,
    config: ConfigOpt = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="raw detectron2 config override KEY=VALUE, e.g. --set MODEL.RPN.POST_NMS_TOPK_TEST=100 "
        "(repeatable)")] = None,
) -> None:
    """Fine-tune and evaluate on detection with detectron2: the MoCo recipes (VOC R50-C4, COCO Mask R-CNN).

    Example: hnmix transfer-detect voc --data datasets/ --weights r50.pkl --trials 5
    """
    overrides = {k: v for k, v in locals().items() if k not in ("config", "set_")}
    overrides["d2_sets"] = set_ or None
    with user_errors():
        cfg = load_config(DetectCfg, config, overrides)
        from hnmix.detection.train import transfer_detect as run_transfer

        run_transfer(cfg)


@app.command()
def doctor() -> None:
    """Check the installation: versions of torch, CUDA, GPU, timm, pydantic, detectron2 (and its C++ ops)."""
    from hnmix.doctor import run_doctor

    raise typer.Exit(run_doctor())


@app.command()
def bench(
    arch: Annotated[str | None, field_option(P, "arch", "--arch")] = None,
    cifar_stem: Annotated[bool | None, field_option(P, "cifar_stem", "--cifar-stem/--no-cifar-stem")] = None,
    image_size: Annotated[int | None, field_option(P, "image_size", "--image-size")] = None,
    batch_size: Annotated[int | None, field_option(P, "batch_size", "--batch-size")] = None,
    method: Annotated[str | None, field_option(P, "method", "--method")] = None,
    n_hard: Annotated[int | None, field_option(P, "n_hard", "--N")] = None,
    s: Annotated[int | None, field_option(P, "s", "--s")] = None,
    s_prime: Annotated[int | None, field_option(P, "s_prime", "--s-prime")] = None,
    queue_size: Annotated[int | None, field_option(P, "queue_size", "--queue-size", "-K")] = None,
    data: Annotated[str | None, field_option(B, "data", "--data")] = None,
    data_on_gpu: Annotated[str | None, field_option(P, "data_on_gpu", "--data-on-gpu")] = None,
    workers: Annotated[int | None, field_option(P, "workers", "--workers")] = None,
    steps: Annotated[int | None, field_option(B, "steps", "--steps")] = None,
    warmup: Annotated[int | None, field_option(B, "warmup", "--warmup")] = None,
    repeats: Annotated[int | None, field_option(B, "repeats", "--repeats")] = None,
    ceiling: Annotated[bool | None, field_option(B, "ceiling", "--ceiling/--no-ceiling")] = None,
    mochi_naive: Annotated[bool | None, field_option(B, "mochi_naive", "--mochi-naive/--mochi-fused")] = None,
    device: Annotated[str | None, field_option(P, "device", "--device")] = None,
    precision: Annotated[str | None, field_option(P, "precision", "--precision")] = None,
    compile: Annotated[bool | None, field_option(P, "compile", "--compile/--no-compile")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object instead of the table")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Time the pretraining step: img/s, ms/step, peak memory, and the compute ceiling (synthetic views).

    It runs the real step of `hnmix pretrain` (same model, method, precision, data source), excludes the
    warm-up and synchronises the device. Any pretrain setting can be given with --set key=value.

    Example: hnmix bench --arch resnet18 --cifar-stem --image-size 32 --batch-size 512 --method mochi
    """
    overrides = {k: v for k, v in locals().items() if k not in ("config", "set_", "as_json")}
    with user_errors():
        from hnmix.bench import bench as run_bench

        cfg = load_config(BenchConfig, config, overrides, set_)
        run_bench(cfg, as_json)


def main() -> None:
    try:
        app()
    except SystemExit as e:
        sys.exit(e.code)
