"""Fused rule of RAdam (:mod:`optimkit.optimizers.adaptive`); weight decay (coupled, or
decoupled with ``decoupled_weight_decay``) is applied by the launcher. The rectification and
the choice between the adaptive and the SGD-like step depend only on the step count, so they
are computed on the host in double precision."""

import math

import triton
import triton.language as tl

from optimkit.kernels.registry import register_fused
from optimkit.kernels.rules._moments import adam_moments
from optimkit.optimizers.adaptive import RAdam


@triton.jit
def radam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    adaptive_step,
    sgd_step,
    rectified,
):
    exp_avg, exp_avg_sq = adam_moments(
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    adaptive = param + (-adaptive_step) * tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) + eps)
    plain = param + (-sgd_step) * exp_avg
    param = tl.where(rectified > 0.5, adaptive, plain)
    return param, exp_avg, exp_avg_sq


def _radam_scalars(hp, step):
    beta1, beta2 = hp["betas"]
    bias_correction1 = 1 - beta1**step
    rho_inf = 2 / (1 - beta2) - 1
    beta2_t = beta2**step
    rho_t = rho_inf - 2 * step * beta2_t / (1 - beta2_t)
    if rho_t > 5:
        rectification = math.sqrt(
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        )
        adaptive = hp["lr"] * rectification / bias_correction1 * math.sqrt(1 - beta2_t)
        return {"adaptive_step": adaptive, "sgd_step": 0.0, "rectified": 1.0}
    sgd = hp["lr"] / bias_correction1 if hp["degenerated_to_sgd"] else 0.0
    return {"adaptive_step": 0.0, "sgd_step": sgd, "rectified": 0.0}


register_fused(RAdam, rule=radam, state=("exp_avg", "exp_avg_sq"), scalars=_radam_scalars)
