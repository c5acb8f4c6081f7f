"""Label oracle masking, and a short CPU pretrain with every registered method."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, write_images

from hnmix.cli import app
from hnmix.models.backbone import create_backbone
from hnmix.models.moco import MoCo
from hnmix.negatives import METHODS, Negatives, draw_mochi, mochi


def labelled_moco(K=24):
    torch.manual_seed(0)
    model = MoCo(create_backbone("test_resnet"), dim=8, K=K, m=0.9, T=0.2, shuffle_keys=False)
    model.queue_labels.copy_(torch.arange(K) % 3)
    return model


def test_oracle_removes_exactly_the_same_class_negatives():
    model = labelled_moco()
    labels = torch.tensor([0, 1, 2, -1])
    seen = {}

    def spy(q, queue, l_neg, *, generator, epoch):
        seen["visible"] = l_neg.clone()
        return Negatives()

    x = torch.randn(4, 3, 16, 16)
    queue_labels = model.queue_labels.clone()
    queue = model.queue.clone()
    out = model(x, x.clone(), strategy=spy, labels=labels, oracle=True)
    model.enqueue(out.keys, out.key_labels)  # as MocoStep does after the backward
    same = queue_labels[None, :] == labels[:, None]
    assert torch.isinf(seen["visible"][same]).all() and torch.isfinite(seen["visible"][~same]).all()
    # the loss leaves out exactly those queue entries
    q = F.normalize(model.encoder_q(x), dim=1).detach()
    logits = out.logits.detach()
    expected = []
    for b in range(4):
        row = torch.cat([logits[b, :1], logits[b, 1:][~same[b]]]) / 0.2
        expected.append(torch.logsumexp(row, 0) - row[0])
    torch.testing.assert_close(out.loss.detach(), torch.stack(expected).mean())
    torch.testing.assert_close(logits[:, 1:], q @ queue.T, atol=1e-5, rtol=1e-5)
    assert model.queue_labels[:4].tolist() == labels.tolist()  # labels are queued beside their keys


def test_oracle_keeps_same_class_items_out_of_synthesis():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(3, 6, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(30, 6, generator=g, dtype=torch.float64), dim=1)
    queue_labels, labels = torch.arange(30) % 2, torch.tensor([0, 1, 0])
    same = queue_labels[None] == labels[:, None]
    visible = (q @ queue.T).masked_fill(same, float("-inf"))
    out = mochi(q, queue, visible, n_hard=5, s=6, s_prime=3, generator=torch.Generator().manual_seed(1))
    draws = draw_mochi(3, 5, 6, 3, generator=torch.Generator().manual_seed(1))
    for b in range(3):  # the mix is built from the hardest of the other class only
        other = queue[~same[b]]
        hard = (q[b] @ other.T).topk(5).indices
        torch.testing.assert_close(out[b, 0], q[b] @ F.normalize(
            draws.a[b, 0] * other[hard[draws.i[b, 0]]] + (1 - draws.a[b, 0]) * other[hard[draws.j[b, 0]]], dim=0))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_pretrains_and_logs_its_statistics(tmp_path, method):
    data = write_images(tmp_path / "d", 16, classes=["a", "b"])
    from typer.testing import CliRunner

    extra = {"mochi": ["--N", "4", "--s", "3", "--s-prime", "2"],
             "synco": ["--N", "4", "--synco-counts", "1,1,1,1,1,1", "--synco-start-epoch", "1"],
             "ring": ["--ring-outer", "0.5", "--ring-inner", "0.25", "--ring-anneal", "linear",
                      "--ring-anneal-epochs", "2"],
             "moco": ["--oracle-labels"]}[method]
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), "--output", str(out), *TINY, "--epochs", "3",
                                      "--method", method, *extra])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    if method == "mochi":
        assert all("logit_syn" in r for r in records)
    if method == "synco":  # from epoch 1 on (2 steps per epoch)
        assert ["logit_syn" in r for r in records] == [False, False, True, True, True, True]
    if method == "ring":  # outer anneals 1.0 -> 0.5 over 2 epochs, then stays: the kept share shrinks
        kept = [r["neg_kept"] for r in records]
        assert kept[0] > kept[3] and kept[-1] == pytest.approx(0.375)  # (0.5 - 0.25 * 0.5) of the queue
    if method == "moco":  # oracle: same-class queue entries leave the loss once labelled keys fill the queue
        assert records[-1]["neg_kept"] < 1.0


def test_oracle_needs_labels(tmp_path):
    from typer.testing import CliRunner

    data = write_images(tmp_path / "flat", 16)
    result = CliRunner().invoke(app, ["pretrain", "--data", str(data), *TINY, "--oracle-labels",
                                      "--output", str(tmp_path / "r")])
    assert result.exit_code == 2 and "needs labelled data" in result.stderr


def test_help_lists_every_method_and_its_options():
    from typer.testing import CliRunner

    text = CliRunner().invoke(app, ["pretrain", "--help"], env={"COLUMNS": "200"}).output
    for needle in ["mochi", "synco", "ring", "--synco-counts", "--ring-outer", "--ring-anneal", "--oracle-labels",
                   "--s-prime", "--mochi-start-epoch"]:
        assert needle in text, needle
