"""`hnmix analyze`: every metric against a direct computation on small hand-built features, then end to end."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_clean_error,
    save_backbone,
    save_hnmix_checkpoint,
    save_official_moco,
    tiny_moco,
    write_brightness_split,
    write_images,
)

from hnmix.analyze import metrics as M
from hnmix.analyze.encoders import load_encoders
from hnmix.analyze.plots import series_labels
from hnmix.analyze.run import scan_memory
from hnmix.cli import app
from hnmix.negatives.mochi import MochiDraws

NO_MOCHI = {"n_hard": 2, "s": 0, "s_prime": 0}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def circle(n):
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    return torch.stack([angles.cos(), angles.sin()], 1)


# ------------------------------------------------------------------ uniformity / alignment / separation


def test_uniformity_of_points_evenly_on_a_circle_vs_clustered():
    n = 720
    even = circle(n)
    # continuum limit for t = 2: log(e^-4 I0(4)), I0 the modified Bessel function; without the n self-pairs
    mean_all_pairs = math.exp(-4) * 11.301921952136330
    expected = math.log((n * mean_all_pairs - 1) / (n - 1))
    assert M.uniformity(even, t=2, chunk=100) == pytest.approx(expected, abs=1e-6)
    clustered = F.normalize(torch.tensor([1.0, 0.0], dtype=torch.float64) + 0.05 * torch.randn(n, 2,
                            generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    assert M.uniformity(clustered) > -0.02 > M.uniformity(even)  # clustered ~ 0, the worst possible


def test_uniformity_matches_a_pair_loop():
    x = F.normalize(torch.randn(9, 4, generator=torch.Generator().manual_seed(1)), dim=1)
    terms = [math.exp(-1.5 * float((x[i] - x[j]).pow(2).sum())) for i in range(9) for j in range(i + 1, 9)]
    assert M.uniformity(x, t=1.5, chunk=4) == pytest.approx(math.log(sum(terms) / len(terms)), rel=1e-5)


def test_alignment_and_class_alignment_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.6, 0.8]])
    assert M.alignment(x, y, alpha=2) == pytest.approx(2 / 3)
    assert M.alignment(x, y, alpha=1) == pytest.approx(math.sqrt(2) / 3)
    labels = torch.tensor([0, 0, 0, 1])
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    # class 0 pairs: (0,1) 2, (0,2) 4, (1,2) 2; class 1 has no pair
    assert M.class_alignment(feats, labels, alpha=2) == pytest.approx(8 / 3)


def test_separation_ratio_matches_a_loop_and_orders_clusters():
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(12, 3, generator=g), torch.tensor([0, 1, 2] * 4)
    ratios = M.separation_ratios(x, labels, chunk=5)
    for i in range(12):
        same = [float((x[i] - x[j]).norm()) for j in range(12) if j != i and labels[j] == labels[i]]
        other = [float((x[i] - x[j]).norm()) for j in range(12) if labels[j] != labels[i]]
        assert ratios[i].item() == pytest.approx((sum(other) / len(other)) / (sum(same) / len(same)), rel=1e-5)
    tight = torch.cat([torch.tensor([[5.0, 0.0]]) + 0.1 * torch.randn(10, 2, generator=g),
                       torch.tensor([[-5.0, 0.0]]) + 0.1 * torch.randn(10, 2, generator=g)])
    two = torch.tensor([0] * 10 + [1] * 10)
    assert M.separation_ratios(tight, two).min() > 10 > M.separation_ratios(torch.randn(20, 2, generator=g), two).max()


# ------------------------------------------------------------------ against a memory


def test_false_negatives_in_topk_with_hand_built_labels():
    l_neg = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.6, 0.0]])
    mem_labels = torch.tensor([1, 0, 1, 2])
    same = M.same_class_in_topk(l_neg, torch.tensor([1, 0]), mem_labels, 3)
    # query 0 ranks rows 0 (label 1), 3 (2), 2 (1); query 1 ranks rows 1 (0), 2 (1), 0 (1)
    assert same.tolist() == [[True, False, True], [True, False, False]]


def test_scan_memory_fn_share_and_chance_on_a_dataset_memory():
    # 3 classes of 4 points, each class on its own axis: a point's nearest others are its class mates
    labels = torch.arange(3).repeat_interleave(4)
    feats = F.normalize(F.one_hot(labels, 3).float() + 0.05 * torch.randn(12, 3, generator=torch.Generator()
                                                                              .manual_seed(0)), dim=1)
    out = scan_memory(feats, feats, labels, feats, exclude_self=True, mem_labels=labels, mochi=NO_MOCHI, seed=0,
                      top_k=5, chunk=5)
    assert out["memory_size"] == 11 and out["top_k"] == 5
    assert out["curve"][:3] == pytest.approx([1.0, 1.0, 1.0])  # 3 class mates first
    assert out["share"] == pytest.approx(3 / 5) and out["chance"] == pytest.approx(3 / 11)


def test_matching_probabilities_and_proxy_hits_by_hand():
    l_pos, l_neg = torch.tensor([0.5, 0.1]), torch.tensor([[0.2, 0.4, 0.0], [0.3, -0.1, 0.2]])
    p = M.matching_probabilities(l_pos, l_neg, temperature=0.5, k=2)
    full = torch.softmax(torch.tensor([[0.5, 0.2, 0.4, 0.0], [0.1, 0.3, -0.1, 0.2]], dtype=torch.float64) / 0.5, 1)
    torch.testing.assert_close(p, full[:, 1:].sort(1, descending=True).values[:, :2])
    assert M.proxy_hits(l_pos, l_neg).tolist() == [True, False]
    assert M.proxy_hits(l_pos, l_neg, torch.tensor([[0.6], [0.0]])).tolist() == [False, False]


def test_scan_memory_hardness_and_proxy_against_direct_computation():
    g = torch.Generator().manual_seed(0)
    q, k, memory = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (10, 10, 30))
    k = F.normalize(q + 0.3 * k, dim=1)
    out = scan_memory(q, k, torch.zeros(10, dtype=torch.long), memory, exclude_self=False, mochi=NO_MOCHI, seed=0,
                      top_k=4, temperature=0.2, chunk=3)
    l_pos, l_neg = (q * k).sum(1), q @ memory.T
    assert out["curve"] == pytest.approx(M.matching_probabilities(l_pos, l_neg, 0.2, 4).mean(0).tolist())
    assert out["without_synthetic"] == pytest.approx((l_pos > l_neg.max(1).values).float().mean().item())
    assert out["with_synthetic"] is None  # s = s' = 0: nothing synthetic
    with_mochi = scan_memory(q, k, torch.zeros(10, dtype=torch.long), memory, exclude_self=False, seed=0, top_k=4,
                             mochi={"n_hard": 8, "s": 16, "s_prime": 4})
    assert with_mochi["with_synthetic"] <= with_mochi["without_synthetic"]  # more negatives, never easier


def test_mochi_false_negatives_by_hand():
    hard = torch.tensor([[5, 2, 7]])  # the query's top-3 memory rows
    mem_labels = torch.tensor([9, 9, 1, 9, 9, 1, 9, 3])  # rows 2 and 5 share the query's class 1
    draws = MochiDraws(i=torch.tensor([[0, 0, 1]]), j=torch.tensor([[1, 2, 2]]), a=torch.rand(1, 3),
                       j_prime=torch.tensor([[0, 2]]), b=torch.rand(1, 2))
    mixed, query_mixed = M.mochi_false_negatives(hard, draws, torch.tensor([1]), mem_labels)
    assert mixed.tolist() == [[True, False, False]]  # only (row 5, row 2) has both of class 1
    assert query_mixed.tolist() == [[True, False]]


def test_series_labels_tell_files_apart():
    from pathlib import Path

    assert series_labels([Path("/r/moco/last.pt"), Path("/r/mochi/last.pt")], [3, None]) == [
        "moco/last.pt (epoch 3)", "mochi/last.pt"]
    assert series_labels([Path("/r/a.pt"), Path("/r/a.pt")], [None, None]) == ["r/a.pt #1", "r/a.pt #2"]
    assert series_labels([Path("/x/run/e1.pt"), Path("/y/run/e1.pt")], [1, 1]) == ["x/run/e1.pt (epoch 1)",
                                                                                 "y/run/e1.pt (epoch 1)"]


# ------------------------------------------------------------------ weights


def test_official_moco_checkpoint_gives_the_same_encoders_and_queue(tmp_path):
    model = tiny_moco(seed=4).eval()
    enc = load_encoders(save_official_moco(tmp_path / "moco.pth.tar", model), "head")
    assert enc.source == "moco" and torch.equal(enc.queue, model.queue)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(enc.query(x), model.encoder_q(x))
        torch.testing.assert_close(enc.key(x), model.encoder_k(x))


def test_queue_labels_are_used_when_the_checkpoint_has_them(runner, tmp_path, toy):
    model = tiny_moco()
    path = save_hnmix_checkpoint(tmp_path / "last.pt", model)
    assert load_encoders(path, "head").queue_labels is None
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["queue_labels"] = torch.tensor([0, 1, -1, 1] * 8)
    torch.save(ckpt, path)
    enc = load_encoders(path, "head")
    assert enc.queue_labels.tolist() == [0, 1, -1, 1] * 8
    assert load_encoders(path, "backbone").queue is None  # the queue lives in head space
    result = run(runner, "false-negatives", "-w", str(path), "--data", str(toy), "--top-k", "4", "-o",
                 str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    (r,) = json.loads((tmp_path / "o" / "analysis.json").read_text())["results"]
    fn = r["false_negatives"]
    assert fn["memory"] == "queue (labelled rows)" and fn["memory_size"] == 24  # the 8 rows labelled -1 dropped
    assert fn["chance"] == pytest.approx((12 * 8 / 24 + 12 * 16 / 24) / 24)  # 12 dark (0), 12 bright (1) queries


# ------------------------------------------------------------------ end to end


@pytest.fixture
def toy(tmp_path):
    return write_brightness_split(tmp_path / "toy", 12)


def run(runner, *args):
    return runner.invoke(app, ["analyze", *args, "--workers", "0", "--device", "cpu", "--batch-size", "8"])


def test_uniformity_as_on_the_card(runner, tmp_path, toy, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output is runs/analyze
    w = save_hnmix_checkpoint(tmp_path / "last.pt", tiny_moco())
    result = runner.invoke(app, ["analyze", "uniformity", "--weights", str(w), "--data", str(toy)])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "analyze" / "analysis.json").read_text())
    assert report["metrics"] == ["uniformity"] and report["data"]["images"] == 24
    (r,) = report["results"]
    assert -4 <= r["uniformity"] <= 0 and r["epoch"] == 3 and r["format"] == "hnmix-checkpoint"
    assert (tmp_path / "runs" / "analyze" / "uniformity.png").stat().st_size > 5000


def test_all_metrics_two_runs_one_figure_each_and_json(runner, tmp_path, toy):
    a = save_hnmix_checkpoint(tmp_path / "a" / "last.pt", tiny_moco(seed=1), method="mochi", n_hard=8, s=6,
                              s_prime=2)
    b = save_official_moco(tmp_path / "moco.pth.tar", tiny_moco(seed=2))
    out = tmp_path / "cmp"
    result = run(runner, "all", "--weights", str(a), str(b), "--data", str(toy), "--top-k", "4", "-o", str(out),
                 "--json")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((out / "analysis.json").read_text())
    assert {p.name for p in out.glob("*.png")} == {"uniformity.png", "alignment.png", "false-negatives.png",
                                                   "hardness.png", "proxy-accuracy.png", "separation.png"}
    ra, rb = printed["results"]
    assert ra["label"] == "a/last.pt (epoch 3)" and rb["label"] == f"{tmp_path.name}/moco.pth.tar (epoch 200)"
    assert rb["format"] == "moco"
    for r in (ra, rb):
        assert {"uniformity", "alignment", "class_alignment", "false_negatives", "hardness", "proxy_accuracy",
                "separation"} <= set(r)
        assert r["false_negatives"]["memory"] == "dataset keys" and r["false_negatives"]["memory_size"] == 23
        assert r["hardness"]["memory"] == "queue" and len(r["hardness"]["curve"]) == 4
        assert r["hardness"]["curve"] == sorted(r["hardness"]["curve"], reverse=True)
    assert ra["false_negatives"]["mochi"]["from"] == "checkpoint" and ra["false_negatives"]["mochi"]["s"] == 6
    assert rb["proxy_accuracy"]["mochi"]["from"] == "defaults"
    assert ra["hardness"]["temperature"] == 0.2


def test_backbone_features_and_memory_choices(runner, tmp_path, toy):
    w = save_backbone(tmp_path / "backbone.pt", tiny_moco())
    result = run(runner, "hardness", "--weights", str(w), "--data", str(toy), "--features", "backbone",
                 "--arch", "test_resnet", "--image-size", "16", "-o", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    (r,) = json.loads((tmp_path / "o" / "analysis.json").read_text())["results"]
    assert r["hardness"]["memory"] == "dataset keys" and r["hardness"]["top_k"] == 23


def test_unlabelled_data(runner, tmp_path):
    write_images(tmp_path / "flat", 10, size=16)
    w = str(save_hnmix_checkpoint(tmp_path / "last.pt", tiny_moco()))
    assert_clean_error(run(runner, "false-negatives", "-w", w, "--data", str(tmp_path / "flat")),
                       "false-negatives needs labelled images")
    result = run(runner, "all", "-w", w, "--data", str(tmp_path / "flat"), "-o", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    assert "skipping false-negatives, separation" in result.stdout
    report = json.loads((tmp_path / "o" / "analysis.json").read_text())
    assert "class_alignment" not in report["results"][0] and "alignment" in report["results"][0]


def test_split_missing_from_a_dataset_root_is_refused(runner, tmp_path):
    # read as an ImageFolder, a root holding train/ and val/ would give the "classes" train and val
    root = tmp_path / "root"
    write_brightness_split(root / "train", 6)
    write_brightness_split(root / "val", 3)
    w = str(save_hnmix_checkpoint(tmp_path / "last.pt", tiny_moco()))
    assert_clean_error(run(runner, "uniformity", "-w", w, "--data", str(root), "--split", "test"),
                       "has no split 'test' (it has train, val)")
    assert not (tmp_path / "o").exists()
    result = run(runner, "uniformity", "-w", w, "--data", str(root), "--split", "train", "-o", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "analysis.json").read_text())["data"]
    assert data["images"] == 12 and data["classes"] == 2 and data["source"].endswith("train")


def test_default_split_is_the_held_out_one_val_else_test(runner, tmp_path):
    # CIFAR-style roots hold train/ and test/: the default takes test/, as lineval and the kNN monitor do
    root = tmp_path / "root"
    write_brightness_split(root / "train", 6)
    write_brightness_split(root / "test", 3)
    w = str(save_hnmix_checkpoint(tmp_path / "last.pt", tiny_moco()))
    result = run(runner, "uniformity", "-w", w, "--data", str(root), "-o", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "o" / "analysis.json").read_text())["data"]
    assert data["split"] == "test" and data["images"] == 6 and data["source"].endswith("test")
    (root / "val").mkdir()
    write_brightness_split(root / "val", 2)
    result = run(runner, "uniformity", "-w", w, "--data", str(root), "-o", str(tmp_path / "o2"))
    assert json.loads((tmp_path / "o2" / "analysis.json").read_text())["data"]["split"] == "val"


def test_bad_input(runner, tmp_path, toy):
    w = str(save_hnmix_checkpoint(tmp_path / "last.pt", tiny_moco()))
    backbone = str(save_backbone(tmp_path / "backbone.pt", tiny_moco()))
    d = ["--data", str(toy), "-o", str(tmp_path / "o")]
    assert_clean_error(run(runner, "uniformity", "-w", backbone, "--arch", "test_resnet", *d),
                       "holds only a backbone (no projection head, no queue): use --features backbone")
    assert_clean_error(run(runner, "separation", "-w", w, "--arch", "resnet18", *d), "does not match the checkpoint")
    assert_clean_error(run(runner, "hardness", "-w", backbone, "--features", "backbone", "--arch", "test_resnet",
                           "--memory", "queue", *d), "has no queue")
    assert_clean_error(run(runner, "false-negatives", "-w", w, "--memory", "queue", *d), "no queue labels")
    assert_clean_error(run(runner, "uniformity", "-w", str(tmp_path / "nope.pt"), *d), "weights file not found")
    assert_clean_error(run(runner, "entropy", "-w", w, *d), "metric")
    assert_clean_error(run(runner, "uniformity", *d), "weights: Field required")
    assert_clean_error(run(runner, "uniformity", "-w", w, "--data", "demo", "--split", "test"), "not 'test'")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert_clean_error(run(runner, "uniformity", "-w", str(tmp_path / "junk.pt"), *d), "not a readable PyTorch")
    assert not (tmp_path / "o").exists()
