"""The structure holds: imports point down the layers, a new method is one file plus one registry line, user
weight files never execute code."""

import ast
import json
import pickle
from pathlib import Path

import pytest
import torch
from helpers import ROOT, TINY
from pydantic import Field
from typer.testing import CliRunner

import hnmix.negatives as negatives
from hnmix.negatives.base import Method, MethodSettings, Negatives

# lower number = lower layer; a module may import its own layer and the ones below
LAYERS = {"errors": 0, "core": 0, "data": 1, "models": 1, "negatives": 1, "config": 2, "train": 3, "eval": 4,
          "analyze": 5, "detection": 5, "bench": 5, "compare": 6, "launch": 6, "doctor": 6, "cliopts": 6, "cli": 7,
          "__main__": 8, "__init__": 0}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_imports_point_down_the_layers():
    upward = []
    for path in sorted((ROOT / "hnmix").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("hnmix"):
                targets = [node.module] if node.module != "hnmix" else [f"hnmix.{a.name}" for a in node.names
                                                                        if a.name in LAYERS]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("hnmix")]
            else:
                continue
            for target in targets:
                if target != "hnmix" and layer_of(target) > layer_of(module):
                    upward.append(f"{module} imports {target}")
    assert not upward, upward


# ------------------------------------------------------------------------------- a method in one file


class ToySettings(MethodSettings):
    """A toy method: one synthetic negative per query, the query's mirror scaled by --toy-scale."""

    scale: float = Field(0.5, gt=0, description="how close the mirrored query sits")

    def describe(self) -> str:
        return f"mirror x {self.scale}"


def toy_strategy(settings: ToySettings):
    def hard_negatives(q, queue, l_neg, *, generator, epoch) -> Negatives:
        return Negatives(extra=-settings.scale * (q * q.detach()).sum(1, keepdim=True))

    return hard_negatives


TOY = Method("toy", "a mirrored query as the one hard negative", "Toy (--method toy)", ToySettings, toy_strategy)


def test_a_method_is_one_file_and_one_registry_line(monkeypatch, tmp_path):
    from hnmix.cli import build_app
    from hnmix.config import BenchBase, PretrainBase, with_methods

    monkeypatch.setitem(negatives.METHODS, "toy", TOY)  # the registry line
    app = build_app(with_methods(PretrainBase, negatives.METHODS, "PretrainConfig"),
                    with_methods(BenchBase, negatives.METHODS, "BenchConfig"))
    runner = CliRunner()
    help_text = runner.invoke(app, ["pretrain", "--help"], terminal_width=200).output
    assert "Toy (--method toy):" in help_text and "--toy-scale FLOAT" in help_text
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", "demo", *TINY, "--epochs", "1", "--max-steps", "2",
                                 "--method", "toy", "--toy-scale", "0.25", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "toy (mirror x 0.25)" in result.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["logit_syn"] == pytest.approx(-0.25) for r in records)  # q.q = 1 for unit queries
    bad = runner.invoke(app, ["pretrain", "--method", "toy", "--toy-scale", "0"])
    assert bad.exit_code == 2 and "--toy-scale:" in bad.stderr


# ------------------------------------------------------------------------------------- safe loading


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_weight_files_never_run_code(tmp_path):
    from hnmix.core.io import load_arrays_pickle, load_torch_dict
    from hnmix.errors import HnmixError

    marker = tmp_path / "code-ran"
    pkl = tmp_path / "evil.pkl"
    pkl.write_bytes(pickle.dumps({"model": {"w": Payload(marker)}, "__author__": "x"}))
    with pytest.raises(HnmixError, match="evil.pkl is not a plain pickle of arrays"):
        load_arrays_pickle(pkl)
    pt = tmp_path / "evil.pth"
    torch.save({"model": {"w": Payload(marker)}}, pt)
    with pytest.raises(HnmixError, match=r"evil.pth holds a pickled \w*getattr, not only tensors"):
        load_torch_dict(pt)
    assert not marker.exists()
    import numpy as np

    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps({"model": {"w": np.arange(3.0)}, "__author__": "hnmix", "matching_heuristics": True}))
    assert load_arrays_pickle(good)["model"]["w"].tolist() == [0.0, 1.0, 2.0]
