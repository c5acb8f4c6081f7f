"""`hnmix compare`: grid parsing and naming, the statistics against hand-computed values and tabulated t
quantiles, claim verdicts on synthetic arms, the run commands, and (slow) a real 2 x 2 grid end to end,
rerun, reported with a run missing, and resumed after an interruption."""

import io
import json
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import assert_clean_error, write_images
from rich.console import Console

from hnmix.cli import app
from hnmix.compare import evaluate, stats
from hnmix.compare.claims import CLAIMS, ArmData, GridBudget, judge
from hnmix.compare.config import CompareConfig
from hnmix.compare.grid import cross, parse_axis, parse_baseline, parse_grid
from hnmix.compare.run import run_compare
from hnmix.compare.runs import Interrupted, config_drift, launch, plan_runs, pretrain_command
from hnmix.config import PretrainConfig
from hnmix.core.settings import setting_names
from hnmix.errors import HnmixError

FIELDS = setting_names(PretrainConfig)
# t(0.975, df) from a printed table (three decimals)
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 10: 2.228, 20: 2.086, 30: 2.042}


# ------------------------------------------------------------------------------------------ grid


def test_axis_values_stay_as_typed_and_lists_stay_whole():
    assert parse_axis("lr=0.03, 0.06").texts == ("0.03", "0.06")
    assert parse_axis("cos=true,false").texts == ("true", "false")
    assert parse_axis("synco_counts=[1,2,3,4,5,6],[0,0,0,1,1,1]").texts == ("[1,2,3,4,5,6]", "[0,0,0,1,1,1]")
    assert parse_axis("s-prime=8").key == "s_prime"


@pytest.mark.parametrize("specs, sets, message", [
    (["metod=moco"], [], "unknown setting 'metod' (did you mean 'method'?)"),
    (["method=moco", "method=mochi"], [], "--grid method is given twice"),
    (["epochs=1,2"], [], "--allow-budget-grid"),
    (["data=demo"], [], "every run gets the same budget"),
    (["output=a,b"], [], "compare sets each run's output"),
    (["lr=0.1"], ["lr=0.2"], "lr is both a --grid and a --set"),
    (["method=moco,"], [], "empty value"),
    (["method=moco,moco"], [], "repeated"),
    (["method"], [], "expects key=value1,value2"),
    (["seed=0"], ["output=x"], "compare sets each run's output"),
])
def test_bad_grids_are_refused_with_the_reason(specs, sets, message):
    with pytest.raises(HnmixError) as e:
        parse_grid(specs, FIELDS, sets, allow_budget_grid=False)
    assert message in str(e.value)


def test_budget_grid_allowed_when_asked():
    (axis,) = parse_grid(["epochs=1,2"], FIELDS, [], allow_budget_grid=True)
    assert axis.texts == ("1", "2")


def test_grids_cross_with_seeds_slowest_and_readable_names():
    axes = parse_grid(["method=moco,mochi", "seed=0,1,2"], FIELDS, [], False)
    points = cross(axes)
    assert [p.name for p in points] == [
        "method-moco_seed-0", "method-mochi_seed-0", "method-moco_seed-1", "method-mochi_seed-1",
        "method-moco_seed-2", "method-mochi_seed-2"]
    assert points[3].sets == ["method=mochi", "seed=1"]
    assert points[3].arm.name == "method-mochi" and points[3].seed == "1"
    assert len(cross(parse_grid(["seed=0,1", "lr=0.03,0.06", "cos=true,false"], FIELDS, [], False))) == 8
    assert [p.name for p in cross(parse_grid(["knn_data=/a/b,demo"], FIELDS, [], False))] == [
        "knn_data-a_b", "knn_data-demo"]
    with pytest.raises(Exception, match="share the run name 'knn_data-a_b'"):
        cross(parse_grid(["knn_data=a/b,a_b"], FIELDS, [], False))


def test_baseline_default_explicit_and_refused():
    axes = parse_grid(["seed=0,1", "method=moco,mochi", "lr=0.03,0.06"], FIELDS, [], False)
    assert parse_baseline(None, axes) == {"method": "moco"}
    assert parse_baseline("method=mochi,lr=0.06", axes) == {"method": "mochi", "lr": "0.06"}
    for bad, message in [("method=synco", "not one of the grid's values"), ("seed=0", "other than seed"),
                         ("method", "expects key=value")]:
        with pytest.raises(Exception, match=message):
            parse_baseline(bad, axes)
    assert parse_baseline(None, parse_grid(["seed=0,1"], FIELDS, [], False)) == {}


# ------------------------------------------------------------------------------------------ statistics


def test_mean_and_sample_std_by_hand():
    assert stats.mean([1, 2, 3, 4]) == 2.5
    assert stats.sample_std([1, 2, 3, 4]) == pytest.approx(math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3))
    assert stats.sample_std([7.0]) is None
    assert stats.summary([2.0, 4.0]) == {"mean": 3.0, "std": pytest.approx(math.sqrt(2)), "n": 2, "values": [2.0, 4.0]}


