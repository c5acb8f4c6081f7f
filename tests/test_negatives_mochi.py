"""MoCHi against a naive per-query reference written from the paper's formulas, with the same draws."""

import pytest
import torch
import torch.nn.functional as F

from hnmix.negatives import draw_mochi, mochi, mochi_from_draws, mochi_naive, mochi_naive_from_draws


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


# ---------------------------------------------------------------- fused form against the naive form


def fused_and_naive(B=6, K=50, D=16, n_hard=12, s=40, sp=9, seed=2, chunk=None, unit=True):
    z, queue = setup(B, K, D, seed)
    if not unit:  # rows of slightly different norms, as bf16 keys would give: the fused norms must not assume 1
        queue = queue * (1 + 0.05 * torch.rand(K, 1, generator=torch.Generator().manual_seed(seed), dtype=queue.dtype))
    q = F.normalize(z, dim=1).detach().requires_grad_(True)  # a leaf: no normalize Jacobian hides a term along q
    draws = draw_mochi(B, n_hard, s, sp, generator=torch.Generator().manual_seed(seed + 1))
    kw = {} if chunk is None else {"chunk_elements": chunk}
    fused = mochi_from_draws(q, queue, q @ queue.T, draws, n_hard, **kw)
    naive = mochi_naive_from_draws(q, queue, q @ queue.T, draws, n_hard)
    return q, fused, naive


@pytest.mark.parametrize(("chunk", "unit"), [(None, True), (16 * 7, True), (1, False)])
def test_fused_equals_naive_in_value_and_gradient(chunk, unit):
    q, fused, naive = fused_and_naive(chunk=chunk, unit=unit)
    torch.testing.assert_close(fused, naive, rtol=0, atol=1e-12)
    w = torch.randn_like(fused)
    (g_fused,) = torch.autograd.grad((fused * w).sum(), q, retain_graph=True)
    (g_naive,) = torch.autograd.grad((naive * w).sum(), q)
    torch.testing.assert_close(g_fused, g_naive, rtol=0, atol=1e-12)


def test_public_mochi_is_fused_and_mochi_naive_is_the_reference():
    z, queue = setup(B=4, K=30, D=8, seed=5)
    q = F.normalize(z, dim=1)
    out = mochi(q, queue, q @ queue.T, n_hard=7, s=9, s_prime=4, generator=torch.Generator().manual_seed(0))
    ref = mochi_naive(q, queue, q @ queue.T, n_hard=7, s=9, s_prime=4, generator=torch.Generator().manual_seed(0))
    draws = draw_mochi(4, 7, 9, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(ref, naive_mochi(q, queue, draws, 7))


def largest_tensor_made(fn):
    """Largest numel of any tensor an aten op produces while fn runs (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, tuple | list) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.numel = max(Largest.numel, t.numel())
            return out

    with Largest():
        fn()
    return Largest.numel


def test_fused_never_builds_the_points():
    B, K, D, n_hard, s, sp = 4, 64, 32, 16, 256, 64
    z, queue = setup(B, K, D, seed=0)
    draws = draw_mochi(B, n_hard, s, sp, generator=torch.Generator().manual_seed(0))

    def run(form, **kw):
        def go():
            q = F.normalize(z, dim=1)
            form(q, queue, q @ queue.T, draws, n_hard, **kw).sum().backward()
        return largest_tensor_made(go)

    assert run(mochi_naive_from_draws) >= B * (s + sp) * D  # the reference does build them
    # the fused form's largest tensors: queue-sized (K, D), l_neg (B, K), the logits (B, s + s'), one chunk
    assert run(mochi_from_draws, chunk_elements=512) <= max(K * D, B * K, B * (s + sp), 512) < B * s * D


def test_fused_mixes_with_masked_negatives_leave_the_loss():
    # the oracle masks half the queue; with N larger than what a query sees, some picks are masked entries
    z, queue = setup(B=3, K=10, D=6, seed=1)
    q = F.normalize(z, dim=1)
    masked = torch.arange(10)[None, :] % 2 == torch.tensor([0, 1, 0])[:, None]
    visible = (q @ queue.T).masked_fill(masked, float("-inf"))
    draws = draw_mochi(3, 8, 30, 10, generator=torch.Generator().manual_seed(4))
    out = mochi_from_draws(q, queue, visible, draws, 8)
    naive = mochi_naive_from_draws(q, queue, visible, draws, 8)
    hard = visible.detach().topk(8, dim=1).indices
    uses_masked = torch.cat([masked.gather(1, hard.gather(1, draws.i)) | masked.gather(1, hard.gather(1, draws.j)),
                             masked.gather(1, hard.gather(1, draws.j_prime))], dim=1)
    assert uses_masked.any() and (~uses_masked).any()
    assert torch.isneginf(out[uses_masked]).all()
    torch.testing.assert_close(out[~uses_masked], naive[~uses_masked])
    (grad,) = torch.autograd.grad(out[~uses_masked].sum(), z)  # -inf entries give no nan anywhere
    assert torch.isfinite(grad).all()
