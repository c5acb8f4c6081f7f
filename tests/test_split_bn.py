"""Split batch norm against its definition: nn.BatchNorm2d applied to each contiguous sub-batch (values, input /
weight / bias gradients, running statistics), in both memory formats, fp32 and bf16 autocast, eager and the
torch.compile form; eval mode is plain BN on the running statistics."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hnmix.errors import HnmixError
from hnmix.models.split_bn import SplitBatchNorm2d, chunk_momenta, grouped_batch_norm

FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
C = 6


def make_bn(momentum=0.1, device="cpu") -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(C, momentum=momentum, device=device)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def make_input(fmt, n=8, dtype=torch.float32, device="cpu"):
    torch.manual_seed(1)
    x = (torch.randn(n, C, 5, 7) * 3 + 2).to(device, dtype, memory_format=FORMATS[fmt])  # mean >> 0: no cancellation hiding
    dy = torch.randn(n, C, 5, 7).to(device, dtype, memory_format=FORMATS[fmt])
    return x.requires_grad_(), dy


def reference(bn, x, dy, groups):
    """nn.BatchNorm2d on each sub-batch [g*n/G, (g+1)*n/G): output, input grad, summed parameter grads,
    mean of the running statistics."""
    chunks = [copy.deepcopy(bn) for _ in range(groups)]
    x = x.detach().clone().requires_grad_()
    n = len(x) // groups
    out = torch.cat([chunks[g](x[g * n:(g + 1) * n]) for g in range(groups)])
    out.backward(dy)
    stats = {name: torch.stack([b.state_dict()[name].float() for b in chunks]).mean(0)
             for name in ("running_mean", "running_var", "num_batches_tracked")}
    return out, x.grad, sum(b.weight.grad for b in chunks), sum(b.bias.grad for b in chunks), stats


def run_split(bn, x, dy, groups, compiled_form=False, monkeypatch=None):
    split = SplitBatchNorm2d(C, groups, momentum=bn.momentum, device=x.device)
    split.load_state_dict(bn.state_dict())
    if compiled_form:  # the branch SplitBatchNorm2d takes under torch.compile, run eagerly
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = split(x)
    out.backward(dy)
    return split, out


def assert_matches(bn, x, dy, groups, atol, rtol, **form):
    ref_out, ref_dx, ref_dw, ref_db, ref_stats = reference(bn, x, dy, groups)
    split, out = run_split(bn, x, dy, groups, **form)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad, ref_dx, atol=atol, rtol=rtol)
    torch.testing.assert_close(split.weight.grad, ref_dw, atol=atol, rtol=rtol)
    torch.testing.assert_close(split.bias.grad, ref_db, atol=atol, rtol=rtol)
    for name, value in ref_stats.items():
        torch.testing.assert_close(split.state_dict()[name].float(), value, atol=1e-5, rtol=1e-5, msg=name)
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("compiled_form", [False, True], ids=["eager", "compile-form"])
def test_fp32_equals_per_chunk_batchnorm(fmt, groups, compiled_form, device, monkeypatch):
    x, dy = make_input(fmt, device=device)
    tol = dict(atol=2e-6, rtol=1e-5) if device == "cpu" else dict(atol=1e-5, rtol=1e-4)  # cuDNN's reference sums differ
    out = assert_matches(make_bn(device=device), x, dy, groups, **tol, compiled_form=compiled_form,
                         monkeypatch=monkeypatch)
    assert out.is_contiguous(memory_format=FORMATS[fmt])
    assert x.grad.is_contiguous(memory_format=FORMATS[fmt])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("groups", [2, 4])
@pytest.mark.parametrize("compiled_form", [False, True], ids=["eager", "compile-form"])
def test_bf16_autocast_equals_per_chunk_batchnorm(fmt, groups, compiled_form, device, monkeypatch):
    # under autocast a conv hands BN a bf16 tensor; BN keeps fp32 parameters and statistics
    x, dy = make_input(fmt, dtype=torch.bfloat16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = assert_matches(make_bn(device=device), x, dy, groups, atol=0.05, rtol=0.02,
                             compiled_form=compiled_form, monkeypatch=monkeypatch)
    assert out.dtype == x.grad.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=FORMATS[fmt]) and x.grad.is_contiguous(memory_format=FORMATS[fmt])


def test_output_follows_the_naive_formula():
    # independent of the framework's kernels: (x - mean_g) / sqrt(var_g + eps) * w + b per (sub-batch, channel)
    bn = make_bn()
    x, dy = make_input("channels_last")
    _, out = run_split(bn, x, dy, 2)
    xg = x.detach().double().view(2, 4, C, 5, 7)
    mean = xg.mean(dim=(1, 3, 4), keepdim=True)
    var = ((xg - mean) ** 2).mean(dim=(1, 3, 4), keepdim=True)
    w, b = bn.weight.double().view(1, 1, C, 1, 1), bn.bias.double().view(1, 1, C, 1, 1)
    naive = ((xg - mean) / torch.sqrt(var + bn.eps) * w + b).view_as(x)
    torch.testing.assert_close(out.double(), naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_sequential_updates_give_the_mean_of_ema_updates(momentum, groups):
    # one in-place EMA update per sub-batch with chunk_momenta == the mean of each sub-batch's own update
    r, stats = 3.0, [float(v) for v in range(groups)]
    for m_g, s_g in zip(chunk_momenta(momentum, groups), stats, strict=True):
        r = (1 - m_g) * r + m_g * s_g
    assert r == pytest.approx(sum((1 - momentum) * 3.0 + momentum * s for s in stats) / groups, rel=1e-12)


def test_cumulative_average_momentum_none():
    x, dy = make_input("channels_last")
    assert_matches(make_bn(momentum=None), x, dy, 2, atol=2e-6, rtol=1e-5)


def test_without_grad_same_output_and_statistics():
    # the key encoder runs under no_grad: the path without autograd bookkeeping must agree
    bn = make_bn()
    x, dy = make_input("channels_last")
    ref_out, *_, ref_stats = reference(bn, x, dy, 4)
    split = SplitBatchNorm2d(C, 4)
    split.load_state_dict(bn.state_dict())
    with torch.no_grad():
        out = split(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(split.running_var, ref_stats["running_var"])


def test_without_affine_or_running_stats():
    torch.manual_seed(0)
    x = torch.randn(8, C, 4, 4).to(memory_format=torch.channels_last).requires_grad_()
    split = SplitBatchNorm2d(C, 2, affine=False, track_running_stats=False)
    out = split(x)
    out.sum().backward()
    ref = torch.cat([F.batch_norm(x[:4], None, None, training=True), F.batch_norm(x[4:], None, None, training=True)])
    torch.testing.assert_close(out, ref)
    assert x.grad is not None and out.is_contiguous(memory_format=torch.channels_last)


def test_parameter_gradients_without_input_gradient():
    # an input that needs no gradient (a frozen stem) takes the kernel's masked path
    bn = make_bn()
    x, dy = make_input("channels_last")
    _, _, ref_dw, ref_db, _ = reference(bn, x, dy, 2)
    split, _ = run_split(bn, x.detach(), dy, 2)
    torch.testing.assert_close(split.weight.grad, ref_dw)
    torch.testing.assert_close(split.bias.grad, ref_db)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_eval_mode_is_plain_batchnorm(fmt):
    bn = make_bn()
    split = SplitBatchNorm2d(C, 4)
    split.load_state_dict(bn.state_dict())
    x, _ = make_input(fmt)
    split.eval()
    torch.testing.assert_close(split(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                                      False, 0.0, bn.eps))
    assert int(split.num_batches_tracked) == 0


def test_compile_form_direct_call_matches_module():
    # grouped_batch_norm as a function: same output as the eager module on the same state
    bn = make_bn()
    x, dy = make_input("contiguous")
    split, out = run_split(bn, x, dy, 4)
    state = bn.state_dict()
    grouped = grouped_batch_norm(x.detach(), bn.weight.detach(), bn.bias.detach(), state["running_mean"].clone(),
                                 state["running_var"].clone(), 4, 0.1, bn.eps)
    torch.testing.assert_close(grouped, out.detach(), atol=2e-6, rtol=1e-5)


def test_batch_must_split_evenly():
    with pytest.raises(HnmixError, match="does not split into 4"):
        SplitBatchNorm2d(C, 4)(torch.randn(6, C, 3, 3))
