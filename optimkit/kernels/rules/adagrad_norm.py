"""Fused rules of AdaGrad-Norm and Clip-RAdaGradD (:mod:`optimkit.optimizers.adagrad`).

AdaGrad-Norm has one step size for the whole param group, computed by the engine's group
statistic (``GroupNormOptimizer.group_step``, a 0-d tensor on the device) and handed to the
kernel as a per-tensor scalar without a host synchronisation: 12 bytes per fp32 parameter.
Clip-RAdaGradD's clipping factor is per tensor ("local": one extra read of the gradient for its
norm, 4 bytes), per group ("global": from ``group_step``) or none ("elementwise" clamps in the
kernel); 28 bytes per fp32 parameter plus the local mode's 4."""

import torch
import triton
import triton.language as tl  # noqa: F401 (the interpreter needs it visible)

from optimkit.kernels.registry import Reduction, register_fused
from optimkit.optimizers.adagrad import AdaGradNorm, ClipRAdaGradD


@triton.jit
def adagrad_norm(param, grad, step_size):
    param = param - grad * step_size
    return param


def _group_step_size(sums, inputs):
    step_size = inputs.hp["step_size"]
    return step_size.reshape(1, 1).expand(len(inputs.params), 1)


register_fused(
    AdaGradNorm,
    rule=adagrad_norm,
    reduction=Reduction(None, _group_step_size, outputs=("step_size",), count=0),
)


@triton.jit
def clip_radagradd_stats(param, grad):
    return grad * grad


@triton.jit
def clip_radagradd(
    param,
    grad,
    sum,
    prev_grad,
    coefficient,
    lr,
    eps,
    eta,
    max_grad_norm,
    decay,
    elementwise: tl.constexpr,
):
    if elementwise:
        clipped = tl.minimum(tl.maximum(grad, -max_grad_norm), max_grad_norm)
    else:
        clipped = grad * coefficient  # 1 without clipping
    sum = sum + eta * prev_grad * prev_grad  # the delayed accumulator: previous gradient
    denom = tl.sqrt_rn(sum) + eps
    param = param + (-lr) * tl.div_rn(prev_grad, denom)
    param = param + decay * param  # -lr * weight_decay, after the step (authors' code)
    return param, sum, clipped


def _clip_coefficients(sums, inputs):
    """Per tensor: the clipping factor of the chosen mode (1 for "elementwise"/"none")."""
    hp = inputs.hp
    n = len(inputs.params)
    if hp["clipping"] == "local":  # as the Python rule: min(limit / (||g|| + 1e-6), 1)
        return (hp["max_grad_norm"] / (sums[:, 0].sqrt() + 1e-6)).clamp_max(1.0).unsqueeze(1)
    if hp["clipping"] == "global":  # from group_step, a device scalar
        return hp["global_clip"].reshape(1, 1).expand(n, 1)
    return torch.ones((n, 1), device=inputs.params[0].device)


register_fused(
    ClipRAdaGradD,
    rule=clip_radagradd,
    state=("sum", "prev_grad"),
    scalars=lambda hp, step: {"decay": -hp["lr"] * hp["weight_decay"]},
    flags=lambda hp: {"elementwise": hp["clipping"] == "elementwise"},
    reduction=Reduction(
        clip_radagradd_stats,
        _clip_coefficients,
        outputs=("coefficient",),
        count=1,
        needed=lambda hp: hp["clipping"] == "local",
    ),
)
