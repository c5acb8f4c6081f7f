"""Split batch norm: batch norm over G contiguous sub-batches, each normalised with its own statistics.

Sub-batch g holds samples [g*n/G, (g+1)*n/G): what rank g of a G-process DDP run normalises, so with the
key shuffle it reproduces MoCo's shuffle BN on one device. Running statistics are the mean over sub-batches
of each one's EMA update (what each rank's nn.BatchNorm2d would hold, averaged).

Two forms of the same computation, both in the input's memory format (channels-last stays channels-last):

- eager, `split_batch_norm`: the framework's own batch-norm kernels once per sub-batch, forward and
  backward. A batch slice of a dense tensor is dense in the same memory format, so each kernel reads its
  sub-batch in place and the forward writes straight into its rows of one output tensor: the memory traffic
  of plain BN, G launches instead of one (the backward adds one copy of its sub-batch gradient, as the
  kernel allocates its own result).
- compiled, `grouped_batch_norm`: statistics on the free batch-dim view (G, n/G, C, H, W) and one
  normalisation expression, which torch.compile fuses into a reduction and a pointwise kernel (it cannot
  trace the per-sub-batch kernels' out= writes without breaking the graph at every layer).
"""

from __future__ import annotations

import torch
from torch import nn

from hnmix.errors import HnmixError

native_batch_norm_backward = torch.ops.aten.native_batch_norm_backward


def statistics_dtype(x: torch.Tensor, param: torch.Tensor | None) -> torch.dtype:
    """The dtype the native kernels keep batch statistics in: the accumulation type on GPUs; on the CPU the
    parameters' dtype (fp32 statistics for a bf16 input with fp32 weights), else the input's."""
    if x.dtype == torch.float64:
        return torch.float64
    if x.device.type != "cpu":
        return torch.float32
    return param.dtype if param is not None else x.dtype


def chunk_momenta(momentum: float, groups: int) -> list[float]:
    """Momenta for updating the running stats once per sub-batch, in order, so that the result is the mean
    over sub-batches of their own EMA updates: (1 - m) r + m * mean_g(stat_g). The last sub-batch weighs in
    with m/G; each earlier one with m/G over what the later updates leave of it."""
    return [momentum / (groups - (groups - 1 - g) * momentum) for g in range(groups)]


def per_chunk_forward(x, weight, bias, running_mean, running_var, groups: int, momentum: float, eps: float):
    """(output, saved (2G, C) rows: the sub-batches' means, then their inverse stds); the kernels update the
    running stats in place. Host work: a few calls plus one kernel call per sub-batch."""
    out = torch.empty_like(x)  # preserve_format: x's memory format
    saved = torch.empty(2 * groups, x.shape[1], device=x.device,
                        dtype=statistics_dtype(x, weight if weight is not None else running_mean))
    saved_rows = saved.unbind(0)
    chunks = zip(x.chunk(groups), out.chunk(groups), chunk_momenta(momentum, groups), strict=True)
    for g, (x_g, out_g, momentum_g) in enumerate(chunks):
        torch.native_batch_norm(x_g, weight, bias, running_mean, running_var, True, momentum_g, eps,
                                out=(out_g, saved_rows[g], saved_rows[groups + g]))
    return out, saved


class _SplitBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, groups, momentum, eps):
        out, saved = per_chunk_forward(x, weight, bias, running_mean, running_var, groups, momentum, eps)
        ctx.save_for_backward(x, weight, saved)
        ctx.groups, ctx.eps = groups, eps
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, saved = ctx.saved_tensors
        groups = ctx.groups
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                weight is not None and ctx.needs_input_grad[2]]
        rows = saved.unbind(0)
        grad_in = torch.empty_like(x)
        # per-sub-batch weight and bias gradients, summed at the end
        grad_params = torch.zeros(2, groups, x.shape[1], dtype=(weight if weight is not None else saved).dtype,
                                  device=x.device)
        grad_w_rows, grad_b_rows = grad_params[0].unbind(0), grad_params[1].unbind(0)
        chunks = zip(grad_out.chunk(groups), x.chunk(groups), grad_in.chunk(groups), strict=True)
        for g, (dy_g, x_g, dx_g) in enumerate(chunks):
            args = (dy_g, x_g, weight, None, None, rows[g], rows[groups + g], True, ctx.eps)
            if all(mask):  # the kernel's result is copied into place and freed at once (out= needs all three)
                native_batch_norm_backward.out(*args, mask, out0=dx_g, out1=grad_w_rows[g], out2=grad_b_rows[g])
                continue
            for target, grad in zip((dx_g, grad_w_rows[g], grad_b_rows[g]), native_batch_norm_backward(*args, mask),
                                    strict=True):
                if grad is not None:
                    target.copy_(grad)
        grad_w, grad_b = grad_params.sum(1)
        return (grad_in if mask[0] else None, grad_w if mask[1] else None, grad_b if mask[2] else None,
                None, None, None, None, None)


def split_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                     running_mean: torch.Tensor | None, running_var: torch.Tensor | None, groups: int,
                     momentum: float, eps: float) -> torch.Tensor:
    """Training-mode batch norm of each of `groups` equal sub-batches, in x's memory format (eager form)."""
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _SplitBatchNorm.apply(x, weight, bias, running_mean, running_var, groups, momentum, eps)
    return per_chunk_forward(x, weight, bias, running_mean, running_var, groups, momentum, eps)[0]


def grouped_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, groups: int,
                       momentum: float, eps: float) -> torch.Tensor:
    """The same as split_batch_norm in differentiable elementwise ops (the torch.compile form): fp32
    statistics per (sub-batch, channel) on the batch-dim view, then one affine map per element."""
    n, c = x.shape[:2]
    xg = x.unflatten(0, (groups, n // groups))  # (G, n/G, C, ...): a view in either memory format
    dims = [1, *range(3, xg.dim())]
    var, mean = torch.var_mean(xg.float(), dims, correction=0, keepdim=True)
    scale = torch.rsqrt(var + eps)
    shift = -mean * scale
    if weight is not None:
        w = weight.view(1, 1, c, *[1] * (xg.dim() - 3))
        scale, shift = scale * w, shift * w + bias.view_as(w)
    out = (xg * scale + shift).to(x.dtype).flatten(0, 1)
    if running_mean is not None:
        with torch.no_grad():
            count = xg[0, :, 0].numel()
            running_mean.lerp_(mean.flatten(1).mean(0).to(running_mean.dtype), momentum)
            unbiased = var.flatten(1).mean(0) * (count / max(count - 1, 1))  # BatchNorm's running var
            running_var.lerp_(unbiased.to(running_var.dtype), momentum)
    return out


class SplitBatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d whose training mode normalises `num_splits` contiguous sub-batches separately; eval
    mode is plain BN on the running statistics. State-dict keys are those of nn.BatchNorm2d."""

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.num_splits
        if not self.training or g == 1:
            return super().forward(x)
        if x.shape[0] % g:
            raise HnmixError(f"split batch norm: batch of {x.shape[0]} does not split into {g} equal parts")
        momentum = self.momentum if self.momentum is not None else 0.0
        if self.track_running_stats and self.num_batches_tracked is not None:  # as nn.BatchNorm2d
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        tracked = self.track_running_stats
        form = grouped_batch_norm if torch.compiler.is_compiling() else split_batch_norm
        return form(x, self.weight, self.bias, self.running_mean if tracked else None,
                    self.running_var if tracked else None, g, momentum, self.eps)
