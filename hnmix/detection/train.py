"""`hnmix transfer-detect`: fine-tune and evaluate with detectron2's DefaultTrainer, N seeded trials.

The parent process plans data and weights (bad input fails here, as one line); each trial runs through
detectron2's ``launch`` (in-process for one GPU/CPU, spawned workers otherwise), whose main rank writes
``trial_results.json`` for the parent to collect into ``results.json`` and the summary table.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hnmix.core.log import progress_bar
from hnmix.core.stop import SignalFlag
from hnmix.detection import require_detectron2
from hnmix.detection.config import TransferDetectConfig
from hnmix.detection.datasets import DatasetPlan, plan_coco, plan_voc
from hnmix.detection.weights import DetectionWeights, resolve_weights
from hnmix.errors import HnmixError

console = Console()


class DetectStopped(BaseException):
    """Raised inside detectron2's loop after a stop signal (a BaseException: its `except Exception` logs and
    swallows nothing here); carries where the run was saved."""

    def __init__(self, iteration: int, checkpoint: str):
        super().__init__(iteration, checkpoint)
        self.iteration, self.checkpoint = iteration, checkpoint


STOP = SignalFlag(what="stopping after this iteration and saving a checkpoint")
METRICS = ("AP", "AP50", "AP75")
TRIAL_RESULTS = "trial_results.json"


@dataclass
class TrialJob:
    """Everything a (possibly spawned) trial process needs; plain data so it pickles."""

    settings: TransferDetectConfig
    plan: DatasetPlan
    weights: DetectionWeights
    device: str
    seed: int
    output_dir: str


def quiet_third_party(verbose: bool) -> None:
    """torch/detectron2 deprecation chatter would break the progress display; log.txt keeps detectron2's log."""
    if verbose:
        return
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(torch|torchvision|detectron2|fvcore)\b")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


def _setup_logging(output_dir: str, rank: int, verbose: bool) -> None:
    """detectron2's logger to <output>/log.txt; on the console only with --verbose (rich shows progress)."""
    from detectron2.utils.logger import setup_logger

    for name in ("detectron2", "fvcore"):
        logging.getLogger(name).handlers.clear()  # a previous trial's log.txt must not get this one's log
    setup_logger.cache_clear()
    setup_logger(output_dir, distributed_rank=rank, name="fvcore", configure_stdout=verbose)
    setup_logger(output_dir, distributed_rank=rank, configure_stdout=verbose)