def test_incomplete_beta_against_closed_forms():
    for x in (0.01, 0.2, 0.5, 0.77, 0.99):
        assert stats.regularized_beta(x, 1, 1) == pytest.approx(x, abs=1e-12)
        assert stats.regularized_beta(x, 3, 1) == pytest.approx(x**3, abs=1e-12)
        assert stats.regularized_beta(x, 1, 4) == pytest.approx(1 - (1 - x) ** 4, abs=1e-12)
        assert stats.regularized_beta(x, 0.5, 0.5) == pytest.approx(2 / math.pi * math.asin(math.sqrt(x)), abs=1e-12)
    assert stats.regularized_beta(0.0, 2, 3) == 0.0 and stats.regularized_beta(1.0, 2, 3) == 1.0


def test_t_quantiles_match_the_table_closed_forms_and_the_normal_limit():
    for df, tabulated in T_TABLE.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(tabulated, abs=6e-4), df
    for p in (0.6, 0.9, 0.975, 0.995):
        assert stats.t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
        assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)
        assert stats.t_quantile(1 - p, 7) == pytest.approx(-stats.t_quantile(p, 7), rel=1e-12)
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), abs=1e-5)
    assert T_TABLE[4] > stats.t_quantile(0.975, 4.5) > T_TABLE[5]  # Welch's fractional df lie in between
    assert stats.t_cdf(stats.t_quantile(0.9, 3.3), 3.3) == pytest.approx(0.9, abs=1e-12)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_paired_interval_by_hand():
    arm, base = {0: 36.0, 1: 35.0, 2: 38.0}, {0: 34.0, 1: 35.5, 2: 35.0}
    d = [2.0, -0.5, 3.0]
    sd = math.sqrt(sum((x - 1.5) ** 2 for x in d) / 2)
    half = T_TABLE[2] * sd / math.sqrt(3)
    ci = stats.difference(arm, base)
    assert ci.kind == "paired" and ci.n == 3 and ci.df == 2
    assert ci.diff == pytest.approx(1.5)
    assert (ci.low, ci.high) == (pytest.approx(1.5 - half, abs=2e-3), pytest.approx(1.5 + half, abs=2e-3))
    assert ci.within_noise and ci.describe().startswith("CI [")


def test_welch_interval_by_hand():
    arm, base = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0]  # equal n and variances: df = 2 (n - 1) = 4
    ci = stats.welch_interval(arm, base)
    se = math.sqrt(1 / 3 + 1 / 3)
    assert ci.kind == "welch" and ci.df == pytest.approx(4.0)
    assert ci.low == pytest.approx(-3 - T_TABLE[4] * se, abs=1e-3) and ci.high == pytest.approx(-3 + T_TABLE[4] * se, abs=1e-3)
    assert not ci.within_noise
    # unequal variances: the Welch-Satterthwaite df, computed here from its formula
    a, b = [10.0, 12.0, 11.0, 15.0], [9.0, 9.5]
    v1, v2 = statistics.variance(a) / 4, statistics.variance(b) / 2
    df = (v1 + v2) ** 2 / (v1**2 / 3 + v2**2 / 1)
    ci = stats.welch_interval(a, b)
    assert ci.df == pytest.approx(df)
    assert ci.high - ci.diff == pytest.approx(stats.t_quantile(0.975, df) * math.sqrt(v1 + v2))
    # different seeds: Welch, the same seeds: paired
    assert stats.difference({0: 1.0, 1: 2.0}, {2: 1.0, 3: 3.0}).kind == "welch"
    assert stats.difference({0: 1.0, 1: 2.0}, {1: 1.0, 0: 3.0}).kind == "paired"


def test_one_seed_gives_no_interval_and_says_so():
    for ci in (stats.difference({0: 3.0}, {0: 1.0}), stats.welch_interval([3.0], [1.0, 2.0]), stats.mean_interval([1.0])):
        assert not ci.has_interval and not ci.within_noise and "no interval possible" in ci.note
        assert ci.as_dict()["low"] is None and ci.as_dict()["within_noise"] is None
    assert stats.difference({0: 3.0}, {0: 1.0}).diff == 2.0


def test_zero_spread_gives_no_interval_not_a_zero_width_one():
    # three paired differences that happen to be equal (a kNN accuracy moves in steps of 1/queries) say
    # nothing about the noise: no "better"/"worse" verdict may come from them
    for ci in (stats.difference({0: 2.0, 1: 3.0, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0}),
               stats.welch_interval([1.0, 1.0], [1.0, 1.0])):
        assert not ci.has_interval and not ci.within_noise and "no spread" in ci.note
    assert stats.difference({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}).diff == 1.0


# ------------------------------------------------------------------------------------------ claims


def arms(method_values: dict, metric="knn_top1", extra=None) -> list[ArmData]:
    """ArmData per method from {method: [values by seed]}."""
    out = []
    for method, values in method_values.items():
        arm = ArmData(f"method-{method}", {"method": method, **(extra or {})}, method)
        arm.values[metric] = {str(i): v for i, v in enumerate(values)}
        out.append(arm)
    return out


