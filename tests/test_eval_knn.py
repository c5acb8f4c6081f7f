"""Weighted kNN against a direct computation, and the kNN monitor inside `hnmix pretrain` (also under DDP)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_clean_error, write_images

from hnmix.cli import app
from hnmix.data.labelled import Labelled
from hnmix.data.normalize import Normalize
from hnmix.eval.features import extract_features
from hnmix.eval.knn import KnnMonitor, knn_accuracy, knn_scores, topk_correct
from hnmix.models.backbone import create_backbone

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_knn_scores_match_a_direct_loop():
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(30, 6, generator=g), torch.randn(7, 6, generator=g)
    bank_labels = torch.randint(3, (30,), generator=g)
    scores = knn_scores(bank, bank_labels, queries, 3, k=5, t=0.5, chunk=3)
    for qi in range(7):
        sims = [(float(F.cosine_similarity(queries[qi], bank[j], dim=0)), j) for j in range(30)]
        expected = torch.zeros(3)
        for sim, j in sorted(sims, reverse=True)[:5]:
            expected[bank_labels[j]] += torch.exp(torch.tensor(sim / 0.5))
        torch.testing.assert_close(scores[qi], expected, rtol=1e-5, atol=1e-6)


def test_k_is_capped_at_the_bank_size_and_accuracy_counts():
    bank = torch.eye(3)
    scores = knn_scores(bank, torch.tensor([0, 1, 2]), torch.eye(3) + 0.1, 3, k=200)
    assert scores.shape == (3, 3) and (scores > 0).all()
    # one of three queries misclassified; top-5 over three classes always holds the label
    assert knn_accuracy(bank, torch.tensor([0, 1, 2]), torch.eye(3), torch.tensor([0, 1, 1]), 3, k=1) == (
        pytest.approx(200 / 3), 100.0)
    hand = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    assert topk_correct(hand, torch.tensor([2, 0, 0]), ks=(1, 2)) == [1, 2]


def pretrain(runner, out, *args):
    return runner.invoke(app, ["pretrain", "--data", "demo", "--output", str(out), *TINY, *args])


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_monitor_runs_every_e_epochs_and_leaves_training_untouched(runner, tmp_path):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])  # 2 steps per epoch
    write_images(data.parent / "knn" / "train", 12, classes=["a", "b"], seed=1)
    write_images(data.parent / "knn" / "val", 6, classes=["a", "b"], seed=2)
    common = ["--data", str(data), "--epochs", "3", "--set", "log_every=100"]
    on = pretrain(runner, tmp_path / "on", *common, "--knn-every", "2", "--knn-data", str(tmp_path / "knn"))
    assert on.exit_code == 0, on.output
    knn = [r for r in records(tmp_path / "on") if "knn_top1" in r]
    assert [(r["epoch"], r["step"]) for r in knn] == [(2, 4)]
    assert 0 <= knn[0]["knn_top1"] <= knn[0]["knn_top5"] == 100  # two classes: top-5 is always right
    assert "kNN top-1" in on.stdout and "kNN monitor" in on.stdout
    off = pretrain(runner, tmp_path / "off", *common)
    assert off.exit_code == 0, off.output
    a = torch.load(tmp_path / "on" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "off" / "last.pt", weights_only=True)["model"]
    for key in a:  # eval-mode extraction moves no BN statistics and draws from no RNG stream of the run
        assert torch.equal(a[key], b[key]), key


def test_monitor_defaults_to_the_pretraining_data(runner, tmp_path):
    write_images(tmp_path / "d" / "train", 16, classes=["a", "b"])
    write_images(tmp_path / "d" / "val", 4, classes=["a", "b"], seed=1)
    result = pretrain(runner, tmp_path / "r", "--data", str(tmp_path / "d"), "--epochs", "2", "--knn-every", "1")
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in records(tmp_path / "r") if "knn_top1" in r] == [2, 4]


def test_monitor_bad_data_fails_before_training(runner, tmp_path):
    write_images(tmp_path / "flat" / "train", 4)
    write_images(tmp_path / "flat" / "val", 4)
    assert_clean_error(pretrain(runner, tmp_path / "r", "--knn-every", "1", "--knn-data", str(tmp_path / "flat")),
                       "the kNN monitor (--knn-every) needs labelled images")
    assert not (tmp_path / "r").exists()
    assert_clean_error(pretrain(runner, tmp_path / "r", "--knn-every", "1", "--knn-data", "/no/such"),
                       "--knn-data: data path does not exist")
    write_images(tmp_path / "d" / "train", 16, classes=["a", "b"])  # a pretraining root without val/
    assert_clean_error(pretrain(runner, tmp_path / "r", "--knn-every", "1", "--data", str(tmp_path / "d")),
                       "has no val/ or test/ folder")


@pytest.mark.slow
def test_two_ranks_share_the_monitor_and_get_the_single_process_numbers(tmp_path):
    # 25 bank and 7 query images over 7 classes: uneven shards, padded for the gather, never double-counted
    classes = list("abcdefg")
    write_images(tmp_path / "k" / "train", 25, classes=classes, size=16)
    write_images(tmp_path / "k" / "val", 7, classes=classes, size=16, seed=1)
    script = tmp_path / "knn.py"
    script.write_text(
        "import json, torch\n"
        "from hnmix.data.normalize import Normalize\n"
        "from hnmix.eval.features import extract_all_ranks\n"
        "from hnmix.eval.knn import KnnMonitor\n"
        "from hnmix.models.backbone import create_backbone\n"
        "from hnmix.core import dist as distributed\n"
        "info = distributed.setup('cpu')\n"
        "torch.manual_seed(0)\n"
        "backbone = create_backbone('test_resnet')\n"
        f"monitor = KnnMonitor(r'{tmp_path / 'k'}', 16, batch_size=4, workers=0)\n"
        "r = monitor(backbone, Normalize(), torch.device('cpu'), None)\n"
        "bank = extract_all_ranks(backbone, monitor.bank_images, monitor.transform, batch_size=4, workers=0,\n"
        "                         device=torch.device('cpu'), normalize=Normalize())\n"
        f"torch.save(bank, r'{tmp_path}/bank%d.pt' % info.rank)\n"
        f"open(r'{tmp_path}/rank%d.json' % info.rank, 'w').write(json.dumps([r['knn_top1'], r['knn_top5']]))\n"
        "distributed.teardown()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet")
    monitor = KnnMonitor(str(tmp_path / "k"), 16, batch_size=4, workers=0)
    single = monitor(backbone, Normalize(), torch.device("cpu"), None)
    feats, labels = extract_features(backbone, Labelled(monitor.bank_images, monitor.transform), batch_size=4,
                                     workers=0, device=torch.device("cpu"), normalize=Normalize())
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [single["knn_top1"], single["knn_top5"]]
        gathered, gathered_labels = torch.load(tmp_path / f"bank{rank}.pt", weights_only=True)
        assert torch.equal(gathered_labels, labels)  # every image once, in dataset order
        torch.testing.assert_close(gathered, feats, atol=1e-5, rtol=1e-4)


def test_device_resident_monitor_matches_the_loader_monitor(tmp_path, monkeypatch):
    # the eval transform on the device (antialiased resize + centre crop) against PIL's, on the demo splits
    monkeypatch.setenv("HNMIX_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    backbone = create_backbone("test_resnet")
    loader = KnnMonitor("demo", 24, batch_size=100, workers=0)
    resident = KnnMonitor("demo", 24, batch_size=100, workers=0)
    assert resident.hold_on(torch.device("cpu"))
    a = loader(backbone, Normalize(), torch.device("cpu"), None)
    b = resident(backbone, Normalize(), torch.device("cpu"), None)
    assert abs(a["knn_top1"] - b["knn_top1"]) <= 2.0 and abs(a["knn_top5"] - b["knn_top5"]) <= 2.0
    from hnmix.eval.features import extract_resident

    feats_pil, labels_pil = extract_features(backbone, Labelled(loader.query_images, loader.transform), batch_size=100,
                                             workers=0, device=torch.device("cpu"), normalize=Normalize())
    feats_dev, labels_dev = extract_resident(backbone, *resident.resident[1], size=24, batch_size=100,
                                             normalize=Normalize())
    assert torch.equal(labels_pil, labels_dev)
    cosine = torch.nn.functional.cosine_similarity(feats_pil, feats_dev, dim=1)
    assert cosine.min() > 0.98, cosine.min()
