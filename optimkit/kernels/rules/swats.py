"""Fused rule of SWATS (:mod:`optimkit.optimizers.swats`).

Each tensor is in the Adam phase or, once switched, in the SGD phase; the phase is a per-tensor
scalar, so one launch serves a bucket in both phases (the kernel computes both steps and keeps
one) and, unlike the foreach path, nothing is read back to the host. The Adam phase's SGD
learning-rate estimate needs :math:`p_k^\\top g_k` and :math:`p_k^\\top p_k` of this step's Adam
step :math:`p_k`: one extra read-only pass recomputes :math:`p_k` from the old moments in
registers (it reads the gradient and both moments: 12 bytes per fp32 parameter) and sums the two
products; ``finish`` then updates the per-tensor estimates and decides the switches exactly as
the Python rule does, and the elementwise pass zeroes the moment of a tensor that switches. 28 +
12 = 40 bytes per fp32 parameter.
"""

import math

import torch
import triton
import triton.language as tl

from optimkit.kernels.registry import Reduction, register_fused
from optimkit.optimizers.swats import SWATS


@triton.jit
def _adam_phase(
    grad, exp_avg, exp_avg_sq, one_minus_beta1, beta1, beta2, one_minus_beta2, eps, adam_scale
):
    exp_avg = exp_avg * beta1 + one_minus_beta1 * grad
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    adam_step = tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) + eps) * adam_scale
    return adam_step, exp_avg, exp_avg_sq


@triton.jit
def swats_stats(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    one_minus_beta1,
    beta1,
    beta2,
    one_minus_beta2,
    eps,
    adam_scale,
):
    adam_step, exp_avg, exp_avg_sq = _adam_phase(
        grad,
        exp_avg,
        exp_avg_sq,
        one_minus_beta1,
        beta1,
        beta2,
        one_minus_beta2,
        eps,
        adam_scale,
    )
    return adam_step * grad, adam_step * adam_step


@triton.jit
def swats(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    sgd_phase,
    sgd_lr,
    keep,
    one_minus_beta1,
    beta1,
    beta2,
    one_minus_beta2,
    eps,
    adam_scale,
):
    adam_step, adam_avg, adam_avg_sq = _adam_phase(
        grad,
        exp_avg,
        exp_avg_sq,
        one_minus_beta1,
        beta1,
        beta2,
        one_minus_beta2,
        eps,
        adam_scale,
    )
    velocity = exp_avg * beta1 + grad  # the SGD phase's momentum
    sgd = sgd_phase > 0.5
    param = tl.where(sgd, param + (-one_minus_beta1) * (velocity * sgd_lr), param + adam_step)
    exp_avg = tl.where(sgd, velocity, adam_avg * keep)  # v = 0 at the switch
    exp_avg_sq = tl.where(sgd, exp_avg_sq, adam_avg_sq)
    return param, exp_avg, exp_avg_sq


def _swats_scalars(hp, step):
    beta1, beta2 = hp["betas"]
    return {"adam_scale": -hp["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)}


def _swats_finish(sums, inputs):
    """The Python rule's per-tensor bookkeeping of the Adam phase (estimates, switches), in
    the dtype of the 0-d state; returns each tensor's phase before this step, its SGD
    learning rate and whether its moment is kept."""
    hp, step = inputs.hp, inputs.step
    beta2 = hp["betas"][1]
    phases = inputs.tensor_state["sgd_phase"]
    lambdas, sgd_lrs = inputs.tensor_state["exp_avg_lr"], inputs.tensor_state["sgd_lr"]
    old_phase, old = torch.stack(phases), torch.stack(lambdas)
    dot_pg, dot_pp = sums[:, 0].to(old.dtype), sums[:, 1].to(old.dtype)
    adam = old_phase == 0
    moving = dot_pg != 0
    gamma = torch.where(moving, dot_pp / -dot_pg, torch.zeros_like(dot_pp))
    new = torch.where(moving, old * beta2 + gamma * (1 - beta2), old)
    estimate = new / (1 - beta2**step)
    switch = moving & ((estimate - gamma).abs() < hp["switch_tol"]) & adam
    if step <= 1:
        switch = torch.zeros_like(switch)
    old_lr = torch.stack(sgd_lrs)
    torch._foreach_copy_(lambdas, list(torch.where(adam, new, old).unbind()))
    torch._foreach_copy_(sgd_lrs, list(torch.where(switch, estimate, old_lr).unbind()))
    new_phase = torch.where(switch, torch.ones_like(old_phase), old_phase)
    torch._foreach_copy_(phases, list(new_phase.unbind()))
    keep = (~switch).to(torch.float32)
    return torch.stack([old_phase.float(), old_lr.float(), keep], dim=1)


register_fused(
    SWATS,
    rule=swats,
    state=("exp_avg", "exp_avg_sq"),
    scalars=_swats_scalars,
    reduction=Reduction(
        swats_stats,
        _swats_finish,
        outputs=("sgd_phase", "sgd_lr", "keep"),
        count=2,
        tensor_state=("sgd_phase", "exp_avg_lr", "sgd_lr"),
    ),
)