def claim(claim_id):
    return next(c for c in CLAIMS if c.id == claim_id)


def test_claim_on_another_dataset_is_not_tested_but_shows_what_was_seen():
    (v,) = judge(claim("mochi-in100"), arms({"moco": [30, 31, 32], "mochi": [33, 34, 35]}), GridBudget("demo", 10))
    assert v["status"] == "not tested" and v["reason"].startswith("needs ImageNet-100 (this grid ran on demo)")
    assert "knn_top1 difference +3" in v["reason"]


def linear(method_values: dict) -> list[ArmData]:
    return arms(method_values, metric="linear_top1")


CLEAR, NOISE, OPPOSITE = ({"moco": [30, 31, 32], "mochi": [33, 34.5, 35]}, {"moco": [30, 33, 32], "mochi": [31, 32, 34]},
                          {"moco": [33, 34.5, 35], "mochi": [30, 31, 32]})


@pytest.mark.parametrize("values, grid, status, shortfall", [
    # below the paper's 100 epochs: indicative whatever the interval, the budget ratio named
    (CLEAR, GridBudget("ImageNet-100", 4, "moco"), "indicative", ["4 of 100 epochs"]),
    (NOISE, GridBudget("imagenet100", 99, "moco"), "indicative", ["99 of 100 epochs"]),
    (OPPOSITE, GridBudget("in100", 1, "moco"), "indicative", ["1 of 100 epochs"]),
    # at the budget but not the linear protocol: indicative
    (CLEAR, GridBudget("ImageNet-100", 100, "none"), "indicative",
     ["kNN top-1, not the paper's linear probe (compare --probe moco)"]),
    (CLEAR, GridBudget("ImageNet-100", 200, "moco", max_steps=50), "indicative", ["runs capped at 50 steps"]),
    # at (or above) the claim's budget and protocol: judged
    (CLEAR, GridBudget("ImageNet-100", 100, "moco"), "reproduced", []),
    (CLEAR, GridBudget("imagenet-100", 200, "moco"), "reproduced", []),
    (NOISE, GridBudget("imagenet100", 100, "moco"), "not reproduced", []),
    (OPPOSITE, GridBudget("in100", 100, "moco"), "not reproduced", []),
])
def test_verdicts_respect_the_claims_budget_and_protocol(values, grid, status, shortfall):
    method_values = linear(values) if grid.probe == "moco" else arms(values)
    (v,) = judge(claim("mochi-in100"), method_values, grid)
    assert (v["status"], v["caveats"]) == (status, shortfall)
    assert v["paper_epochs"] == 100 and v["protocol"] == "linear" and "Table 1" in v["budget_source"]
    if values is CLEAR:
        assert v["reason"].endswith("at 3 seeds (paper: +1.0)")
        assert v["reason"].startswith("the claimed direction: " if status == "indicative" else "linear_top1 diff")
    if values is NOISE:
        assert v["reason"].startswith("within noise: CI [") and v["reason"].endswith("contains 0 at 3 seeds")
    if values is OPPOSITE:
        assert v["reason"].startswith("opposite direction")


def test_every_claim_records_its_budget_protocol_and_source():
    for c in CLAIMS:
        assert c.protocol in ("linear", "features", "detection") and c.budget_source
        assert c.paper_epochs is None or c.paper_epochs >= 100
        assert (c.protocol == "linear") == (c.metric == "top1")
    (v,) = judge(claim("ring-cifar"), linear({"moco": [30, 31, 32], "ring": [33, 34.5, 35]}),
                 GridBudget("cifar10", 1000, "moco"))
    assert v["status"] == "indicative" and v["caveats"] == ["1000 epochs; the paper's budget is not in the registry"]


def test_one_seed_is_not_tested_at_any_budget():
    (v,) = judge(claim("mochi-in100"), linear({"moco": [30], "mochi": [33]}), GridBudget("in100", 100, "moco"))
    assert v["status"] == "not tested" and "one seed per arm" in v["reason"]


def test_claim_prefers_the_linear_probe_and_matches_arms_on_the_other_settings():
    grid = arms({"moco": [30, 31, 32], "mochi": [30, 31.5, 31.5]}, extra={"lr": "0.03"})
    grid += arms({"moco": [30, 31, 32], "mochi": [40, 41, 42.5]}, extra={"lr": "0.06"})
    for arm in grid:
        arm.name += f"_lr-{arm.point['lr']}"
        arm.values["linear_top1"] = arm.values["knn_top1"]
        arm.values["probe_top1"] = {s: v - 50 for s, v in arm.values["knn_top1"].items()}
    verdicts = judge(claim("mochi-in100"), grid, GridBudget("imagenet-100", 100, "moco"))
    assert [(v["arm"], v["reference"], v["status"]) for v in verdicts] == [
        ("method-mochi_lr-0.03", "method-moco_lr-0.03", "not reproduced"),
        ("method-mochi_lr-0.06", "method-moco_lr-0.06", "reproduced")]
    assert all(v["metric"] == "linear_top1" and not v["caveats"] for v in verdicts)
    for arm in grid:
        del arm.values["linear_top1"]  # the fast probe next, before kNN: indicative, not judged
    verdicts = judge(claim("mochi-in100"), grid, GridBudget("imagenet-100", 100, "fast"))
    assert all(v["metric"] == "probe_top1" and v["status"] == "indicative" for v in verdicts)
    assert "the fast probe" in verdicts[0]["caveats"][0]


