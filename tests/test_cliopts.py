"""Flags generated from the settings models: every setting has one flag, errors name what the user typed,
help wraps at any width, old config files load, and the README only names flags that exist."""

import re
import subprocess
import sys

import pytest
import yaml
from helpers import ROOT

from hnmix.analyze.config import AnalyzeConfig
from hnmix.cli import app
from hnmix.cliopts import collect_flags, flags_of
from hnmix.compare.config import CompareConfig
from hnmix.config import BenchConfig, PretrainConfig
from hnmix.core.settings import canonical_flag, known_paths, load_config
from hnmix.detection.config import ConvertConfig, TransferDetectConfig
from hnmix.eval.config import LinevalConfig
from hnmix.launch.config import LaunchSettings

COMMANDS = {"pretrain": PretrainConfig, "bench": BenchConfig, "lineval": LinevalConfig, "analyze": AnalyzeConfig,
            "convert": ConvertConfig, "transfer-detect": TransferDetectConfig, "compare": CompareConfig}
EXTRA = {"--json", "--help", "--version"}  # flags that are not settings
LAUNCHER = {"pretrain": flags_of(LaunchSettings)}  # pretrain's --launcher slurm flags (hnmix.launch)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_setting_has_a_flag_in_help(runner, command):
    cls = COMMANDS[command]
    flagged = {p for f in collect_flags(cls) for p in f.paths}
    arguments = {p for p, f in known_paths(cls).items() if (f.json_schema_extra or {}).get("argument")}
    assert set(known_paths(cls)) == flagged | arguments
    text = runner.invoke(app, [command, "--help"], terminal_width=200).output
    for flag in flags_of(cls):
        assert flag in text, flag


def command_snippets(text: str) -> list[str]:
    """The command lines of a Markdown page: lines of fenced code blocks, and `inline code` spans."""
    snippets, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            snippets.append(line.split("#")[0])
        else:
            snippets += re.findall(r"`([^`]*hnmix [^`]*)`", line)
    return snippets


def test_readme_and_docs_name_only_flags_that_exist():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for line in command_snippets(page.read_text()):
            found = re.search(r"\bhnmix (pretrain|bench|lineval|analyze|convert|transfer-detect|compare)\b(.*)", line)
            if not found:
                continue
            command, rest = found.groups()
            known = flags_of(COMMANDS[command]) | EXTRA | LAUNCHER.get(command, set())
            for flag in re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", rest):
                assert flag in known, f"{page.name}: `hnmix {command} ... {flag}` is not a flag of {command}"
                checked += 1
    assert checked > 50  # the pattern really reads the examples


@pytest.mark.parametrize(("args", "named"), [
    (["--s", "-1"], "--s:"), (["--mochi-s", "-1"], "--mochi-s:"), (["-K", "-3"], "-K:"),
    (["--set", "mochi.s=-1"], "--set mochi.s:"), (["--data-on-gpu", "maybe"], "--data-on-gpu:"),
    (["--epochs", "many"], "'--epochs'"), (["--no-such-flag"], "--no-such-flag"),
])
def test_errors_name_the_flag_the_user_typed_in_one_line(runner, args, named):
    result = runner.invoke(app, ["pretrain", "--data", "demo", *args])
    err = result.stderr.strip()
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert len(err.splitlines()) == 1 and err.startswith("error:") and named in err, err


def test_a_switch_is_named_by_the_side_that_gives_the_value(runner):
    assert [canonical_flag(PretrainConfig, ("mlp",), v) for v in (True, False, None)] == ["--mlp", "--no-mlp", "--mlp"]
    assert canonical_flag(BenchConfig, ("mochi_naive",), False) == "--mochi-fused"  # a declared pair
    assert canonical_flag(BenchConfig, ("mochi_naive",)) == "--mochi-naive"
    assert canonical_flag(BenchConfig, ("profile",), False) == "--profile"  # a plain switch has no off flag
    assert canonical_flag(PretrainConfig, ("dim",), False) == "--dim"  # not a switch: a falsy value is no side
    result = runner.invoke(app, ["pretrain", "--no-mlp=1"])
    assert result.exit_code == 2 and "'--no-mlp' does not take a value" in result.stderr


def test_a_flag_shared_by_two_methods_fails_once(runner):
    result = runner.invoke(app, ["pretrain", "--data", "demo", "--N", "-3"])
    assert result.exit_code == 2 and result.stderr.count("--N:") == 1, result.stderr


def test_help_lists_arguments_apart_and_usage_hides_the_catch_all(runner):
    out = runner.invoke(app, ["analyze", "--help"]).stdout
    assert out.splitlines()[0].strip().endswith("analyze [OPTIONS] {METRIC}")
    assert out.count("Options:") <= 1 and "Arguments:" in out


def test_errors_name_the_config_file_key(runner, tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mochi:\n  s_prime: -2\n")
    result = runner.invoke(app, ["pretrain", "--config", str(f)])
    assert result.exit_code == 2 and f"{f}: mochi.s_prime:" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("command", ["", *sorted(COMMANDS), "doctor"])
@pytest.mark.parametrize("width", [60, 80])
def test_help_wraps_and_never_cuts(command, width):
    env = {"COLUMNS": str(width), "PATH": ""}
    done = subprocess.run([sys.executable, "-m", "hnmix", *([command] if command else []), "--help"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "…" not in done.stdout and "<bool>" not in done.stdout and "<str>" not in done.stdout
    too_long = [line for line in lines if len(line) > width and " " in line.strip()]
    assert not too_long, too_long


def test_shared_flag_sets_every_method_that_has_it():
    # --N is MoCHi's N and SynCo's N: one option, both fields
    (shared,) = [f for f in collect_flags(PretrainConfig) if "--N" in f.decls]
    assert set(shared.paths) == {("mochi", "n_hard"), ("synco", "n_hard")}


def test_config_files_of_hnmix_0_1_load_with_a_note(tmp_path, capsys):
    # a7dd545 saved the method options flat
    old = {"method": "synco", "n_hard": 64, "s": 32, "s_prime": 8, "mochi_start_epoch": 2, "queue_size": 512,
           "batch_size": 64, "synco_counts": [1, 2, 3, 4, 5, 6], "synco_start_epoch": 0, "ring_outer": 0.3,
           "ring_anneal": "exp", "data": "demo", "arch": "test_resnet"}
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(old))
    c = load_config(PretrainConfig, f)
    assert (c.mochi.n_hard, c.mochi.s, c.mochi.s_prime, c.mochi.start_epoch) == (64, 32, 8, 2)
    assert (c.synco.n_hard, c.synco.counts, c.synco.start_epoch) == (64, [1, 2, 3, 4, 5, 6], 0)
    assert (c.ring.outer, c.ring.anneal) == (0.3, "exp")
    assert "setting 'synco_counts' is now 'synco.counts'" in capsys.readouterr().err
    saved = c.to_yaml_dict()
    assert "synco" in saved and "mochi" not in saved and "ring" not in saved  # only the method in use
    reloaded = load_config(PretrainConfig, None, saved)
    assert reloaded.synco == c.synco and reloaded.to_yaml_dict() == saved
