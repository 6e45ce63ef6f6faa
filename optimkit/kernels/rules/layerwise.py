"""Fused rules of LAMB, LARS, TVLARS and NovoGrad (:mod:`optimkit.optimizers.layerwise`): per-
tensor norms in one extra read-only pass (:class:`~optimkit.kernels.registry.Reduction`), then
the elementwise pass.

Bytes moved per fp32 parameter (the elementwise pass's reads and writes plus the reduction
pass's reads): LAMB 16 + 28 = 44 (the reduction needs the updated moments, recomputed in
registers from ``param``, ``grad`` and the old moments); LARS and TVLARS 8 + 20 = 28; NovoGrad 4
+ 20 = 24 (its reduction reads only the gradient; unused loads are compiled out). The per-tensor
scalars (trust ratios, NovoGrad's second moment) are computed by the same helpers as the Python
rules.
"""

import math

import torch
import triton
import triton.language as tl

from optimkit.engine import TensorList
from optimkit.kernels.registry import Reduction, register_fused
from optimkit.optimizers.layerwise import (
    LAMB,
    LARS,
    TVLARS,
    NovoGrad,
    _guarded,
    _keep_excluded,
)


@triton.jit
def _lamb_direction(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bias_correction1,
    bias_correction2_sqrt,
    weight_decay,
    grad_averaging: tl.constexpr,
):
    """The moments and LAMB's direction ``r + lambda x`` (before the trust ratio)."""
    if grad_averaging:
        exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    else:
        exp_avg = exp_avg * beta1 + grad
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    denom = tl.sqrt_rn(exp_avg_sq) / bias_correction2_sqrt + eps
    update = tl.div_rn(tl.div_rn(exp_avg, denom), bias_correction1)
    update = update + weight_decay * param
    return update, exp_avg, exp_avg_sq


@triton.jit
def lamb_stats(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bias_correction1,
    bias_correction2_sqrt,
    weight_decay,
    grad_averaging: tl.constexpr,
):
    update, exp_avg, exp_avg_sq = _lamb_direction(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        bias_correction1,
        bias_correction2_sqrt,
        weight_decay,
        grad_averaging,
    )
    return param * param, update * update


@triton.jit
def lamb(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    trust_ratio,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bias_correction1,
    bias_correction2_sqrt,
    weight_decay,
    grad_averaging: tl.constexpr,
):
    update, exp_avg, exp_avg_sq = _lamb_direction(
        param,
        grad,
        exp_avg,
        exp_avg_sq,
        beta1,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        bias_correction1,
        bias_correction2_sqrt,
        weight_decay,
        grad_averaging,
    )
    param = param + (-lr) * (update * trust_ratio)
    return param, exp_avg, exp_avg_sq


def _lamb_scalars(hp, step):
    beta1, beta2 = hp["betas"]
    if hp["bias_correction"]:
        return {
            "bias_correction1": 1 - beta1**step,
            "bias_correction2_sqrt": math.sqrt(1 - beta2**step),
        }
    return {"bias_correction1": 1.0, "bias_correction2_sqrt": 1.0}


def _norms(sums):
    return sums.sqrt().unbind(1)


def _lamb_finish(sums, inputs):
    hp = inputs.hp
    weight_norm, update_norm = _norms(sums)
    ratio = _guarded(weight_norm / update_norm, weight_norm, update_norm)
    ratio = _keep_excluded(ratio, TensorList(inputs.params), hp["exclude_from_layer_adaptation"])
    return ratio.unsqueeze(1)


register_fused(
    LAMB,
    rule=lamb,
    state=("exp_avg", "exp_avg_sq"),
    scalars=_lamb_scalars,
    reduction=Reduction(lamb_stats, _lamb_finish, outputs=("trust_ratio",), count=2),
)


@triton.jit
def lars_stats(param, grad):
    return param * param, grad * grad