def test_property_claims_are_indicative_off_their_dataset_and_thresholds_work():
    (v,) = judge(claim("mochi-uniformity"), arms({"moco": [-1.40, -1.42, -1.41], "mochi": [-1.50, -1.51, -1.53]},
                                                  metric="uniformity"), GridBudget("demo", 10))
    assert v["status"] == "indicative" and v["caveats"] == ["on demo, not ImageNet-100", "10 of 100 epochs"]
    assert v["reason"].startswith("the claimed direction: uniformity difference -0.103")
    assert "(paper: )" not in v["reason"]  # a claim of direction only quotes no effect size
    fn = claim("mochi-fn")
    at_budget = GridBudget("imagenet-100", 100)
    (v,) = judge(fn, arms({"mochi": [0.010, 0.012, 0.011]}, metric="mochi_fn"), at_budget)
    assert v["status"] == "reproduced" and v["reference"] == "0.02" and "mochi_fn mean 0.011" in v["reason"]
    (v,) = judge(fn, arms({"mochi": [0.030, 0.031, 0.029]}, metric="mochi_fn"), at_budget)
    assert v["status"] == "not reproduced" and v["reason"].startswith("opposite direction")
    (v,) = judge(fn, arms({"mochi": [0.010, 0.030]}, metric="mochi_fn"), at_budget)
    assert v["status"] == "not reproduced" and "contains the threshold 0.02 at 2 seeds" in v["reason"]
    (v,) = judge(fn, arms({"mochi": [0.010, 0.012, 0.011]}, metric="mochi_fn"), GridBudget("imagenet-100", 20))
    assert v["status"] == "indicative" and v["caveats"] == ["20 of 100 epochs"]


def test_claims_the_grid_cannot_test():
    grid = arms({"moco": [30, 31], "mochi": [31, 32]})
    (v,) = judge(claim("synco-moco"), grid, GridBudget("imagenet", 200))
    assert v["status"] == "not tested" and v["reason"] == "the grid has no method=synco arm"
    (v,) = judge(claim("mochi-voc"), grid, GridBudget("imagenet", 200))
    assert v["status"] == "not tested" and "PASCAL VOC detection transfer" in v["reason"]
    (v,) = judge(claim("synco-mochi"), arms({"synco": [1, 2]}), GridBudget("imagenet", 200))
    assert v["reason"].startswith("the grid has no method=mochi arm beside method-synco")
    (v,) = judge(claim("mochi-uniformity"), grid, GridBudget("demo", 10))
    assert v["status"] == "not tested" and v["reason"].startswith("no uniformity measured")


# ------------------------------------------------------------------------------------------ multiplicity


def test_holm_on_a_hand_computed_set():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0] and stats.holm([0.02]) == [0.02] and stats.holm([]) == []


def test_p_values_agree_with_the_intervals():
    for df in (1, 2, 4, 30):
        assert stats.two_sided_p(T_TABLE[df], df) == pytest.approx(0.05, abs=2e-4)  # the table's 3 decimals
    ci = stats.paired_interval({0: 2.0, 1: 3.5, 2: 4.0}, {0: 1.0, 1: 2.0, 2: 2.5})  # diffs 1, 1.5, 1.5
    t = (4 / 3) / (statistics.stdev([1, 1.5, 1.5]) / math.sqrt(3))
    assert ci.p == pytest.approx(2 * stats.t_cdf(-t, 2)) and ci.p < 0.05 and not ci.within_noise


def test_better_or_worse_only_after_holm_over_the_family():
    from hnmix.compare.report import judgement

    diffs = [{"arm": f"a{i}", "baseline": "b", "metric": "knn_top1", "diff": 1.0, "low": 0.1, "high": 1.9,
              "within_noise": False, "p": p} for i, p in enumerate([0.01, 0.04, 0.03, 0.005])]
    diffs.append({"arm": "a4", "baseline": "b", "metric": "uniformity", "diff": 0.0, "low": None, "high": None,
                  "within_noise": None, "p": None, "note": "one seed"})
    stats.holm_family(diffs)
    assert [d["p_holm"] for d in diffs[:4]] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [judgement(d) for d in diffs] == ["better", "within noise after Holm", "within noise after Holm", "better",
                                             "no interval"]
    assert diffs[4]["p_holm"] is None and {d["family"] for d in diffs} == {4}


# ------------------------------------------------------------------------------------------ commands


@pytest.fixture
def demo_base(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": "demo", "arch": "test_resnet", "image_size": 16, "batch_size": 8,
                                    "queue_size": 32, "dim": 16, "epochs": 1, "workers": 0}))
    return base


