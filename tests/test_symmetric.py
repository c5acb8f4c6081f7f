"""The symmetric loss (MoCo's CIFAR-10 demo, lightly) against a naive two-pass reference."""

import copy

import pytest
import torch
import torch.nn.functional as F

from hnmix.config import PretrainConfig
from hnmix.core.settings import load_config
from hnmix.errors import HnmixError
from hnmix.models.backbone import create_backbone
from hnmix.models.moco import MoCo


def test_symmetric_loss_is_the_mean_of_both_directions_and_enqueues_both_keys():
    torch.manual_seed(0)
    model = MoCo(create_backbone("test_resnet"), dim=8, K=16, m=0.9, T=0.2, shuffle_keys=False, symmetric=True)
    ref = copy.deepcopy(model)
    queue = model.queue.clone()
    x1, x2 = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    out = model(x1, x2)
    out.loss.backward()
    model.enqueue(out.keys, out.key_labels)  # as MocoStep does after the backward

    # the reference: one momentum update, then view 1 -> key of view 2 and view 2 -> key of view 1, each an
    # InfoNCE against the queue as it was before the step
    with torch.no_grad():
        ref.momentum_update()
        k1 = F.normalize(ref.encoder_k(x1), dim=1)
        k2 = F.normalize(ref.encoder_k(x2), dim=1)
    q1, q2 = F.normalize(ref.encoder_q(x1), dim=1), F.normalize(ref.encoder_q(x2), dim=1)
    zero = torch.zeros(4, dtype=torch.long)

    def info_nce(q, k):
        return F.cross_entropy(torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2, zero)

    expected = (info_nce(q1, k2) + info_nce(q2, k1)) / 2
    expected.backward()
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=1e-5)
    for p_model, p_ref in zip(model.encoder_q.parameters(), ref.encoder_q.parameters(), strict=True):
        torch.testing.assert_close(p_model.grad, p_ref.grad, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(model.queue[:8], torch.cat([k1, k2]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(model.queue[8:], queue[8:])
    assert int(model.queue_ptr) == 8


def test_symmetric_needs_a_queue_of_whole_double_batches():
    with pytest.raises(HnmixError, match="twice it with --symmetric"):
        load_config(PretrainConfig, None, {"symmetric": True, "batch_size": 256, "queue_size": 256 * 3})
    assert load_config(PretrainConfig, None, {"symmetric": True, "batch_size": 256, "queue_size": 512}).symmetric


def test_a_symmetric_mochi_run(runner, tmp_path):
    from helpers import TINY

    from hnmix.cli import app

    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", "demo", *TINY, "--queue-size", "64", "--epochs", "1",
                                 "--max-steps", "3", "--symmetric", "--method", "mochi", "--N", "8", "--s", "4",
                                 "--s-prime", "2", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "symmetric loss" in result.stdout
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert int(ckpt["model"]["queue_ptr"]) == 3 * 2 * 8 % 64  # two batches of keys per step
