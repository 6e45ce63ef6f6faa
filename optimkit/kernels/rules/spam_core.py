"""Fused rules of SPAM and Stable-SPAM (:mod:`optimkit.optimizers.spam`; SPAM with dense
momentum) and CoRe (:mod:`optimkit.optimizers.core`, without a score history).

Stable-SPAM needs two chained per-tensor reductions before its elementwise pass: the maximum of
``|g|`` (AdaClip's statistic), then the norm of the clipped gradient (AdaGN's), whose clipping
uses the first; both read only the gradient (4 + 4 + 28 = 36 bytes per fp32 parameter). Their
per-tensor parts (``ada_clip_thresholds``, ``ada_gn_scales``) are the Python rule's own
functions.

SPAM's momentum reset, its clipping schedule and its warm-up factor depend only on the step,
so they are decided on the host and reach the kernel as runtime scalars (no recompilation
when they change). Sparse momentum (``density < 1``) gathers and scatters a random subset of
coordinates and CoRe's score history ranks the weights of each tensor: those groups are
declined (``supports``) and run the foreach rule.
"""

import math

import torch
import triton
import triton.language as tl

from optimkit.kernels.registry import Reduction, register_fused
from optimkit.kernels.rules._moments import adam_moments
from optimkit.optimizers.core import CoRe
from optimkit.optimizers.spam import SPAM, StableSPAM, spam_warmup_scale, stable_spam_schedule
from optimkit.transforms.clipping import ada_clip_thresholds, ada_gn_scales


@triton.jit
def _sign(x):
    """``torch.sign``: -1, 0 or 1 (NaN stays NaN)."""
    return tl.where(x > 0.0, 1.0, tl.where(x < 0.0, -1.0, x * 0.0))


