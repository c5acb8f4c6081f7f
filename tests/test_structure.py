"""The structure holds: imports point down the layers and never go round in a circle, modules stay short, a
new method or data pipeline is one file plus one registry line, user weight files never execute code."""

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


def module_of(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def import_graph(root: Path) -> dict[str, set[str]]:
    """Every hnmix module -> the hnmix modules it imports, anywhere in its source: at the top, inside
    functions (lazy imports) and relative ones. `from pkg import name` points at pkg.name when that is a
    module, else at pkg."""
    paths = {module_of(p, root): p for p in sorted((root / "hnmix").rglob("*.py"))}
    graph = {}
    for module, path in paths.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in paths else base for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in paths:  # `import hnmix.x.y as z` of a module: the longest known prefix
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
        graph[module] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def test_no_import_cycle_lazy_imports_included(tmp_path):
    graph = import_graph(ROOT)
    assert "hnmix.data.order" in graph["hnmix.data.pipelines.pil"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # the check sees a cycle that only an import inside a function closes, and relative imports
    (tmp_path / "hnmix" / "sub").mkdir(parents=True)
    (tmp_path / "hnmix" / "__init__.py").write_text("")
    (tmp_path / "hnmix" / "sub" / "__init__.py").write_text("")
    (tmp_path / "hnmix" / "a.py").write_text("import hnmix.sub.b as b\n")
    (tmp_path / "hnmix" / "sub" / "b.py").write_text("from . import c\n")
    (tmp_path / "hnmix" / "sub" / "c.py").write_text("def f():\n    from hnmix import a\n")
    assert find_cycle(import_graph(tmp_path)) == ["hnmix.a", "hnmix.sub.b", "hnmix.sub.c", "hnmix.a"]


def test_no_module_over_400_lines():
    long = {module_of(p): n for p in (ROOT / "hnmix").rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


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


# ----------------------------------------------------------------------------- a data pipeline in one file


class CentreViews:
    """A toy pipeline: each image resized whole, the key its mirror; no augmentation, the batch order kept."""

    def __init__(self, images, setup):
        from hnmix.data.normalize import Normalize

        self.images, self.size, self.device = images, setup.image_size, setup.device
        self.normalize = Normalize(channels_last=setup.channels_last).to(setup.device)

    def __call__(self, sampler):
        from torchvision.transforms.functional import pil_to_tensor

        from hnmix.data.pipelines.base import Batch

        for keys in sampler:
            indices = [index for index, _ in keys]
            pixels = torch.stack([pil_to_tensor(self.images.load(i).resize((self.size, self.size)))
                                  for i in indices]).to(self.device)
            labels = torch.tensor([self.images.labels[i] for i in indices], device=self.device)
            yield Batch(self.normalize(pixels), self.normalize(pixels.flip(-1)), labels,
                        torch.zeros(len(indices), dtype=torch.long))


def test_a_pipeline_is_one_file_and_one_registry_line(monkeypatch, tmp_path):
    from hnmix.config import PretrainConfig
    from hnmix.core import dist
    from hnmix.data.order import RunBatches
    from hnmix.data.pipelines import PIPELINES
    from hnmix.data.pipelines.base import Pipeline
    from hnmix.train.data import TrainingData
    from hnmix.train.trainer import Trainer

    monkeypatch.setitem(PIPELINES, "centre", Pipeline("centre", lambda images, setup: (
        CentreViews(images, setup), "whole images, mirrored keys")))  # the registry line
    cfg = PretrainConfig(data="demo", arch="test_resnet", image_size=16, batch_size=8, queue_size=32, dim=16,
                         workers=0, oracle_labels=True, output=str(tmp_path / "run"))
    info = dist.setup("cpu")
    data = TrainingData(cfg, info, pipeline="centre")  # as a resumed run names its checkpoint's pipeline
    assert data.description == "centre: whole images, mirrored keys"
    sampler = RunBatches(len(data), 8, 0, 1, 0, epochs=1, total_steps=2)
    trainer = Trainer(cfg, info, steps_per_epoch=sampler.steps_per_epoch)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    for (im_q, im_k, labels, _), keys in zip(data.batches(sampler), sampler, strict=True):
        assert labels.tolist() == [data.images.labels[i] for i, _ in keys]
        out, _ = trainer.train_step(im_q, im_k, labels, sampler.total, sampler.steps_per_epoch)
        assert out.loss.isfinite()
    assert trainer.step == 2 and any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))


def test_the_pipeline_setting_names_the_registered_pipelines():
    """--pipeline's choices are the registry's (kept in config.py too, so that the CLI starts without
    importing the pipelines)."""
    import typing

    from hnmix.config import PretrainBase
    from hnmix.data.pipelines import PIPELINES

    assert typing.get_args(PretrainBase.model_fields["pipeline"].annotation) == ("auto", *PIPELINES)
    assert all(pipeline.name == name for name, pipeline in PIPELINES.items())
