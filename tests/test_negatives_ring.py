"""Ring's mask against a sort-based reference; the masked loss equals the loss on the kept subset."""

import math

import pytest
import torch
import torch.nn.functional as F

from hnmix.models.moco import contrastive_loss
from hnmix.negatives import annealed_outer, ring_mask


@pytest.mark.parametrize(("outer", "inner"), [(0.1, 0.1), (0.5, 0.0), (1.0, 0.3), (0.02, 0.5), (0.3, 0.99)])
def test_mask_matches_sort_based_reference(outer, inner):
    l_neg = torch.randn(6, 200, generator=torch.Generator().manual_seed(0))
    mask = ring_mask(l_neg, outer=outer, inner=inner)
    n_outer = max(1, math.ceil(outer * 200))
    n_inner = min(int(inner * n_outer), n_outer - 1)
    for b in range(6):
        order = sorted(range(200), key=lambda k: -float(l_neg[b, k]))
        expected = set(order[n_inner:n_outer])
        assert set(torch.nonzero(mask[b]).flatten().tolist()) == expected


def test_masked_loss_equals_loss_on_the_kept_subset():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(5, 1 + 40 + 3, generator=g, dtype=torch.float64, requires_grad=True)
    keep = ring_mask(logits[:, 1:41].detach(), outer=0.5, inner=0.2)
    loss, _ = contrastive_loss(logits, 0.2, keep)
    direct = []
    for b in range(5):
        row = torch.cat([logits[b, :1], logits[b, 1:41][keep[b]], logits[b, 41:]]) / 0.2
        direct.append(F.cross_entropy(row[None], torch.zeros(1, dtype=torch.long)))
    direct = torch.stack(direct).mean()
    torch.testing.assert_close(loss, direct)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(direct, logits)
    torch.testing.assert_close(g1, g2)
    assert torch.count_nonzero(g1[:, 1:41][~keep]) == 0  # dropped negatives get no gradient at all


def test_masked_loss_is_exact_in_low_precision():
    logits = torch.randn(4, 30).bfloat16()
    keep = torch.rand(4, 29) > 0.5
    loss, _ = contrastive_loss(logits.float(), 0.1, keep)
    sub = [torch.cat([logits[b, :1], logits[b, 1:][keep[b]]]).float() / 0.1 for b in range(4)]
    ref = torch.stack([torch.logsumexp(r, 0) - r[0] for r in sub]).mean()
    torch.testing.assert_close(loss, ref)


def test_anneal_schedules_go_from_one_to_final():
    for sched in ("linear", "step", "exp"):
        assert annealed_outer(0.1, sched, 0.0, 10) == pytest.approx(1.0)
        assert annealed_outer(0.1, sched, 10.0, 10) == pytest.approx(0.1)
        assert annealed_outer(0.1, sched, 50.0, 10) == pytest.approx(0.1)
    assert annealed_outer(0.1, "linear", 5.0, 10) == pytest.approx(0.55)
    assert annealed_outer(0.1, "exp", 5.0, 10) == pytest.approx(0.1**0.5)
    assert annealed_outer(0.1, "step", 9.9, 10) == 1.0
    assert annealed_outer(0.1, "none", 0.0, 10) == 0.1