@triton.jit
def lars(param, grad, momentum_buffer, trust_ratio, lr, momentum, weight_decay):
    direction = grad + weight_decay * param
    momentum_buffer = momentum_buffer * momentum + direction * trust_ratio
    param = param + (-lr) * momentum_buffer
    return param, momentum_buffer


def _lars_finish(sums, inputs):
    hp = inputs.hp
    weight_norm, grad_norm = _norms(sums)
    coefficient = hp["trust_coefficient"]
    ratio = coefficient * weight_norm / (grad_norm + hp["weight_decay"] * weight_norm + hp["eps"])
    ratio = _guarded(ratio, weight_norm, grad_norm)
    ratio = _keep_excluded(ratio, TensorList(inputs.params), hp["exclude_from_layer_adaptation"])
    return ratio.unsqueeze(1)


register_fused(
    LARS,
    rule=lars,
    state=("momentum_buffer",),
    reduction=Reduction(lars_stats, _lars_finish, outputs=("trust_ratio",), count=2),
)


@triton.jit
def novograd_stats(param, grad):
    return grad * grad


@triton.jit
def novograd(param, grad, exp_avg, denom, lr, beta1, one_minus_beta1, weight_decay, averaging):
    direction = tl.div_rn(grad, denom) + weight_decay * param
    direction = direction * averaging
    exp_avg = exp_avg * beta1 + direction
    param = param + (-lr) * exp_avg
    return param, exp_avg


def _novograd_finish(sums, inputs):
    """The per-tensor second moment (``exp_avg_sq``, 0-d state, updated in place as the
    Python rule does) and the denominator ``sqrt(v) + eps``."""
    hp, step = inputs.hp, inputs.step
    exp_avg_sq = inputs.tensor_state["exp_avg_sq"]
    beta2 = hp["betas"][1]
    grad_norm = sums[:, 0].sqrt()
    square = grad_norm * grad_norm
    if step == 1:
        second = square
    else:
        second = torch.stack(exp_avg_sq).to(square.dtype) * beta2 + square * (1 - beta2)
    torch._foreach_copy_(exp_avg_sq, list(second.unbind()))
    stored = torch.stack(exp_avg_sq).to(square.dtype)  # as the state keeps it
    return (stored.sqrt() + hp["eps"]).unsqueeze(1)


register_fused(
    NovoGrad,
    rule=novograd,
    state=("exp_avg",),
    scalars=lambda hp, step: {"averaging": 1 - hp["betas"][0] if hp["grad_averaging"] else 1.0},
    reduction=Reduction(
        novograd_stats,
        _novograd_finish,
        outputs=("denom",),
        count=1,
        tensor_state=("exp_avg_sq",),
    ),
)


@triton.jit
def tvlars_stats(param, grad, weight_decay):
    direction = grad + weight_decay * param
    return param * param, direction * direction


def _tvlars_finish(sums, inputs):
    hp = inputs.hp
    weight_norm, direction_norm = _norms(sums)
    clip = hp["norm_clip"]
    weight_norm, direction_norm = weight_norm.clamp_max(clip), direction_norm.clamp_max(clip)
    scale = hp["trust_coefficient"] * TVLARS.phi(inputs.step, hp)
    ratio = _guarded(scale * weight_norm / direction_norm, weight_norm, direction_norm)
    ratio = _keep_excluded(ratio, TensorList(inputs.params), hp["lars_adaptation_filter"])
    return ratio.unsqueeze(1)


register_fused(
    TVLARS,
    rule=lars,  # the same momentum step on d = g + beta w, with TVLARS's ratio
    state=("momentum_buffer",),
    reduction=Reduction(tvlars_stats, _tvlars_finish, outputs=("trust_ratio",), count=2),
    # weight_decay_filter exempts 1-D tensors from decay: a per-tensor decay the reduction
    # pass does not take; such groups run the foreach rule
    supports=lambda hp: not (hp["weight_decay_filter"] and hp["weight_decay"] != 0),
)
