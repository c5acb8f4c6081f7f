"""SynCo's six kinds against a naive per-query reference from the formulas, with the same draws."""

import pytest
import torch
import torch.nn.functional as F

from hnmix.negatives import draw_synco, synco

COUNTS = [3, 2, 4, 2, 3, 2]
SIGMA, DELTA, ETA = 0.05, 0.07, 0.03


def unit(v):
    return v / v.norm()


def naive_synco(q, queue, draws, n_hard):
    rows = []
    for b in range(q.shape[0]):
        qb = q[b].detach()
        hardest = sorted(range(queue.shape[0]), key=lambda k: -float(qb @ queue[k]))[:n_hard]

        def neg(t, j, b=b, hardest=hardest):
            return queue[hardest[int(draws.picks[t][b, j])]]

        points = []
        points += [unit(draws.interp[b, j] * qb + (1 - draws.interp[b, j]) * neg(0, j)) for j in range(COUNTS[0])]
        points += [unit(qb + draws.extrap[b, j] * (neg(1, j) - qb)) for j in range(COUNTS[1])]
        points += [unit(draws.mix[b, j] * neg(2, j) + (1 - draws.mix[b, j]) * queue[hardest[int(draws.picks2[b, j])]])
                   for j in range(COUNTS[2])]
        points += [unit(neg(3, j) + SIGMA * draws.noise[b, j]) for j in range(COUNTS[3])]
        points += [unit(neg(4, j) + DELTA * qb) for j in range(COUNTS[4])]
        points += [unit(neg(5, j) + ETA * torch.sign(qb)) for j in range(COUNTS[5])]
        rows.append(torch.stack([q[b] @ p.detach() for p in points]))
    return torch.stack(rows)


def setup(B=4, K=30, D=8):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    return z, F.normalize(torch.randn(K, D, generator=g, dtype=torch.float64), dim=1)


def test_each_kind_matches_the_naive_reference_values_and_gradient():
    z, queue = setup()
    q = F.normalize(z, dim=1)
    out = synco(q, queue, q @ queue.T, n_hard=7, counts=COUNTS, sigma=SIGMA, delta=DELTA, eta=ETA,
                generator=torch.Generator().manual_seed(5))
    draws = draw_synco(4, 8, 7, COUNTS, generator=torch.Generator().manual_seed(5))
    draws = draws._replace(noise=draws.noise.double())
    ref = naive_synco(q, queue, draws, 7)
    assert out.shape == (4, sum(COUNTS))
    torch.testing.assert_close(out, ref)
    (g_out,) = torch.autograd.grad(out.sum(), z, retain_graph=True)
    (g_ref,) = torch.autograd.grad(ref.sum(), z)
    torch.testing.assert_close(g_out, g_ref)


def test_draw_ranges():
    d = draw_synco(16, 8, 5, [50, 50, 50, 1, 1, 1], generator=torch.Generator().manual_seed(0))
    assert 0 <= float(d.interp.min()) and float(d.interp.max()) < 0.5
    assert 1 <= float(d.extrap.min()) and float(d.extrap.max()) < 1.5
    assert 0 <= float(d.mix.min()) and float(d.mix.max()) < 1
    assert max(int(p.max()) for p in d.picks) < 5 and int(d.picks2.max()) < 5


def test_closed_form_gradient_kinds_equal_autograd():
    # kind 5 uses grad_n(q.n) = q and kind 6 sign(grad_n(q.n)) = sign(q): check both against autograd
    z, queue = setup()
    q = F.normalize(z, dim=1).detach()
    n = queue[:4].clone().requires_grad_(True)
    (grad,) = torch.autograd.grad((q * n).sum(), n)
    torch.testing.assert_close(grad, q)
    only5 = synco(q, queue, q @ queue.T, n_hard=1, counts=[0, 0, 0, 0, 1, 0], sigma=0, delta=DELTA, eta=0)
    only6 = synco(q, queue, q @ queue.T, n_hard=1, counts=[0, 0, 0, 0, 0, 1], sigma=0, delta=0, eta=ETA)
    hardest = queue[(q @ queue.T).argmax(1)].requires_grad_(True)
    (g,) = torch.autograd.grad((q * hardest).sum(), hardest)
    torch.testing.assert_close(only5[:, 0], (q * F.normalize(hardest.detach() + DELTA * g, dim=1)).sum(1))
    torch.testing.assert_close(only6[:, 0], (q * F.normalize(hardest.detach() + ETA * g.sign(), dim=1)).sum(1))


def test_zero_counts_switch_kinds_off_and_bad_counts_fail():
    z, queue = setup()
    q = F.normalize(z, dim=1).detach()
    out = synco(q, queue, q @ queue.T, n_hard=4, counts=[0, 0, 2, 0, 0, 0], sigma=0, delta=0, eta=0)
    assert out.shape == (4, 2)
    with pytest.raises(ValueError, match="six"):
        synco(q, queue, q @ queue.T, n_hard=4, counts=[1, 2], sigma=0, delta=0, eta=0)


def test_points_from_masked_entries_leave_the_loss():
    # the oracle masks half the queue; with N larger than what a query sees, masked entries enter its top-N
    z, queue = setup(B=3, K=10, D=8)
    q = F.normalize(z, dim=1)
    masked = torch.arange(10)[None, :] % 2 == torch.tensor([0, 1, 0])[:, None]
    visible = (q @ queue.T).masked_fill(masked, float("-inf"))
    counts = [6, 6, 6, 6, 6, 6]
    kw = dict(n_hard=8, counts=counts, sigma=SIGMA, delta=DELTA, eta=ETA)
    out = synco(q, queue, visible, **kw, generator=torch.Generator().manual_seed(2))
    # unmasked logits with the masked entries ranked last: the visible ones keep their top-N positions
    demoted = torch.where(masked, q @ queue.T - 10, q @ queue.T)
    plain = synco(q, queue, demoted, **kw, generator=torch.Generator().manual_seed(2))
    draws = draw_synco(3, 8, 8, counts, generator=torch.Generator().manual_seed(2))
    hard = visible.topk(8, dim=1).indices
    uses = [masked.gather(1, hard.gather(1, pick)) for pick in draws.picks]
    uses[2] = uses[2] | masked.gather(1, hard.gather(1, draws.picks2))
    uses_masked = torch.cat(uses, dim=1)
    assert uses_masked.any() and (~uses_masked).any()
    assert torch.isneginf(out[uses_masked]).all() and torch.isfinite(out[~uses_masked]).all()
    torch.testing.assert_close(out[~uses_masked], plain[~uses_masked])
    (grad,) = torch.autograd.grad(out[~uses_masked].sum(), z)
    assert torch.isfinite(grad).all()
