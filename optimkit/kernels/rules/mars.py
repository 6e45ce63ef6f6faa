"""Fused rule of MARS (:mod:`optimkit.optimizers.mars`), the approximate variant of plain
``step()`` (the exact variant, with a closure, takes the foreach rule).

Matrices take MARS: :math:`c = g + \\gamma\\frac{\\beta_1}{1-\\beta_1}(g - g_{t-1})`, clipped to
norm 1 per tensor (the norm comes from one extra read of ``grad`` and ``last_grad``), then the
AdamW or Lion step on :math:`c`; other tensors take the AdamW of ``betas_1d`` (unless
``optimize_1d``). Which one a tensor takes is a per-tensor scalar from the reduction's
``finish`` (the Python rule's ``_is_matrix``), so one launch serves a mixed bucket; the kernel
computes both directions and keeps one. Bytes per fp32 parameter at the defaults (AdamW
flavour): 8 (reduction) + 12 + 8 * 3 = 44.
"""

import math

import torch
import triton
import triton.language as tl

from optimkit.kernels.registry import Reduction, register_fused
from optimkit.optimizers.mars import MARS, _is_matrix


@triton.jit
def _correction(grad, last_grad, correction_scale):
    return (grad - last_grad) * correction_scale + grad


@triton.jit
def mars_stats(param, grad, last_grad, correction_scale):
    c = _correction(grad, last_grad, correction_scale)
    return c * c


@triton.jit
def _adam_direction(exp_avg, second_moment, bias_correction1, bias_correction2_sqrt, eps):
    denom = (tl.sqrt_rn(second_moment) / bias_correction2_sqrt + eps) * bias_correction1
    return tl.div_rn(exp_avg, denom)


@triton.jit
def mars(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    last_grad,
    clip_norm,
    is_matrix,
    lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    correction_scale,
    bias_correction1,
    bias_correction2_sqrt,
    decay,
    lr_1d,
    beta1_1d,
    one_minus_beta1_1d,
    beta2_1d,
    one_minus_beta2_1d,
    bias_correction1_1d,
    bias_correction2_sqrt_1d,
    decay_1d,
    eps,
    lion: tl.constexpr,
    amsgrad: tl.constexpr,
):
    matrix = is_matrix > 0.5
    c = tl.div_rn(_correction(grad, last_grad, correction_scale), clip_norm)
    signal = tl.where(matrix, c, grad)  # what the moments see
    first = tl.where(matrix, beta1, beta1_1d)
    rest = tl.where(matrix, one_minus_beta1, one_minus_beta1_1d)  # 1 - beta (host, double)
    second = tl.where(matrix, beta2, beta2_1d)
    rest2 = tl.where(matrix, one_minus_beta2, one_minus_beta2_1d)
    exp_avg = exp_avg * first + rest * signal
    if lion:  # matrices keep no second moment; non-matrices take AdamW
        exp_avg_sq = tl.where(matrix, exp_avg_sq, exp_avg_sq * second + rest2 * grad * grad)
    else:
        exp_avg_sq = exp_avg_sq * second + rest2 * signal * signal
    moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        moment = max_exp_avg_sq
    bc1 = tl.where(matrix, bias_correction1, bias_correction1_1d)
    bc2 = tl.where(matrix, bias_correction2_sqrt, bias_correction2_sqrt_1d)
    direction = _adam_direction(exp_avg, moment, bc1, bc2, eps)
    if lion:
        sign = tl.where(exp_avg > 0.0, 1.0, tl.where(exp_avg < 0.0, -1.0, exp_avg * 0.0))
        direction = tl.where(matrix, sign, direction)
    param = param * tl.where(matrix, decay, decay_1d)
    param = param + (-tl.where(matrix, lr, lr_1d)) * direction
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq, grad


def _mars_scalars(hp, step):
    beta1, beta2 = hp["betas"]
    beta1_1d, beta2_1d = hp["betas_1d"]
    lr, lr_1d = hp["lr"], hp["lr"] * hp["lr_1d_factor"]
    return {
        "correction_scale": hp["gamma"] * beta1 / (1 - beta1),
        "bias_correction1": 1 - beta1**step,
        "bias_correction2_sqrt": math.sqrt(1 - beta2**step),
        "decay": 1 - lr * hp["weight_decay"],
        "lr_1d": lr_1d,
        "beta1_1d": beta1_1d,
        "beta2_1d": beta2_1d,
        "bias_correction1_1d": 1 - beta1_1d**step,
        "bias_correction2_sqrt_1d": math.sqrt(1 - beta2_1d**step),
        "decay_1d": 1 - lr_1d * hp["weight_decay_1d"],
    }


def _mars_finish(sums, inputs):
    """Per tensor: the clipping divisor max(||c||, 1) and whether it takes MARS."""
    clip = sums[:, 0].sqrt().clamp_min(1.0)
    optimize_all = inputs.hp["optimize_1d"]
    flags = [optimize_all or _is_matrix(p) for p in inputs.params]
    is_matrix = torch.tensor(flags, dtype=torch.float32).to(clip.device, non_blocking=True)
    return torch.stack([clip, is_matrix], dim=1)


register_fused(
    MARS,
    rule=mars,
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "last_grad"),
    scalars=_mars_scalars,
    flags=lambda hp: {"lion": hp["optimizer"] == "lion", "amsgrad": hp["amsgrad"]},
    supports=lambda hp: not hp["exact"],
    reduction=Reduction(mars_stats, _mars_finish, outputs=("clip_norm", "is_matrix"), count=1),
)
