"""Fused rules of AdaMod, Grams, AdaBound and AMSBound (:mod:`optimkit.optimizers.adaptive`):
Adam's moments with a bounded, smoothed or sign-corrected step. The launcher applies each
class's weight decay; step sizes and bounds depend only on the step count and are computed on
the host in double precision."""

import math

import triton
import triton.language as tl

from optimkit.kernels.registry import register_fused
from optimkit.kernels.rules._moments import adam_moments
from optimkit.optimizers.adaptive import AdaBound, AdaMod, AMSBound, Grams


def _step_size(hp, step):
    beta1, beta2 = hp["betas"]
    return {"step_size": hp["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)}


@triton.jit
def adamod(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    exp_avg_lr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    one_minus_beta3,
    eps,
    step_size,
):
    exp_avg, exp_avg_sq = adam_moments(
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    rate = tl.div_rn(step_size, tl.sqrt_rn(exp_avg_sq) + eps)
    exp_avg_lr = exp_avg_lr + one_minus_beta3 * (rate - exp_avg_lr)  # lerp_(rate, 1 - beta3)
    param = param - tl.minimum(rate, exp_avg_lr) * exp_avg
    return param, exp_avg, exp_avg_sq, exp_avg_lr


register_fused(
    AdaMod, rule=adamod, state=("exp_avg", "exp_avg_sq", "exp_avg_lr"), scalars=_step_size
)


@triton.jit
def grams(
    param, grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2, eps, step_size
):
    exp_avg, exp_avg_sq = adam_moments(
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    sign = tl.where(grad > 0, 1.0, tl.where(grad < 0, -1.0, 0.0))
    direction = sign * tl.abs(exp_avg)
    param = param + (-step_size) * tl.div_rn(direction, tl.sqrt_rn(exp_avg_sq) + eps)
    return param, exp_avg, exp_avg_sq


register_fused(Grams, rule=grams, state=("exp_avg", "exp_avg_sq"), scalars=_step_size)


@triton.jit
def adabound(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    lower,
    upper,
    amsbound: tl.constexpr,
):
    exp_avg, exp_avg_sq = adam_moments(
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    second_moment = exp_avg_sq
    if amsbound:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        second_moment = max_exp_avg_sq
    rate = tl.div_rn(step_size, tl.sqrt_rn(second_moment) + eps)
    rate = tl.minimum(tl.maximum(rate, lower), upper)
    param = param - rate * exp_avg
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


def _adabound_scalars(hp, step):
    final_lr, gamma_t = hp["scaled_final_lr"], hp["gamma"] * step
    return {
        **_step_size(hp, step),
        "lower": final_lr * (1 - 1 / (gamma_t + 1)),
        "upper": final_lr * (1 + 1 / gamma_t) if gamma_t > 0 else math.inf,
    }


register_fused(
    AdaBound,
    AMSBound,
    rule=adabound,
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    scalars=_adabound_scalars,
)
