"""Fused rules of Adam, AdamW, AMSGrad and AdaMax (:mod:`optimkit.optimizers.adam`).

Each rule restates ``update`` of its class line for line on fp32 blocks; the launcher has
already unscaled the gradient, applied ``maximize`` and the class's weight decay.
"""

import math

import triton
import triton.language as tl

from optimkit.kernels.registry import register_fused
from optimkit.kernels.rules._moments import adam_moments
from optimkit.optimizers.adam import Adam, AdaMax, AdamW, AMSGrad


@triton.jit
def adam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    lr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bias_correction1,
    bias_correction2_sqrt,
    amsgrad: tl.constexpr,
):
    exp_avg, exp_avg_sq = adam_moments(
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        second_moment = max_exp_avg_sq
    denom = tl.sqrt_rn(second_moment) / bias_correction2_sqrt + eps
    param = param + (-lr / bias_correction1) * tl.div_rn(exp_avg, denom)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


def _adam_scalars(hp, step):
    beta1, beta2 = hp["betas"]
    return {
        "bias_correction1": 1 - beta1**step,
        "bias_correction2_sqrt": math.sqrt(1 - beta2**step),
    }


register_fused(
    Adam,
    AdamW,
    AMSGrad,
    rule=adam,
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    scalars=_adam_scalars,
)


@triton.jit
def adamax(param, grad, exp_avg, exp_inf, lr, one_minus_beta1, beta2, eps, bias_correction1):
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)  # exp_avg.lerp_(grad, 1 - beta1)
    exp_inf = tl.maximum(exp_inf * beta2, tl.abs(grad) + eps, propagate_nan=tl.PropagateNan.ALL)
    param = param + (-lr / bias_correction1) * tl.div_rn(exp_avg, exp_inf)
    return param, exp_avg, exp_inf


register_fused(
    AdaMax,
    rule=adamax,
    state=("exp_avg", "exp_inf"),
    scalars=lambda hp, step: {"bias_correction1": 1 - hp["betas"][0] ** step},
)