def test_dry_run_prints_runnable_torchrun_ready_commands(runner, tmp_path, demo_base):
    out = tmp_path / "cmp"
    (out / "method-mochi_seed-0").mkdir(parents=True)  # interrupted before any checkpoint
    (out / "method-moco_seed-1").mkdir()
    (out / "method-moco_seed-1" / "backbone.pt").write_bytes(b"")  # finished
    result = runner.invoke(app, ["compare", "--config", str(demo_base), "--grid", "method=moco,mochi",
                                 "--grid", "seed=0,1", "--set", "s=4", "--set", "n_hard=8", "-o", str(out),
                                 "--dry-run"])
    assert result.exit_code == 0, result.output
    head = f"python -m hnmix pretrain --config {demo_base} --set s=4 --set n_hard=8"
    assert result.stdout.splitlines() == [
        f"{head} --set method=moco --set seed=0 --output {out}/method-moco_seed-0",
        f"{head} --set method=mochi --set seed=0 --output {out}/method-mochi_seed-0 --resume auto",
        f"{head} --set method=mochi --set seed=1 --output {out}/method-mochi_seed-1"]
    assert "method-moco_seed-1: finished, skipped" in result.stderr
    assert not (out / "compare.md").exists()
    from torch.distributed.run import get_args_parser  # the line after 'python' is what torchrun is given

    for line in result.stdout.splitlines():
        words = line.split()
        assert "--s" not in words
        parsed = get_args_parser().parse_args(["--nproc_per_node=2", *words[1:]])
        assert (parsed.training_script, parsed.training_script_args) == ("hnmix", words[3:])


def test_every_setting_is_a_described_flag(runner):
    text = " ".join(runner.invoke(app, ["compare", "--help"], env={"COLUMNS": "300"}).output.split())
    flags = {"sets": "--set", "analyze_sets": "--analyze-set"}
    for name, field in CompareConfig.model_fields.items():
        assert field.description and field.description[:40] in text, name
        assert flags.get(name, "--" + name.replace("_", "-")) in text, name


def test_run_settings_are_checked_before_anything_starts(runner, tmp_path, demo_base):
    result = runner.invoke(app, ["compare", "--config", str(demo_base), "--grid", "method=moco,mocho",
                                 "-o", str(tmp_path / "c"), "--dry-run"])
    assert_clean_error(result, "run method-mocho: invalid settings: --set method: unknown method 'mocho'")
    assert_clean_error(runner.invoke(app, ["compare", "--config", str(demo_base), "--grid", "batch_size=8,16",
                                           "-o", str(tmp_path / "c")]), "--allow-budget-grid")
    assert_clean_error(runner.invoke(app, ["compare", "--grid", "seed=0", "-o", str(tmp_path / "c"), "--dry-run",
                                           "--report-only"]), "--dry-run and --report-only exclude each other")


def test_a_run_made_with_other_settings_is_refused(runner, tmp_path, demo_base):
    cfg = CompareConfig(config=str(demo_base), grid=["seed=0"], output=str(tmp_path / "c"))
    (run,) = plan_runs(cross(parse_grid(cfg.grid, FIELDS, [], False)), Path(cfg.output), cfg.config, [])
    run.dir.mkdir(parents=True)
    saved = run.config.model_dump(mode="json") | {"lr": 0.5, "workers": 7, "resume": "auto", "skip_corrupt": True}
    (run.dir / "config.yaml").write_text(yaml.safe_dump(saved))
    # what a resume may change (the settings' resume policy) is no drift: workers, resume, skip_corrupt
    assert config_drift(run) == ["lr: 0.5 -> 0.03"]
    result = runner.invoke(app, ["compare", "--config", str(demo_base), "--grid", "seed=0", "-o", cfg.output])
    assert_clean_error(result, "was made with other settings (lr: 0.5 -> 0.03)")


CHILD = """
import signal, sys, time
def stop(signum, frame):
    open(sys.argv[1], "w").write(f"saved after signal {signum}")
    sys.exit(130)
signal.signal(signal.SIGINT, stop)
open(sys.argv[1], "w").write("ready")
time.sleep(60)
"""


def test_ctrl_c_is_passed_to_the_run_which_saves_and_compare_stops(tmp_path):
    marker = tmp_path / "marker"

    def press_ctrl_c():
        deadline = time.time() + 30
        while not (marker.is_file() and marker.read_text() == "ready") and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)  # only compare gets it: the child runs in its own session

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=press_ctrl_c, daemon=True).start()
    with pytest.raises(Interrupted) as e:
        launch([sys.executable, "-c", CHILD, str(marker)], tmp_path / "child.log", what="run x")
    assert e.value.exit_code == 130 and str(e.value) == "interrupted during run x"
    assert marker.read_text() == "saved after signal 2"
    assert signal.getsignal(signal.SIGINT) is handler  # compare's handlers are gone


