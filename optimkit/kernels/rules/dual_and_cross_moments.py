"""Fused rules of EXAdam and OptimisticAMSGrad (:mod:`optimkit.optimizers.adaptive`) and of
MADGRAD (:mod:`optimkit.optimizers.madgrad`).

Each restates its class's ``update`` on fp32 blocks; step-dependent factors (``beta**step``,
bias corrections, MADGRAD's :math:`\\lambda_k`, EXAdam's growing step size) are computed on the
host in double precision. EXAdam and OptimisticAMSGrad get the engine's weight decay from the
launcher (decoupled and coupled respectively); MADGRAD applies its own, as its ``update`` does.
"""

import math

import triton
import triton.language as tl

from optimkit.kernels.registry import register_fused
from optimkit.kernels.rules._moments import adam_moments
from optimkit.optimizers.adaptive import EXAdam, OptimisticAMSGrad
from optimkit.optimizers.madgrad import MADGRAD


@triton.jit
def exadam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    beta1_power,
    beta2_power,
    bias_correction2,
    step_size,
):
    exp_avg, exp_avg_sq = adam_moments(
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    d1 = tl.div_rn(exp_avg_sq, exp_avg_sq + eps) * beta2_power + 1.0
    exp_avg_2 = exp_avg * exp_avg
    d2 = tl.div_rn(exp_avg_2, exp_avg_2 + eps) * beta1_power + 1.0
    numerator = (exp_avg + grad) * d1
    denom = tl.sqrt_rn(tl.div_rn(d2 * exp_avg_sq, bias_correction2)) + eps
    param = param + (-step_size) * tl.div_rn(numerator, denom)
    return param, exp_avg, exp_avg_sq


def _exadam_scalars(hp, step):
    beta1, beta2 = hp["betas"]
    lr = hp["lr"] * (math.log(math.sqrt(2 * (step + 1))) if hp["growing_lr"] else 1.0)
    return {
        "beta1_power": beta1**step,
        "beta2_power": beta2**step,
        "bias_correction2": 1 - beta2**step,
        "step_size": lr / (1 - beta1**step),
    }


register_fused(EXAdam, rule=exadam, state=("exp_avg", "exp_avg_sq"), scalars=_exadam_scalars)


@triton.jit
def optimistic_amsgrad(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    half_iterate,
    lr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
):
    exp_avg, exp_avg_sq = adam_moments(
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
    step = tl.div_rn(exp_avg, tl.sqrt_rn(max_exp_avg_sq))
    half_iterate = half_iterate + (-lr) * step  # w_{t+1/2}
    param = half_iterate + (-lr) * step  # w_{t+1}: the predicted gradient is the last one
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq, half_iterate


register_fused(
    OptimisticAMSGrad,
    rule=optimistic_amsgrad,
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "half_iterate"),
)


@triton.jit
def _cube_root(x):
    """:math:`x^{1/3}` for :math:`x \\ge 0`: ``exp2(log2(x)/3)`` refined by one Newton step
    (within an ulp or two of ``torch.pow(x, 1/3)``); 0 for 0."""
    positive = x > 0.0
    safe = tl.where(positive, x, 1.0)  # no log of 0 (and no 0/0 in the Newton step)
    guess = tl.exp2(tl.log2(safe) / 3.0)
    refined = guess - tl.div_rn(guess * guess * guess - safe, 3.0 * guess * guess)
    return tl.where(positive, refined, x)


@triton.jit
def madgrad(
    param,
    grad,
    grad_sum_sq,
    s,
    x0,
    lamb,
    eps,
    weight_decay,
    keep,
    one_minus_momentum,
    has_momentum: tl.constexpr,
    coupled_decay: tl.constexpr,
    zero_eps: tl.constexpr,
    plain_copy: tl.constexpr,
):
    if coupled_decay:
        grad = grad + weight_decay * param
    if not has_momentum:  # x0 from the current point and the old dual average
        rms = _cube_root(grad_sum_sq) + eps
        if zero_eps:
            rms = tl.where(rms == 0.0, float("inf"), rms)
        x0 = param + tl.div_rn(s, rms)
    grad_sum_sq = grad_sum_sq + lamb * grad * grad
    rms = _cube_root(grad_sum_sq) + eps
    if zero_eps:
        rms = tl.where(rms == 0.0, float("inf"), rms)
    s = s + lamb * grad
    z = x0 - tl.div_rn(s, rms)
    if plain_copy:  # noqa: SIM108 (a constexpr branch: one side is compiled)
        param = z
    else:
        param = param * keep + one_minus_momentum * z
    return param, grad_sum_sq, s, x0


def _madgrad_scalars(hp, step):
    eps, momentum, weight_decay = hp["eps"], hp["momentum"], hp["weight_decay"]
    lr = hp["lr"] + eps if hp["lr"] != 0 else 0.0
    decoupled = hp["decouple_decay"] and weight_decay != 0
    return {
        "lamb": lr * math.sqrt(step),
        "keep": momentum - lr * weight_decay if decoupled else momentum,
    }


def _madgrad_flags(hp):
    decoupled = hp["decouple_decay"] and hp["weight_decay"] != 0
    return {
        "has_momentum": hp["momentum"] != 0,
        "coupled_decay": hp["weight_decay"] != 0 and not hp["decouple_decay"],
        "zero_eps": hp["eps"] == 0,
        "plain_copy": hp["momentum"] == 0 and not decoupled,
    }


register_fused(
    MADGRAD,
    rule=madgrad,
    state=("grad_sum_sq", "s", "x0"),
    scalars=_madgrad_scalars,
    flags=_madgrad_flags,
)
