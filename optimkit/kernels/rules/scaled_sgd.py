"""Fused rules of Gravity (:mod:`optimkit.optimizers.gravity`) and SGD-SaI
(:mod:`optimkit.optimizers.sgdsai`): elementwise updates scaled by one number per tensor.

Gravity needs each tensor's ``max |g|`` at every step: one extra read-only pass over the
gradient (a "max" reduction), so 4 + 20 = 24 bytes per fp32 parameter. SGD-SaI's per-tensor
g-SNR is computed once, at the first step, by the Python rule's own helper (``_gsnr``) on the
gradients, and read from the state afterwards: no extra pass after the first step.
"""

import torch
import triton
import triton.language as tl

from optimkit.kernels.registry import Reduction, register_fused
from optimkit.optimizers.gravity import Gravity
from optimkit.optimizers.sgdsai import SGDSaI, _gsnr


@triton.jit
def gravity_stats(param, grad):
    return tl.abs(grad)


@triton.jit
def gravity(param, grad, velocity, grad_max, lr, beta_hat, one_minus_beta_hat):
    scaled = tl.abs(grad) * grad_max  # |g| / M with 1/M = max |g| of the tensor
    denom = scaled * scaled + 1.0
    velocity = velocity * beta_hat + one_minus_beta_hat * tl.div_rn(grad, denom)
    param = param + (-lr) * velocity
    return param, velocity


def _gravity_finish(maxima, inputs):
    largest = maxima[:, 0]
    return torch.where(torch.isfinite(largest), largest, 0.0).unsqueeze(1)  # empty: 0


def _gravity_scalars(hp, step):
    iterations = step - 1  # the Keras optimizer.iterations before this step
    return {"beta_hat": (hp["beta"] * iterations + 1) / (iterations + 2)}


register_fused(
    Gravity,
    rule=gravity,
    state=("velocity",),
    scalars=_gravity_scalars,
    reduction=Reduction(
        gravity_stats, _gravity_finish, outputs=("grad_max",), count=1, kinds=("max",)
    ),
)


@triton.jit
def sgdsai(
    param,
    grad,
    momentum_buffer,
    gsnr,
    lr,
    momentum,
    one_minus_momentum,
    first,
    has_momentum: tl.constexpr,
):
    if has_momentum:
        momentum_buffer = tl.where(
            first > 0.5, grad, momentum_buffer * momentum + one_minus_momentum * grad
        )
        grad = momentum_buffer
    param = param + grad * (gsnr * -lr)
    return param, momentum_buffer


def _sgdsai_finish(sums, inputs):
    """The g-SNR of each tensor: computed from the (unscaled) gradients at the first step
    with the Python rule's helper and stored in the state; read from the state afterwards."""
    gsnr = inputs.tensor_state["gsnr"]
    if inputs.step == 1:
        grads = inputs.grads
        if inputs.grad_scale is not None:
            grads = torch._foreach_div(grads, inputs.grad_scale)
        torch._foreach_copy_(gsnr, [_gsnr(g, inputs.hp["eps"]) for g in grads])
    return torch.stack(gsnr).unsqueeze(1)


register_fused(
    SGDSaI,
    rule=sgdsai,
    state=("momentum_buffer",),
    scalars=lambda hp, step: {"first": float(step == 1)},
    flags=lambda hp: {"has_momentum": hp["momentum"] != 0},
    reduction=Reduction(None, _sgdsai_finish, outputs=("gsnr",), count=0, tensor_state=("gsnr",)),
)