@triton.jit
def spam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    reset,
    clip,
    threshold,
    step_size,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    shifted_eps,
    bias_correction2_sqrt,
    decay,
):
    exp_avg = tl.where(reset > 0.5, 0.0, exp_avg)  # momentum reset
    exp_avg_sq = tl.where(reset > 0.5, 0.0, exp_avg_sq)
    spike = (grad * grad > threshold * exp_avg_sq) & (clip > 0.5)
    grad = tl.where(spike, _sign(grad) * tl.sqrt_rn(exp_avg_sq * threshold), grad)
    exp_avg, exp_avg_sq = adam_moments(  # Adam, as Adam.update
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    denom = tl.sqrt_rn(exp_avg_sq) / bias_correction2_sqrt + shifted_eps
    param = param + (-step_size) * tl.div_rn(exp_avg, denom)
    param = param * decay  # decoupled weight decay after the update (authors' code)
    return param, exp_avg, exp_avg_sq


def _spam_scalars(hp, step):
    interval, delay, threshold = hp["reset_interval"], hp["clip_delay"], hp["threshold"]
    beta1, beta2 = hp["betas"]
    since_reset = step % interval if interval else step
    lr = hp["lr"] * spam_warmup_scale(step, interval, hp["warmup_steps"])
    return {
        "reset": float(bool(interval) and step % interval == 0),
        "clip": float(threshold != 0 and step >= delay and since_reset >= delay),
        "step_size": lr / (1 - beta1**step),
        "shifted_eps": hp["eps"] / math.sqrt(1 - beta2**step),
        "bias_correction2_sqrt": math.sqrt(1 - beta2**step),
        "decay": 1 - hp["lr"] * hp["weight_decay"],
    }


register_fused(
    SPAM,
    rule=spam,
    state=("exp_avg", "exp_avg_sq"),
    scalars=_spam_scalars,
    supports=lambda hp: hp["density"] >= 1,
)


@triton.jit
def core(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    step_size,
    beta1,
    beta2,
    one_minus_beta2,
    eps,
    bias_correction1,
    bias_correction2,
    eta_plus_minus_one,
    one_minus_eta_minus,
    step_size_min,
    step_size_max,
    weight_decay,
    second_moment: tl.constexpr,
):
    if second_moment:
        exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    # grad.lerp(exp_avg, beta1), weight >= 0.5: end - (end - start) * (1 - weight), with
    # 1 - weight in fp32 as torch's lerp computes it: the sign of g_{t-1} g_t below is
    # discontinuous, so the rounding of new_avg should be torch's
    new_avg = exp_avg - (exp_avg - grad) * (1.0 - beta1)
    direction = _sign(new_avg * exp_avg)
    factor = (
        tl.maximum(direction, 0.0) * eta_plus_minus_one
        + tl.minimum(direction, 0.0) * one_minus_eta_minus
        + 1.0
    )
    step_size = tl.minimum(tl.maximum(step_size * factor, step_size_min), step_size_max)
    if second_moment:
        denom = tl.sqrt_rn(tl.div_rn(exp_avg_sq, bias_correction2)) + eps
        update = tl.div_rn(tl.div_rn(new_avg, bias_correction1), denom)
    else:
        update = _sign(new_avg)
    update = update * step_size
    param = param + (-weight_decay) * tl.abs(update) * param
    param = param - update
    return param, new_avg, exp_avg_sq, step_size


def _core_scalars(hp, step):
    beta1a, beta1b, beta1c, beta2 = hp["betas"]
    eta_minus, eta_plus = hp["etas"]
    beta1 = beta1b + (beta1a - beta1b) * math.exp(-(((step - 1) / beta1c) ** 2))
    return {
        "beta1": beta1,
        "beta2": beta2,
        "one_minus_beta2": 1 - beta2,
        "bias_correction1": 1 - beta1**step,
        "bias_correction2": 1 - beta2**step if beta2 >= 0 else 1.0,
        "eta_plus_minus_one": eta_plus - 1.0,
        "one_minus_eta_minus": 1.0 - eta_minus,
        "step_size_min": hp["step_sizes"][0],
        "step_size_max": hp["step_sizes"][1],
    }


register_fused(
    CoRe,
    rule=core,
    state=("exp_avg", "exp_avg_sq", "step_size"),
    scalars=_core_scalars,
    flags=lambda hp: {"second_moment": hp["betas"][3] >= 0},
    supports=lambda hp: hp["score_history"] == 0,
)


@triton.jit
def _ada_clip(grad, grad_max, threshold):
    """AdaClip given the tensor's max |g| and threshold: g / max * threshold where |g| > it."""
    return tl.where(tl.abs(grad) > threshold, tl.div_rn(grad, grad_max) * threshold, grad)


@triton.jit
def stable_spam_max(param, grad):
    return tl.abs(grad)


@triton.jit
def stable_spam_norm(param, grad, grad_max, clip_threshold):
    clipped = _ada_clip(grad, grad_max, clip_threshold)
    return clipped * clipped


@triton.jit
def stable_spam(
    param,
    grad,
    exp_avg,
    exp_avg_sq,
    max_exp_avg_sq,
    grad_max,
    clip_threshold,
    norm_divisor,
    norm_scale,
    reset,
    step_size,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    bias_correction2_sqrt,
    amsgrad: tl.constexpr,
):
    grad = _ada_clip(grad, grad_max, clip_threshold)  # AdaClip
    grad = tl.div_rn(grad, norm_divisor) * norm_scale  # AdaGN
    exp_avg, exp_avg_sq = adam_moments(  # Adam (beta1 scaled on the host)
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    second_moment = exp_avg_sq
    if amsgrad:
        max_exp_avg_sq = tl.maximum(max_exp_avg_sq, exp_avg_sq, propagate_nan=tl.PropagateNan.ALL)
        second_moment = max_exp_avg_sq
    denom = tl.sqrt_rn(second_moment) / bias_correction2_sqrt + eps
    param = param + (-step_size) * tl.div_rn(exp_avg, denom)
    exp_avg = tl.where(reset > 0.5, 0.0, exp_avg)  # momentum reset after the update
    exp_avg_sq = tl.where(reset > 0.5, 0.0, exp_avg_sq)
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


def _stable_spam_clip(maxima, inputs):
    """AdaClip's per-tensor max |g| and threshold (``m_max`` updated in place)."""
    clock, _, _ = stable_spam_schedule(inputs.hp, inputs.step)
    m_max = inputs.tensor_state["m_max"]
    grad_max = maxima[:, 0].to(m_max[0].dtype)
    threshold = ada_clip_thresholds(grad_max, m_max, clock, inputs.hp["theta"])
    return torch.stack([grad_max, threshold], dim=1)


def _stable_spam_norm(sums, inputs):
    """AdaGN's per-tensor divisor and scale (``m_norm``, ``v_norm`` updated in place)."""
    hp = inputs.hp
    clock, _, scale = stable_spam_schedule(hp, inputs.step)
    m_norm, v_norm = inputs.tensor_state["m_norm"], inputs.tensor_state["v_norm"]
    norm = sums[:, 0].sqrt().to(m_norm[0].dtype)
    divisor, factor = ada_gn_scales(
        norm, m_norm, v_norm, clock, hp["gamma1"] * scale, hp["gamma2"], hp["eps"]
    )
    return torch.stack([divisor, factor], dim=1)


def _stable_spam_scalars(hp, step):
    _, adam_step, scale = stable_spam_schedule(hp, step)
    beta1, beta2 = hp["betas"]
    beta1 = beta1 * scale
    interval = hp["reset_interval"]
    return {
        "reset": float(bool(interval) and step % interval == 0),
        "step_size": hp["lr"] / (1 - beta1**adam_step),
        "one_minus_beta1": 1 - beta1,
        "bias_correction2_sqrt": math.sqrt(1 - beta2**adam_step),
    }


register_fused(
    StableSPAM,
    rule=stable_spam,
    state=("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    scalars=_stable_spam_scalars,
    reduction=Reduction(
        stable_spam_max,
        _stable_spam_clip,
        outputs=("grad_max", "clip_threshold"),
        count=1,
        kinds=("max",),
        tensor_state=("m_max", "m_norm", "v_norm"),
        then=Reduction(
            stable_spam_norm,
            _stable_spam_norm,
            outputs=("norm_divisor", "norm_scale"),
            count=1,
            tensor_state=("m_max", "m_norm", "v_norm"),
        ),
    ),
)
