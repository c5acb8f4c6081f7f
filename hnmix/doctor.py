"""`hnmix doctor`: what is installed, whether it works, and what to do about each problem.

Exit 0 when the core (torch, torchvision, timm, pydantic: pretraining and convert) works; a missing GPU
or detectron2 is reported with a hint but only limits transfer-detect / speed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
import sys
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

from hnmix.detection import INSTALL_HINT


@dataclass
class Check:
    name: str
    status: str  # "ok" | "warn" | "fail"
    detail: str
    hint: str = ""


def _version(module: str) -> tuple[object | None, str]:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        return None, "not installed" if e.name == module else f"needs missing module {e.name}"
    except Exception as e:  # ImportError, or a broken binary raising OSError/RuntimeError on import
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        version = getattr(mod, "__version__", None) or importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    return mod, version


def _core(name: str, module: str, hint: str) -> tuple[Check, object | None]:
    mod, detail = _version(module)
    return Check(name, "ok" if mod else "fail", detail, "" if mod else hint), mod


def _gpu_checks(torch) -> list[Check]:
    cuda = torch.version.cuda
    if not torch.cuda.is_available():
        hint = ("CPU-only torch build: install a CUDA wheel from pytorch.org for GPU training" if cuda is None
                else "no usable GPU/driver: check nvidia-smi and that the driver supports CUDA " + cuda)
        return [Check("CUDA", "warn", f"built for {cuda or 'CPU only'}, no GPU available", hint)]
    checks = [Check("CUDA", "ok", f"{cuda}, {torch.cuda.device_count()} GPU(s), cuDNN {torch.backends.cudnn.version()}")]
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        arch_ok = f"sm_{major}{minor}" in torch.cuda.get_arch_list() or not torch.cuda.get_arch_list()
        checks.append(Check(f"GPU {i}", "ok" if arch_ok else "warn",
                            f"{torch.cuda.get_device_name(i)}, capability {major}.{minor}",
                            "" if arch_ok else f"torch was not compiled for sm_{major}{minor}: install a newer wheel"))
    return checks


def _detectron2_checks(torch) -> list[Check]:
    mod, detail = _version("detectron2")
    if mod is None:
        return [Check("detectron2", "warn", detail,
                      f"needed by transfer-detect only: {INSTALL_HINT}")]
    checks = [Check("detectron2", "ok", f"{detail} ({mod.__path__[0]})")]
    try:
        from detectron2 import _C

        ops = Check("detectron2 C++ ops", "ok", "load")
        if torch.cuda.is_available() and hasattr(_C, "get_cuda_version") and _C.get_cuda_version() == 0:
            ops = Check("detectron2 C++ ops", "warn", "load, but built without CUDA",
                        "rebuild detectron2 with the CUDA toolkit visible (FORCE_CUDA=1) for GPU ROIAlign/NMS")
    except ImportError as e:
        ops = Check("detectron2 C++ ops", "warn", str(e).splitlines()[0],
                    f"detectron2 was built against another torch: reinstall it: {INSTALL_HINT}")
    checks.append(ops)
    pycoco, detail = _version("pycocotools")
    checks.append(Check("pycocotools", "ok" if pycoco else "warn", detail,
                        "" if pycoco else "needed for COCO evaluation: pip install pycocotools"))
    return checks


def collect() -> list[Check]:
    checks = [Check("python", "ok", f"{platform.python_version()} ({sys.executable})")]
    torch_check, torch = _core("torch", "torch", "pip install torch (see pytorch.org for the CUDA build)")
    checks.append(torch_check)
    for name, hint in (("torchvision", "pip install torchvision matching your torch"), ("timm", "pip install timm"),
                       ("pydantic", "pip install 'pydantic>=2.5'"), ("typer", "pip install typer"),
                       ("rich", "pip install rich")):
        checks.append(_core(name, name, hint)[0])
    if torch is not None:
        checks += _gpu_checks(torch)
        checks.append(_smoke_test())
        checks += _detectron2_checks(torch)
    return checks


def _smoke_test() -> Check:
    """The core path: build a timm backbone and run it once."""
    try:
        import torch

        from hnmix.models.backbone import create_backbone

        with torch.no_grad():
            out = create_backbone("resnet18").eval()(torch.zeros(1, 3, 64, 64))
        return Check("core smoke test", "ok", f"timm resnet18 forward -> {tuple(out.shape)}")
    except Exception as e:  # any failure here means the core does not work
        return Check("core smoke test", "fail", f"{type(e).__name__}: {e}", "reinstall torch/timm")


def run_doctor(console: Console | None = None) -> int:
    console = console or Console()
    checks = collect()
    table = Table(title="hnmix doctor")
    for col in ("component", "", "version / state", "hint"):
        table.add_column(col, overflow="fold")
    marks = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[red]FAIL[/]"}
    for c in checks:
        table.add_row(c.name, marks[c.status], c.detail, c.hint)
    console.print(table)
    failed = [c.name for c in checks if c.status == "fail"]
    if failed:
        console.print(f"[red]core problem:[/] {', '.join(failed)}")
        return 1
    console.print("core works" + (" (see warnings for GPU / detectron2)" if any(c.status == "warn" for c in checks)
                                  else ""))
    return 0