def _trainer_class(job_verbose: bool = False):
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultTrainer, HookBase
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
    from detectron2.utils import comm

    class Progress(HookBase):
        """A live bar in a terminal, plain lines in a log file; a stop signal saves the iteration and ends."""

        def before_train(self):
            self.bar = progress_bar(console, "fine-tune", "{task.fields[loss]}")
            self.task = self.bar.add_task("", total=self.trainer.max_iter, completed=self.trainer.start_iter, loss="")
            self.bar.start()
            self.every = max(20, self.trainer.max_iter // 20)
            self.started = time.perf_counter()
            if not console.is_terminal:
                console.print(f"fine-tuning from iteration {self.trainer.start_iter} to {self.trainer.max_iter}",
                              highlight=False)

        def after_step(self):
            done = self.trainer.iter + 1
            hist = self.trainer.storage.histories().get("total_loss")
            loss = f"loss {hist.median(20):.3f}" if hist else ""
            self.bar.update(self.task, completed=done, loss=loss)
            if not console.is_terminal and (done % self.every == 0 or done == self.trainer.max_iter):
                rate = (done - self.trainer.start_iter) / max(time.perf_counter() - self.started, 1e-9)
                eta = (self.trainer.max_iter - done) / max(rate, 1e-9)
                console.print(f"iteration {done}/{self.trainer.max_iter}  {loss}  {rate:.2f} it/s  ETA "
                              f"{eta / 60:.0f} min", highlight=False)
            if STOP.signal is not None:  # finish this iteration, save it, then stop (as pretrain does)
                name = f"model_{self.trainer.iter:07d}"
                self.trainer.checkpointer.save(name, iteration=self.trainer.iter)
                raise DetectStopped(done, str(Path(self.trainer.cfg.OUTPUT_DIR) / f"{name}.pth"))
            if done == self.trainer.max_iter:
                self.bar.stop()  # precise BN and evaluation follow; their status lines need the console

        def after_train(self):
            self.bar.stop()

    class Trainer(DefaultTrainer):
        @classmethod
        def build_evaluator(cls, cfg, dataset_name, output_folder=None):
            if MetadataCatalog.get(dataset_name).get("evaluator_type") == "pascal_voc":
                return PascalVOCDetectionEvaluator(dataset_name)
            return COCOEvaluator(dataset_name, output_dir=output_folder or str(Path(cfg.OUTPUT_DIR) / "inference"))

        @classmethod
        def test(cls, cfg, model, evaluators=None):
            if not comm.is_main_process() or job_verbose:
                return super().test(cfg, model, evaluators)
            # pycocotools prints its tables: keep them in log.txt, not between the progress lines
            status = Console(file=sys.stdout).status(f"evaluating on {', '.join(cfg.DATASETS.TEST)} ...")
            with status, contextlib.redirect_stdout(io.StringIO()) as captured:
                results = super().test(cfg, model, evaluators)
            logging.getLogger("detectron2").info("evaluator output:\n%s", captured.getvalue())
            return results

        def build_hooks(self):
            return [*super().build_hooks(), Progress()] if comm.is_main_process() else super().build_hooks()

    return Trainer


def run_trial(job: TrialJob) -> None:
    """One fine-tune + evaluation; called by detectron2's launch in every process."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.utils import comm
    from detectron2.utils.env import seed_all_rng

    from hnmix.detection.recipes import build_detectron2_config

    s = job.settings
    quiet_third_party(s.verbose)
    job.plan.register()
    cfg, _ = build_detectron2_config(
        s.task, s.recipe_name, num_classes=len(job.plan.classes), train=job.plan.train, test=job.plan.test,
        masks=job.plan.masks, weights_path=job.weights.path, weights_settings=job.weights.settings,
        output_dir=job.output_dir, seed=job.seed, device=job.device, world_size=comm.get_world_size(),
        batch_size=s.batch_size, lr=s.lr, iters=s.iters, input_size=s.input_size, workers=s.workers,
        smoke=s.smoke, overrides=s.d2_overrides)
    cfg.freeze()
    rank = comm.get_rank()
    Path(job.output_dir).mkdir(parents=True, exist_ok=True)
    _setup_logging(job.output_dir, rank, s.verbose)
    if comm.is_main_process():
        (Path(job.output_dir) / "config.yaml").write_text(cfg.dump())  # what detectron2's default_setup saves
    seed_all_rng(job.seed + rank)
    torch.backends.cudnn.benchmark = False

    Trainer = _trainer_class(s.verbose)
    if s.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=s.resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=s.resume)
        trainer.train()
        # DefaultTrainer.train() returns the results only with TEST.EXPECTED_RESULTS; EvalHook keeps them here
        results = getattr(trainer, "_last_eval_results", None)
    if comm.is_main_process():
        metrics = {task: {m: _number(v.get(m)) for m in METRICS} for task, v in (results or {}).items()
                   if isinstance(v, dict) and task in ("bbox", "segm")}
        record = {"seed": job.seed, "output": job.output_dir, **metrics}
        (Path(job.output_dir) / TRIAL_RESULTS).write_text(json.dumps(record, indent=2))


def _number(v: Any) -> float | None:
    """JSON-safe metric: COCO gives NaN when a model predicts nothing at all."""
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(float(v), 4)


def aggregate(trials: list[dict]) -> tuple[dict, dict]:
    """Mean and sample std (n-1) over trials, per task and metric; std is None for one trial."""
    mean, std = {}, {}
    for task in ("bbox", "segm"):
        if not any(task in t for t in trials):
            continue
        mean[task], std[task] = {}, {}
        for m in METRICS:
            vals = [t[task][m] for t in trials if t.get(task, {}).get(m) is not None]
            mean[task][m] = round(statistics.fmean(vals), 4) if vals else None
            std[task][m] = round(statistics.stdev(vals), 4) if len(vals) > 1 else None
    return mean, std


def _device(choice: str, num_gpus: int) -> str:
    import torch

    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise HnmixError("--device cuda but torch sees no CUDA GPU (see `hnmix doctor`)")
        if num_gpus > torch.cuda.device_count():
            raise HnmixError(f"--num-gpus {num_gpus} but only {torch.cuda.device_count()} GPU(s) are visible")
        return "cuda"
    if num_gpus > 1:
        raise HnmixError("--num-gpus > 1 needs CUDA GPUs; torch sees none")
    return "cpu"


def plan_dataset(s: TransferDetectConfig, output: Path) -> DatasetPlan:
    if s.task == "voc":
        return plan_voc(s.data, output, s.val_fraction, s.split_seed)
    return plan_coco(output, s.data, s.images, s.annotations, s.val_images, s.val_annotations, s.masks,
                     s.val_fraction, s.split_seed)


def transfer_detect(s: TransferDetectConfig) -> dict:
    quiet_third_party(s.verbose)
    require_detectron2()

    output = Path(s.output)
    output.mkdir(parents=True, exist_ok=True)
    plan = plan_dataset(s, output)
    weights = resolve_weights(s.weights, output)
    device = _device(s.device, s.num_gpus)
    # validate the config once here, so a bad --set fails before any process is spawned
    from hnmix.detection.recipes import build_detectron2_config

    cfg, cfg_notes = build_detectron2_config(
        s.task, s.recipe_name, num_classes=len(plan.classes), train=plan.train, test=plan.test, masks=plan.masks,
        weights_path=weights.path, weights_settings=weights.settings, output_dir=str(output), seed=s.seed,
        device=device, world_size=s.num_gpus, batch_size=s.batch_size, lr=s.lr, iters=s.iters,
        input_size=s.input_size, workers=s.workers, smoke=s.smoke, overrides=s.d2_overrides)
    model = "Mask R-CNN" if cfg.MODEL.MASK_ON else "Faster R-CNN"
    head = "FPN" if "fpn" in cfg.MODEL.BACKBONE.NAME else "C4"
    schedule = ("evaluation only" if s.eval_only else f"{cfg.SOLVER.MAX_ITER} iters, batch "
                f"{cfg.SOLVER.IMS_PER_BATCH}, LR {cfg.SOLVER.BASE_LR:g}")
    console.print(f"[bold]{s.task}[/] {model} R{cfg.MODEL.RESNETS.DEPTH}-{head} ({s.recipe_name}) on {device}: "
                  f"{schedule}, {s.trials} trial(s)", highlight=False)
    console.print(f"data: {plan.summary}\nweights: {weights.description}", highlight=False)
    for note in plan.notes + weights.notes + cfg_notes:
        console.print(f"  [yellow]note:[/] {note}", highlight=False)

    trials = []
    with STOP:
        for i in range(s.trials):
            if STOP.signal is not None:  # the signal came during an evaluation: stop between trials
                raise STOP.stopped(f"after trial {i} of {s.trials}: its results are in {output}; rerun the "
                                   "remaining trials with --trials and --seed")
            trials.append(run_one_trial(s, i, plan, weights, device, output))

    mean, std = aggregate(trials)

    results = {"task": s.task, "recipe": s.recipe_name, "model": f"{model} R{cfg.MODEL.RESNETS.DEPTH}-{head}",
               "dataset": plan.summary, "classes": len(plan.classes), "weights": weights.description,
               "iters": cfg.SOLVER.MAX_ITER, "batch_size": cfg.SOLVER.IMS_PER_BATCH, "device": device,
               "eval_only": s.eval_only, "trials": trials, "mean": mean, "std": std,
               "notes": plan.notes + weights.notes + cfg_notes}
    (output / "results.json").write_text(json.dumps(results, indent=2))
    print_summary(results, output)
    return results


def run_one_trial(s: TransferDetectConfig, i: int, plan, weights, device: str, output: Path) -> dict:
    from detectron2.engine import launch

    trial_dir = output if s.trials == 1 else output / f"trial{i}"
    (trial_dir / TRIAL_RESULTS).unlink(missing_ok=True)
    if s.trials > 1:
        console.print(f"[bold]trial {i + 1}/{s.trials}[/] (seed {s.seed + i}) -> {trial_dir}")
    console.print("building the model and the data loaders ...", highlight=False)
    job = TrialJob(s, plan, weights, device, s.seed + i, str(trial_dir))
    try:
        launch(run_trial, s.num_gpus, dist_url="auto", args=(job,))
    except DetectStopped as e:
        again = "" if s.trials == 1 else f" (trials done: {i} of {s.trials})"
        raise STOP.stopped(f"during trial {i + 1} after iteration {e.iteration}: saved {e.checkpoint}{again}; "
                           f"continue with --resume (same --output)") from None
    if not (trial_dir / TRIAL_RESULTS).is_file():
        raise HnmixError(f"trial {i} ended without results; see {trial_dir}/log.txt")
    return json.loads((trial_dir / TRIAL_RESULTS).read_text())


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_summary(results: dict, output: Path) -> None:
    title = f"{results['model']} on {results['task']} ({len(results['trials'])} trial(s))"
    table = Table(title=title, min_width=len(title) + 4)
    table.add_column("metric")
    for t in results["trials"]:
        table.add_column(f"seed {t['seed']}", justify="right")
    if len(results["trials"]) > 1:
        table.add_column("mean ± std", justify="right", style="bold")
    for task, metrics in results["mean"].items():
        for m in METRICS:
            row = [f"{task} {m}", *(_fmt(t.get(task, {}).get(m)) for t in results["trials"])]
            if len(results["trials"]) > 1:
                row.append(f"{_fmt(metrics[m])} ± {_fmt(results['std'][task][m])}")
            table.add_row(*row)
    console.print(table)
    console.print(f"results: {output / 'results.json'}  (detectron2 config.yaml, metrics.json, log.txt beside it)",
                  highlight=False)
