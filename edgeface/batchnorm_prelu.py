"""BatchNorm2d followed by PReLU in training mode, as one autograd function that saves less.

`nn.BatchNorm2d` then `nn.PReLU` save two tensors of the layer's size for the backward pass: the
BatchNorm input x and the PReLU input y = BN(x). `batchnorm_prelu` saves only y and recovers the
normalized input x_hat = (y - beta) / gamma in the backward pass. The forward output and the
running statistics are bitwise those of the two modules, and the gradients differ only by float
rounding.

The backward pass also computes the PReLU gradients with plain elementwise ops instead of
`aten._prelu_kernel_backward`. That kernel took 19 ms against 0.3 ms for the PReLU forward on a
(128, 64, 16, 16) channels-last float32 tensor, measured with torch 2.14.1 on one thread of a
2-core AMD EPYC VM with AVX-512.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# A channel keeps its slice of x for the backward pass where |beta| / |gamma| + |mean| / std
# reaches this limit. Below it, recovering x_hat from the float32 y loses about 64 times
# float32's rounding error, 4e-6 relative to x_hat's scale (an estimate, not a bound). Above
# it, or where gamma is 0, the recovery loses more precision or is impossible.
RECOVERY_LIMIT = 64.0

_fusion_enabled = True


@contextlib.contextmanager
def plain_modules() -> Iterator[None]:
    """Run BatchNorm and PReLU as the plain modules inside the block, as plain PyTorch would.

    For measuring against an unfused baseline (`benchmarks/bench_training.py`). Not thread-safe:
    it switches the fusion off for the whole process.
    """
    global _fusion_enabled
    previous, _fusion_enabled = _fusion_enabled, False
    try:
        yield
    finally:
        _fusion_enabled = previous


def batchnorm_prelu_applies(bn: nn.Module, act: nn.Module, x: torch.Tensor) -> bool:
    """Return whether `batchnorm_prelu` can stand in for `act(bn(x))` in this call.

    Only for training with autograd on, float32 or float64 CPU tensors, no autocast, a
    BatchNorm2d that tracks running statistics and a per-channel PReLU. Everything else
    (eval mode, ONNX export, bf16 autocast, a `plain_modules` block) keeps the plain modules.
    """
    return (
        _fusion_enabled and isinstance(bn, nn.BatchNorm2d) and isinstance(act, nn.PReLU)
        and bn.training and torch.is_grad_enabled()
        and bn.track_running_stats and bn.running_mean is not None and bn.affine
        and act.weight.numel() == bn.num_features
        and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
    )


def batchnorm_prelu(x: torch.Tensor, bn: nn.BatchNorm2d, act: nn.PReLU) -> torch.Tensor:
    """Return `act(bn(x))` in training mode, updating `bn`'s running statistics as `bn` would.

    Writes the output into `x`'s memory, so pass a tensor nothing else reads afterwards, such
    as a fresh convolution output. Check `batchnorm_prelu_applies` first.
    """
    # The running-statistics update of nn.BatchNorm2d.forward in training mode: momentum None
    # means a cumulative average over the batches seen.
    bn.num_batches_tracked.add_(1)
    if bn.momentum is None:
        momentum = 1.0 / float(bn.num_batches_tracked)
    else:
        momentum = bn.momentum
    return _BatchNormPReLU.apply(x, bn.weight, bn.bias, act.weight, bn.running_mean,
                                 bn.running_var, momentum, bn.eps)


def _channels(vector: torch.Tensor) -> torch.Tensor:
    """View a per-channel vector (C,) so that it broadcasts over (N, C, H, W)."""
    return vector.reshape(-1, 1, 1)


class _BatchNormPReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gamma, beta, alpha, running_mean, running_var, momentum, eps):
        # nn.BatchNorm2d reaches this op on CPU (torch 2.14.1). It updates the running
        # statistics in place.
        y, mean, invstd = torch.ops.aten.native_batch_norm(
            x, gamma, beta, running_mean, running_var, True, momentum, eps)

        spread = beta.abs() + gamma.abs() * mean.abs() * invstd
        exact = torch.nonzero(~(spread < RECOVERY_LIMIT * gamma.abs())).flatten()
        x_exact = x.index_select(1, exact)

        # PReLU as slope * y with slope 1 where y > 0, else alpha: bitwise equal to nn.PReLU.
        # The output reuses x's memory, because x is not needed any more.
        out = torch.gt(y, 0, out=x)
        torch.lerp(_channels(alpha), alpha.new_ones(()), out, out=out)
        out.mul_(y)
        ctx.mark_dirty(x)

        ctx.save_for_backward(y, gamma, beta, alpha, mean, invstd, exact, x_exact)
        ctx.eps = eps
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        y, gamma, beta, alpha, mean, invstd, exact, x_exact = ctx.saved_tensors

        # PReLU gradients: d alpha is the sum of grad * y where y <= 0, and d y is grad * slope.
        buffer = torch.clamp(y, max=0).mul_(grad_out)
        grad_alpha = buffer.sum((0, 2, 3))
        torch.gt(y, 0, out=buffer)
        torch.lerp(_channels(alpha), alpha.new_ones(()), buffer, out=buffer)
        grad_y = buffer.mul_(grad_out)

        # y is not needed any more (a second backward through this graph fails on its version
        # counter), so it becomes x_hat in place. Channels in `exact` get it from x instead.
        x_hat = y.sub_(_channels(beta)).div_(_channels(gamma))
        if exact.numel():
            x_hat_exact = (x_exact - _channels(mean[exact])) * _channels(invstd[exact])
            x_hat.index_copy_(1, exact, x_hat_exact)

        # BatchNorm backward on x_hat: with mean 0 and invstd 1 the kernel computes the
        # gradients of gamma and beta directly, and weight gamma * invstd scales grad_x.
        grad_x, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
            grad_y, x_hat, gamma * invstd, None, None, torch.zeros_like(mean),
            torch.ones_like(invstd), True, ctx.eps, [True, True, True])
        return grad_x, grad_gamma, grad_beta, grad_alpha, None, None, None, None
