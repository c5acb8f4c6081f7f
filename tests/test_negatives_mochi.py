"""MoCHi against a naive per-query reference written from the paper's formulas, with the same draws."""

import torch
import torch.nn.functional as F

from hnmix.negatives import draw_mochi, mochi


def naive_mochi(q, queue, draws, n_hard):
    out = []
    for b in range(q.shape[0]):
        logits = [float(q[b].detach() @ queue[k]) for k in range(queue.shape[0])]
        hardest = sorted(range(len(logits)), key=lambda k: -logits[k])[:n_hard]
        row = []
        for i, j, a in zip(draws.i[b].tolist(), draws.j[b].tolist(), draws.a[b].tolist(), strict=True):
            h = a * queue[hardest[i]] + (1 - a) * queue[hardest[j]]
            row.append(q[b] @ (h / h.norm()).detach())
        for j, beta in zip(draws.j_prime[b].tolist(), draws.b[b].tolist(), strict=True):
            h = beta * q[b].detach() + (1 - beta) * queue[hardest[j]]
            row.append(q[b] @ (h / h.norm()).detach())
        out.append(torch.stack(row))
    return torch.stack(out)


def setup(B=5, K=40, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    queue = F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)
    return z, queue


def test_values_and_gradient_match_naive_reference():
    z, queue = setup()
    q = F.normalize(z, dim=1)
    n_hard, s, sp = 10, 12, 6
    fast = mochi(q, queue, q @ queue.T, n_hard=n_hard, s=s, s_prime=sp, generator=torch.Generator().manual_seed(3))
    draws = draw_mochi(q.shape[0], n_hard, s, sp, generator=torch.Generator().manual_seed(3))
    ref = naive_mochi(q, queue, draws, n_hard)
    assert fast.shape == (5, s + sp)
    torch.testing.assert_close(fast, ref)
    w = torch.randn_like(fast)
    (g_fast,) = torch.autograd.grad((fast * w).sum(), z, retain_graph=True)
    (g_ref,) = torch.autograd.grad((ref * w).sum(), z)
    torch.testing.assert_close(g_fast, g_ref)


def test_gradient_reaches_q_only_through_the_logit():
    z, queue = setup()
    q = F.normalize(z, dim=1)
    queue.requires_grad_(True)
    out = mochi(q, queue, q @ queue.T, n_hard=6, s=4, s_prime=4, generator=torch.Generator().manual_seed(0))
    out.sum().backward()
    assert queue.grad is None or torch.count_nonzero(queue.grad) == 0
    # d(q.h)/dq = h for detached h: the query mixes' gradient has no b*q/||.|| chain term
    qd = q.detach().requires_grad_(True)
    out = mochi(qd, queue.detach(), qd.detach() @ queue.detach().T, n_hard=6, s=0, s_prime=1,
                generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(out.sum(), qd)
    draws = draw_mochi(5, 6, 0, 1, generator=torch.Generator().manual_seed(1))
    hard = (qd.detach() @ queue.detach().T).topk(6, dim=1).indices
    n = queue.detach()[hard.gather(1, draws.j_prime)][:, 0]
    h = F.normalize(draws.b * qd.detach() + (1 - draws.b) * n, dim=1)
    torch.testing.assert_close(grad, h)


def test_pairs_are_distinct_and_draws_in_range():
    d = draw_mochi(64, 3, 500, 200, generator=torch.Generator().manual_seed(0))
    assert bool((d.i != d.j).all())
    assert d.i.max() < 3 and d.j.max() < 3 and d.j_prime.max() < 3
    assert 0 <= float(d.a.min()) and float(d.a.max()) < 1
    assert 0 <= float(d.b.min()) and float(d.b.max()) < 0.5
    # j is uniform over the other N - 1 positions: both others appear for every i
    for i in range(3):
        assert set(d.j[d.i == i].tolist()) == set(range(3)) - {i}


def test_synthetic_logits_follow_the_dtype_and_device_of_q():
    q = F.normalize(torch.randn(4, 8), dim=1)
    queue = F.normalize(torch.randn(16, 8), dim=1)
    out = mochi(q, queue, q @ queue.T, n_hard=4, s=3, s_prime=2)
    assert out.dtype == torch.float32 and out.shape == (4, 5)