def test_interrupted_grid_says_how_to_continue(runner, tmp_path, demo_base, monkeypatch):
    def interrupted(cmd, log, poll=None, what=""):
        raise Interrupted(f"interrupted during {what}", signal.SIGINT)

    monkeypatch.setattr("hnmix.compare.run.launch", interrupted)
    result = runner.invoke(app, ["compare", "--config", str(demo_base), "--grid", "seed=0,1", "-o", str(tmp_path / "c")])
    assert result.exit_code == 130
    assert "stopped: interrupted during run seed-0; rerun the same command to continue: finished runs are " \
           "skipped, an interrupted one resumes from last.pt" in " ".join(result.output.split())


def test_failed_runs_are_reported_and_the_command_fails(runner, tmp_path, demo_base, monkeypatch):
    def fails(cmd, log, poll=None, what=""):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("error: non-finite loss at step 3\n")
        return 2

    monkeypatch.setattr("hnmix.compare.run.launch", fails)
    out = tmp_path / "c"
    result = runner.invoke(app, ["compare", "--config", str(demo_base), "--grid", "lr=0.03,30", "-o", str(out)])
    assert_clean_error(result, "2 of 2 runs failed (lr-0.03, lr-30): see their pretrain.log")
    report = json.loads((out / "compare.json").read_text())
    assert report["runs"] == [] and report["missing"][1] == {
        "name": "lr-30", "reason": "failed (exit 2): error: non-finite loss at step 3"}
    assert "- `lr-30`: failed (exit 2): error: non-finite loss at step 3" in (out / "compare.md").read_text()


def test_pretrain_command_resumes_only_unfinished_runs(tmp_path, demo_base):
    (run,) = plan_runs(cross(parse_grid(["seed=3"], FIELDS, [], False)), tmp_path, str(demo_base), ["lr=0.1"])
    assert pretrain_command(run, str(demo_base), ["lr=0.1"], python="py") == [
        "py", "-m", "hnmix", "pretrain", "--config", str(demo_base), "--set", "lr=0.1", "--set", "seed=3",
        "--output", str(tmp_path / "seed-3")]
    run.dir.mkdir()
    assert pretrain_command(run, str(demo_base), [])[-2:] == ["--resume", "auto"] and run.state == "unfinished"
    (run.dir / "backbone.pt").write_bytes(b"")
    assert run.state == "finished" and "--resume" not in pretrain_command(run, str(demo_base), [])


# ------------------------------------------------------------------------------------------ end to end

TINY_BASE = {"arch": "test_resnet", "image_size": 16, "batch_size": 8, "queue_size": 32, "dim": 16, "epochs": 2,
             "workers": 0, "knn_every": 1, "keep_every": 1, "log_every": 1, "n_hard": 8, "s": 4, "s_prime": 2}
