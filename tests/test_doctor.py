"""hnmix doctor: a table of components, exit 0 when the core works, hints for what is missing."""

from __future__ import annotations

import sys

from rich.console import Console
from typer.testing import CliRunner

from hnmix import doctor
from hnmix.cli import app


def _run() -> tuple[int, str]:
    console = Console(record=True, width=200)
    code = doctor.run_doctor(console)
    return code, console.export_text()


def test_doctor_reports_versions_and_passes_here():
    res = CliRunner().invoke(app, ["doctor"])
    assert res.exit_code == 0, res.output
    import timm
    import torch

    for needle in ("torch", "timm", "pydantic", "CUDA", "detectron2"):
        assert needle in res.output
    code, text = _run()
    assert torch.__version__ in text and timm.__version__ in text


def test_missing_detectron2_is_a_hint_not_a_failure(monkeypatch):
    monkeypatch.setitem(sys.modules, "detectron2", None)
    code, text = _run()
    assert code == 0
    assert "not installed" in text and "pip install --no-build-isolation" in text


def test_broken_core_fails(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    monkeypatch.setattr(doctor, "_smoke_test", lambda: doctor.Check("core smoke test", "fail", "boom", "fix it"))
    code, text = _run()
    assert code == 1 and "core problem" in text and "pip install timm" in text


def test_help_of_the_new_commands_renders():
    for command in ("convert", "transfer-detect", "doctor"):
        res = CliRunner().invoke(app, [command, "--help"])
        assert res.exit_code == 0, (command, res.output)