GRID = ["--grid", "method=moco,mochi", "--grid", "seed=0,1", "--analyze-set", "top_k=8"]
NAMES = ["method-moco_seed-0", "method-mochi_seed-0", "method-moco_seed-1", "method-mochi_seed-1"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A real 2 methods x 2 seeds grid on a tiny labelled folder, through the CLI."""
    from typer.testing import CliRunner

    root = tmp_path_factory.mktemp("compare")
    write_images(root / "data" / "train", 32, classes=["a", "b"])
    write_images(root / "data" / "val", 16, classes=["a", "b"], seed=1)
    base = root / "base.yaml"
    base.write_text(yaml.safe_dump({"data": str(root / "data"), **TINY_BASE}))
    out = root / "cmp"
    result = CliRunner().invoke(app, ["compare", "--config", str(base), *GRID, "-o", str(out),
                                      "--results-doc", str(root / "results.md")])
    assert result.exit_code == 0, result.output
    return root, base, out, result.output


def compare_in_process(base: Path, out: Path, report_only: bool = False) -> tuple[dict, str]:
    """The grid of the fixture again, in this process (its runs and evaluations are still subprocesses)."""
    cfg = CompareConfig(config=str(base), grid=["method=moco,mochi", "seed=0,1"], output=str(out),
                        analyze_sets=["top_k=8"], report_only=report_only)
    console = Console(file=io.StringIO(), width=200)
    report = run_compare(cfg, console)
    return report, console.file.getvalue()


def copy_grid(grid, tmp_path) -> Path:
    root, base, out, _ = grid
    copy = tmp_path / "cmp"
    shutil.copytree(out, copy)
    return copy


@pytest.mark.slow
def test_grid_end_to_end(grid):
    root, base, out, console = grid
    for i, name in enumerate(NAMES, 1):
        assert f"[{i}/4] {name}: starting" in console and (out / name / "backbone.pt").is_file()
        assert "hnmix pretrain" in (out / name / "pretrain.log").read_text()
    assert "epoch 1/2" not in console, "a run's own output goes to its pretrain.log, not the console"
    assert console.count("kNN top-1") >= 4
    report = json.loads((out / "compare.json").read_text())
    assert {p.name for p in out.glob("*.png")} == {"knn_by_epoch.png", "alignment_uniformity.png"}
    assert (out / "compare.md").read_text().startswith("# hnmix compare: cmp")
    assert "### Claims of the seed papers" in (root / "results.md").read_text()

    runs = {r["name"]: r for r in report["runs"]}
    assert list(runs) == NAMES and not report["missing"]
    for name, r in runs.items():  # the final kNN is the monitor's last record, read here independently
        last = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()
                if "knn_top1" in line][-1]
        assert r["knn_source"] == "monitor" and r["metrics"]["knn_top1"] == last["knn_top1"] and last["epoch"] == 2
        assert [p["epoch"] for p in r["curve"]] == [1, 2]
        assert -4 <= r["metrics"]["uniformity"] <= 0 and r["metrics"]["alignment"] >= 0
        assert ("mochi_fn" in r["metrics"]) == (r["method"] == "mochi")

    arms = {a["name"]: a for a in report["arms"]}
    for method in ("moco", "mochi"):
        values = [runs[f"method-{method}_seed-{s}"]["metrics"]["uniformity"] for s in (0, 1)]
        summary = arms[f"method-{method}"]["metrics"]["uniformity"]
        assert summary["mean"] == pytest.approx(statistics.mean(values))
        assert summary["std"] == pytest.approx(statistics.stdev(values)) and summary["n"] == 2
    (diff,) = [d for d in report["differences"] if d["metric"] == "uniformity"]
    d = [runs[f"method-mochi_seed-{s}"]["metrics"]["uniformity"] - runs[f"method-moco_seed-{s}"]["metrics"]["uniformity"]
         for s in (0, 1)]
    half = T_TABLE[1] * statistics.stdev(d) / math.sqrt(2)
    assert (diff["arm"], diff["baseline"], diff["kind"]) == ("method-mochi", "method-moco", "paired")
    assert diff["low"] == pytest.approx(statistics.mean(d) - half, rel=1e-3, abs=1e-6)
    assert diff["within_noise"] == (diff["low"] <= 0 <= diff["high"])

    claims = {c["id"]: c for c in report["claims"]}
    assert set(claims) == {c.id for c in CLAIMS}
    assert claims["mochi-in100"]["status"] == "not tested" and "needs ImageNet-100" in claims["mochi-in100"]["reason"]
    # 2 of the paper's 100 epochs, on other data: never judged, only indicative
    assert claims["mochi-uniformity"]["status"] == "indicative"
    assert "2 of 100 epochs" in claims["mochi-uniformity"]["caveats"]
    assert not {c["status"] for c in claims.values()} & {"reproduced", "not reproduced"}
    md = (out / "compare.md").read_text()
    assert "**reproduced**" not in md and "**not reproduced**" not in md and "Holm–Bonferroni" in md
    for method in ("moco", "mochi"):  # the per-seed values beside mean ± std
        by_seed = arms[f"method-{method}"]["metrics"]["knn_top1"]["by_seed"]
        assert by_seed == {str(s): runs[f"method-{method}_seed-{s}"]["metrics"]["knn_top1"] for s in (0, 1)}


@pytest.mark.slow
def test_results_doc_keeps_the_sections_of_other_grids(grid):
    from hnmix.compare.report import results_doc

    root, _, out, _ = grid
    report = json.loads((out / "compare.json").read_text())
    other = {**report, "settings": {**report["settings"], "output": "runs/other-grid"}, "dataset": "cifar10"}
    doc = results_doc(other, (root / "results.md").read_text())  # a second grid: its section is added
    assert doc.count("<!-- hnmix compare: ") == 2 and doc.index(str(out)) < doc.index("runs/other-grid")
    stale = doc.replace("## cifar10:", "## cifar10 (stale):")
    again = results_doc(other, stale)  # the second grid reruns: its section replaced, the first one kept
    assert "(stale)" not in again and again.count("<!-- hnmix compare: ") == 2
    assert again.split("<!-- hnmix compare: runs/other-grid")[0] == doc.split("<!-- hnmix compare: runs/other-grid")[0]
    assert again.startswith("# Results: the seed papers' claims, rerun")


@pytest.mark.slow
def test_rerun_skips_finished_runs_and_cached_evaluations(grid):
    root, base, out, _ = grid
    logs = {p: p.stat().st_mtime_ns for p in [*out.glob("*/pretrain.log"), out / "analysis.log"]}
    report, console = compare_in_process(base, out)
    assert console.count("skipped (finished)") == 4
    assert logs == {p: p.stat().st_mtime_ns for p in logs}, "nothing was launched again"
    assert [r["metrics"] for r in report["runs"]] == [r["metrics"] for r in json.loads(
        (out / "compare.json").read_text())["runs"]]


@pytest.mark.slow
def test_report_only_lists_an_unfinished_run_as_missing(grid, tmp_path):
    root, base, _, _ = grid
    out = copy_grid(grid, tmp_path)
    (out / "method-mochi_seed-1" / "backbone.pt").unlink()
    report, console = compare_in_process(base, out, report_only=True)
    assert report["missing"] == [{"name": "method-mochi_seed-1", "reason": "unfinished (no backbone.pt)"}]
    assert "missing: method-mochi_seed-1" in console and "starting" not in console
    mochi = next(a for a in report["arms"] if a["name"] == "method-mochi")
    assert mochi["seeds"] == [0] and mochi["metrics"]["knn_top1"]["std"] is None
    diff = next(d for d in report["differences"] if d["metric"] == "knn_top1")
    assert diff["kind"] == "none" and "no interval possible" in diff["note"]
    assert "an arm with one seed: no interval possible" in (out / "compare.md").read_text()


@pytest.mark.slow
def test_interrupted_run_resumes_and_ends_as_if_never_stopped(grid, tmp_path):
    root, base, original, _ = grid
    out = copy_grid(grid, tmp_path)
    run = out / "method-moco_seed-1"
    shutil.copy(run / "epoch_0001.pt", run / "last.pt")  # as if killed during epoch 2
    (run / "backbone.pt").unlink()
    report, console = compare_in_process(base, out)
    assert console.count("skipped (finished)") == 3
    assert "[3/4] method-moco_seed-1: resumed from its last.pt" in console
    assert "resumed from" in (run / "pretrain.log").read_text() and (run / "backbone.pt").is_file()
    before = json.loads((original / "compare.json").read_text())["runs"][2]
    after = report["runs"][2]
    assert after["name"] == before["name"] == "method-moco_seed-1"
    assert after["metrics"] == pytest.approx(before["metrics"]), "a resumed run ends bit-identical"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "knn_top1" not in line]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_without_monitor_knn_comes_from_lineval_and_agrees_and_the_probe_runs(grid, tmp_path):
    root, base, _, _ = grid
    out = copy_grid(grid, tmp_path)
    points = cross(parse_grid(["method=moco,mochi", "seed=0,1"], FIELDS, [], False))
    run = plan_runs(points, out, str(base), [])[1]
    records = evaluate.read_records(run.dir)
    monitor = evaluate.final_monitor_knn(records)
    assert monitor["source"] == "monitor"
    without = [r for r in records if "knn_top1" not in r]
    knn = evaluate.final_knn(run, without)
    assert knn["source"] == "lineval knn" and (run.dir / "lineval-knn" / "lineval.json").is_file()
    assert (knn["top1"], knn["top5"]) == pytest.approx((monitor["top1"], monitor["top5"]))  # same protocol
    probe = evaluate.lineval(run, "fast")  # --probe fast: its own directory beside the kNN one
    assert probe["source"] == "lineval fast" and 0 <= probe["top1"] <= 100
    assert json.loads((run.dir / "lineval-fast" / "lineval.json").read_text())["protocol"] == "fast"
    launches = (run.dir / "eval.log").read_text().count("$ ")
    assert evaluate.final_knn(run, without) == knn and evaluate.lineval(run, "fast") == probe
    assert (run.dir / "eval.log").read_text().count("$ ") == launches, "cached: nothing launched again"


def test_monitor_knn_counts_only_when_it_used_the_runs_eval_transform(tmp_path, demo_base, monkeypatch):
    points = cross(parse_grid(["method=moco", "seed=0"], FIELDS, [], False))
    (run,) = plan_runs(points, tmp_path / "cmp", str(demo_base), [])
    assert run.config.eval_transform == "at-size"  # 16 px
    records = [{"step": 1, "epoch": 1, "knn_top1": 40.0, "knn_top5": 90.0}]
    monkeypatch.setattr(evaluate, "lineval", lambda run, protocol, python=None: {"top1": 1.0, "top5": 2.0,
                                                                                 "source": f"lineval {protocol}"})
    run.dir.mkdir(parents=True)
    (run.dir / "config.yaml").write_text(yaml.safe_dump({"image_size": 16}))  # made before hnmix recorded it
    assert evaluate.monitor_eval_transform(run) == "resize-crop"
    assert evaluate.final_knn(run, records)["source"] == "lineval knn"
    assert not any(d.startswith("eval_transform") for d in config_drift(run))  # re-measured, not refused
    (run.dir / "config.yaml").write_text(yaml.safe_dump({"image_size": 16, "eval_transform": "at-size"}))
    assert evaluate.final_knn(run, records) == {"top1": 40.0, "top5": 90.0, "source": "monitor"}


def test_probe_moco_is_kept_apart_from_the_fast_probe(tmp_path, demo_base, monkeypatch):
    from hnmix.compare.run import measure

    (run,) = plan_runs(cross(parse_grid(["method=moco"], FIELDS, [], False)), tmp_path / "cmp", str(demo_base), [])
    seen = []
    monkeypatch.setattr(evaluate, "lineval", lambda run, protocol, python=None: seen.append(protocol) or {
        "top1": {"knn": 1.0, "fast": 2.0, "moco": 3.0}[protocol], "top5": 9.0, "source": f"lineval {protocol}"})
    for probe, key in (("fast", "probe_top1"), ("moco", "linear_top1")):
        cfg = CompareConfig(config=str(demo_base), grid=["method=moco"], output=str(tmp_path / "cmp"), probe=probe)
        metrics = measure(run, cfg)["metrics"]
        other = ({"probe_top1", "linear_top1"} - {key}).pop()
        assert metrics[key] == {"fast": 2.0, "moco": 3.0}[probe] and other not in metrics
    assert seen == ["knn", "fast", "knn", "moco"]
