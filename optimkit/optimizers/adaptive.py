"""Adam-family adaptive methods: rectified, bounded, belief-based, re-ordered and memory-augmented.

Papers:
    L. Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", arXiv:1908.03265
    (RAdam);
    J. Zhuang et al., "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed
    Gradients", arXiv:2010.07468;
    L. Luo et al., "Adaptive Gradient Methods with Dynamic Bound of Learning Rate",
    arXiv:1902.09843 (AdaBound, AMSBound);
    J. Ding et al., "An Adaptive and Momental Bound Method for Stochastic Learning",
    arXiv:1910.12249 (AdaMod);
    S. Taniguchi et al., "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate",
    arXiv:2411.02853;
    A. M. Adly, "EXAdam: The Power of Adaptive Cross-Moments", arXiv:2412.20302;
    Y. Cao, X. Li, Z. Song, "Grams: Gradient Descent with Adaptive Momentum Scaling",
    arXiv:2412.17107;
    J.-K. Wang et al., "An Optimistic Acceleration of AMSGrad for Nonconvex Optimization",
    arXiv:1903.01435;
    P. Malviya et al., "Promoting Exploration in Memory-Augmented Adam using Critical Momenta",
    arXiv:2307.09638 (Adam+CM).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    COEFFICIENT,
    MAXIMIZE,
    NON_NEGATIVE,
    Betas,
    Flag,
    Hyper,
    Interval,
    Optimizer,
    TensorList,
    lr_hyper,
    maximum_,
    minimum_,
    weight_decay_hyper,
)
from optimkit.optimizers._group import GroupNormOptimizer
from optimkit.optimizers.adagrad import filled_like
from optimkit.optimizers.adam import adam_moments_
from optimkit.registry import REFERENCE_SHAPES, Paper, register

ADAM_BETAS = Hyper((0.9, 0.999), Betas(2), "Adam defaults")
ADAM_STATE = ("exp_avg", "exp_avg_sq")


def _rho(beta2: float, step: int) -> tuple[float, float]:
    """RAdam's maximum and current length of the approximated simple moving average."""
    rho_inf = 2 / (1 - beta2) - 1
    beta2_t = beta2**step
    return rho_inf, rho_inf - 2 * step * beta2_t / (1 - beta2_t)


def _rectification(rho_inf: float, rho_t: float) -> float:
    """RAdam's variance rectification term r_t."""
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


# ------------------------------------------------------------------------------------------
# RAdam
# ------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "On the Variance of the Adaptive Learning Rate and Beyond",
        "1908.03265",
        2019,
        "Liu, Jiang, He, Chen, Liu, Gao, Han",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "torch.optim.RAdam"),
)
class RAdam(Optimizer):
    r"""RAdam: Adam with the variance of the adaptive learning rate rectified (Algorithm 2).

    .. math::
        \rho_\infty = \frac{2}{1-\beta_2} - 1,\qquad
        \rho_t = \rho_\infty - \frac{2t\beta_2^t}{1-\beta_2^t},\qquad
        r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}

        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\cdot
        \begin{cases} r_t\, m_t \sqrt{1-\beta_2^t} / (\sqrt{v_t} + \epsilon) & \rho_t > 5 \\
                      m_t & \text{otherwise (SGD with momentum)} \end{cases}

    Defaults are Adam's. The paper switches at :math:`\rho_t > 4`; like ``torch.optim.RAdam``
    and the authors' code we switch at 5 ("more conservative since it's an approximated
    value"; the authors' code uses :math:`\geq 5`, torch :math:`> 5`, we follow torch), put
    :math:`\epsilon` outside the root of the uncorrected :math:`v_t`, and take an SGD-momentum
    step while the variance is intractable. ``degenerated_to_sgd=False`` is the authors' other
    choice: no step at all in those first iterations (the decoupled decay still applies, unlike
    in the authors' code). ``decoupled_weight_decay`` as in torch. Matches
    ``torch.optim.RAdam`` step for step; checkpoints are interchangeable. State ``exp_avg``,
    ``exp_avg_sq``: 8 bytes per fp32 parameter.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "paper (Adam defaults)"),
        "betas": ADAM_BETAS,
        "eps": Hyper(1e-8, NON_NEGATIVE, "torch.optim.RAdam"),
        "weight_decay": weight_decay_hyper(0.0),
        "decoupled_weight_decay": Hyper(False, Flag(), "torch.optim.RAdam"),
        "degenerated_to_sgd": Hyper(True, Flag(), "authors' code, torch.optim.RAdam"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "hyper"
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ADAM_STATE

    def update(self, param, grad, state, step, hp) -> None:
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = adam_moments_(state, grad, beta1, beta2)
        bias_correction1 = 1 - beta1**step
        rho_inf, rho_t = _rho(beta2, step)
        if rho_t > 5:
            step_size = hp["lr"] * _rectification(rho_inf, rho_t) / bias_correction1
            step_size *= math.sqrt(1 - beta2**step)
            param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(hp["eps"]), value=-step_size)
        elif hp["degenerated_to_sgd"]:
            param.add_(exp_avg, alpha=-hp["lr"] / bias_correction1)


# ------------------------------------------------------------------------------------------
# AdaBelief
# ------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "AdaBelief Optimizer: Adapting Stepsizes by the Belief in Observed Gradients",
        "2010.07468",
        2020,
        "Zhuang, Tang, Ding, Tatikonda, Dvornek, Papademetris, Duncan",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "adabelief-pytorch 0.2.1"),
)
class AdaBelief(Optimizer):
    r"""AdaBelief: Adam whose denominator tracks the variance of g around its EMA (Algorithm 2).

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        s_t = \beta_2 s_{t-1} + (1-\beta_2)(g_t - m_t)^2 + \epsilon,

        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
                   \frac{m_t}{\sqrt{s_t / (1-\beta_2^t)} + \epsilon}

    With ``rectify=True`` (the package's default) the step is RAdam's
    (:math:`\rho_t \geq 5`: :math:`\eta\, r_t \sqrt{1-\beta_2^t}\, m_t / ((1-\beta_1^t)
    (\sqrt{s_t}+\epsilon))`; otherwise an SGD-momentum step, or none when
    ``degenerated_to_sgd=False``). ``amsgrad`` keeps :math:`\max(s_t)` in the denominator.

    Defaults are those of the authors' package ``adabelief-pytorch`` 0.2.1: eps 1e-16,
    ``weight_decouple=True`` (:math:`\theta \leftarrow (1-\eta\lambda)\theta`, or
    :math:`(1-\lambda)\theta` with ``fixed_decay``), ``rectify=True``; with
    ``weight_decouple=False`` the decay is added to the gradient (L2). Like the package (and
    the paper), :math:`\epsilon` is added to :math:`s_t` in the state itself each step.
    Deviations from the package: with ``amsgrad=True`` and ``rectify=True`` the package
    divides by :math:`s_t` and ignores its running maximum; we divide by the maximum (what
    AMSGrad means). The package also modifies ``p.grad`` for L2 decay, casts fp16 parameters
    to fp32 state; we do neither. State ``exp_avg``, ``exp_avg_var`` (+ ``max_exp_avg_var``):
    8 (12) bytes per fp32 parameter, with the package's names.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "paper, adabelief-pytorch"),
        "betas": Hyper((0.9, 0.999), Betas(2), "paper, adabelief-pytorch"),
        "eps": Hyper(1e-16, NON_NEGATIVE, "adabelief-pytorch >= 0.1.0"),
        "weight_decay": weight_decay_hyper(0.0),
        "amsgrad": Hyper(False, Flag(), "adabelief-pytorch"),
        "weight_decouple": Hyper(True, Flag(), "adabelief-pytorch >= 0.1.0"),
        "fixed_decay": Hyper(False, Flag(), "adabelief-pytorch"),
        "rectify": Hyper(True, Flag(), "adabelief-pytorch >= 0.1.0"),
        "degenerated_to_sgd": Hyper(True, Flag(), "adabelief-pytorch"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # weight_decouple / fixed_decay are handled in update
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_var")
        return names + ("max_exp_avg_var",) if hp["amsgrad"] else names

    def update(self, param, grad, state, step, hp) -> None:
        beta1, beta2 = hp["betas"]
        lr, eps, weight_decay = hp["lr"], hp["eps"], hp["weight_decay"]
        if weight_decay != 0:
            if hp["weight_decouple"]:
                param.mul_(1 - (weight_decay if hp["fixed_decay"] else lr * weight_decay))
            else:
                grad = grad.add(param, alpha=weight_decay)
        exp_avg = state["exp_avg"].lerp_(grad, 1 - beta1)
        residual = grad - exp_avg
        exp_avg_var = state["exp_avg_var"].mul_(beta2).addcmul_(residual, residual, value=1 - beta2)
        exp_avg_var.add_(eps)
        if hp["amsgrad"]:
            exp_avg_var = maximum_(state["max_exp_avg_var"], exp_avg_var)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        if not hp["rectify"]:
            denom = (exp_avg_var.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
            return
        rho_inf, rho_t = _rho(beta2, step)
        if rho_t >= 5:
            step_size = _rectification(rho_inf, rho_t) * math.sqrt(bias_correction2)
            param.addcdiv_(
                exp_avg, exp_avg_var.sqrt().add_(eps), value=-lr * step_size / bias_correction1
            )
        elif hp["degenerated_to_sgd"]:
            param.add_(exp_avg, alpha=-lr / bias_correction1)


# ------------------------------------------------------------------------------------------
# AdaBound / AMSBound
# ------------------------------------------------------------------------------------------
def _adabound_hyperparams(amsbound: bool) -> dict[str, Hyper]:
    return {
        "lr": lr_hyper(1e-3, "paper, adabound 0.0.5"),
        "betas": Hyper((0.9, 0.999), Betas(2), "paper, adabound 0.0.5"),
        "final_lr": Hyper(0.1, NON_NEGATIVE, "adabound 0.0.5"),
        "gamma": Hyper(1e-3, COEFFICIENT, "adabound 0.0.5"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "adabound 0.0.5"),
        "weight_decay": weight_decay_hyper(0.0),
        "amsbound": Hyper(amsbound, Flag(), "AMSBound" if amsbound else "AdaBound"),
        "maximize": MAXIMIZE,
    }


ADABOUND_PAPER = Paper(
    "Adaptive Gradient Methods with Dynamic Bound of Learning Rate",
    "1902.09843",
    2019,
    "Luo, Xiong, Liu, Sun",
)


@register(
    paper=ADABOUND_PAPER,
    category="adaptive",
    verified_against=("fp64 reference", "adabound 0.0.5"),
)
class AdaBound(Optimizer):
    r"""AdaBound: Adam whose per-coordinate step is clipped into bounds converging to SGD's.

    .. math::
        \eta^*_\ell(t) = \eta^*\Big(1 - \frac{1}{\gamma t + 1}\Big),\qquad
        \eta^*_u(t) = \eta^*\Big(1 + \frac{1}{\gamma t}\Big),

        \hat\eta_t = \mathrm{clip}\Big(\frac{\eta\sqrt{1-\beta_2^t}}{(1-\beta_1^t)
        (\sqrt{v_t}+\epsilon)},\ \eta^*_\ell(t),\ \eta^*_u(t)\Big),\qquad
        \theta_t = \theta_{t-1} - \hat\eta_t \odot m_t

    (Algorithm 2; with ``amsbound`` :math:`v_t` is replaced by its running maximum, Algorithm 3).
    As in the authors' package ``adabound``, the final learning rate follows the schedule of
    ``lr``: :math:`\eta^* =` ``final_lr`` :math:`\cdot\,\eta / \eta_0`, where :math:`\eta_0` is
    the group's learning rate when it was added to the optimizer (kept in the param group as
    ``base_lr`` and saved with checkpoints; the package keeps it outside them). Defaults (lr
    1e-3, final_lr 0.1, gamma 1e-3, eps 1e-8) are the package's; ``weight_decay`` is L2
    (coupled). The paper's bias-correction and :math:`\epsilon` placement follow the package.
    State ``exp_avg``, ``exp_avg_sq`` (+ ``max_exp_avg_sq``): 8 (12) bytes per fp32 parameter.
    """

    hyperparams = _adabound_hyperparams(amsbound=False)
    weight_decay_mode = "coupled"
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq")
        return names + ("max_exp_avg_sq",) if hp["amsbound"] else names

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        lr = group["lr"]
        group.setdefault("base_lr", float(lr.item() if isinstance(lr, Tensor) else lr))

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # a checkpoint of the adabound package has no base_lr
            lr = group["lr"]
            group.setdefault("base_lr", float(lr.item() if isinstance(lr, Tensor) else lr))

    def group_hyperparams(self, group: Mapping[str, Any]) -> dict[str, Any]:
        hp = super().group_hyperparams(group)
        base_lr = group["base_lr"]
        hp["scaled_final_lr"] = hp["final_lr"] * hp["lr"] / base_lr if base_lr else hp["final_lr"]
        return hp

    def update(self, param, grad, state, step, hp) -> None:
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = adam_moments_(state, grad, beta1, beta2)
        if hp["amsbound"]:
            exp_avg_sq = maximum_(state["max_exp_avg_sq"], exp_avg_sq)
        step_size = hp["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        final_lr, gamma_t = hp["scaled_final_lr"], hp["gamma"] * step
        lower = final_lr * (1 - 1 / (gamma_t + 1))
        upper = final_lr * (1 + 1 / gamma_t) if gamma_t > 0 else math.inf
        rate = step_size / exp_avg_sq.sqrt().add_(hp["eps"])
        param.addcmul_(rate.clamp_min_(lower).clamp_max_(upper), exp_avg, value=-1)


@register(
    paper=ADABOUND_PAPER,
    category="adaptive",
    verified_against=("fp64 reference", "adabound 0.0.5 (amsbound=True)"),
)
class AMSBound(AdaBound):
    r"""AMSBound: AdaBound on AMSGrad's non-decreasing second moment (Algorithm 3).

    .. math:: \hat v_t = \max(\hat v_{t-1}, v_t),\qquad
              \hat\eta_t = \mathrm{clip}\Big(\frac{\eta\sqrt{1-\beta_2^t}}{(1-\beta_1^t)
              (\sqrt{\hat v_t}+\epsilon)},\ \eta^*_\ell(t),\ \eta^*_u(t)\Big)

    This is :class:`AdaBound` with ``amsbound=True`` (the package's ``AdaBound(amsbound=True)``).
    State: 12 bytes per fp32 parameter.
    """

    hyperparams = _adabound_hyperparams(amsbound=True)


# ------------------------------------------------------------------------------------------
# AdaMod
# ------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "An Adaptive and Momental Bound Method for Stochastic Learning",
        "1910.12249",
        2019,
        "Ding, Ren, Luo, Sun",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "adamod 0.0.3"),
)
class AdaMod(Optimizer):
    r"""AdaMod: Adam whose per-coordinate rates are capped by their own running average.

    .. math::
        \eta_t = \frac{\eta\sqrt{1-\beta_2^t}}{(1-\beta_1^t)(\sqrt{v_t}+\epsilon)},\qquad
        s_t = \beta_3 s_{t-1} + (1-\beta_3)\eta_t,\qquad
        \theta_t = \theta_{t-1} - \min(\eta_t, s_t) \odot m_t

    (Algorithm 1, :math:`s_0 = 0`, so the first steps are small: the momental bound removes
    Adam's extreme early rates.) Defaults follow the authors' package ``adamod`` 0.0.3: Adam's
    and ``beta3`` = 0.999 (its docstring says 0.9999, its code 0.999); ``weight_decay`` is
    decoupled, :math:`\theta \leftarrow (1-\eta\lambda)\theta`. State ``exp_avg``,
    ``exp_avg_sq``, ``exp_avg_lr``: 12 bytes per fp32 parameter, with the package's names.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "paper, adamod 0.0.3"),
        "betas": ADAM_BETAS,
        "beta3": Hyper(0.999, COEFFICIENT, "adamod 0.0.3 code"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "adamod 0.0.3"),
        "weight_decay": weight_decay_hyper(0.0, "adamod 0.0.3 (decoupled)"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "decoupled"
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "exp_avg_lr")

    def update(self, param, grad, state, step, hp) -> None:
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = adam_moments_(state, grad, beta1, beta2)
        step_size = hp["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        rate = step_size / exp_avg_sq.sqrt().add_(hp["eps"])
        exp_avg_lr = state["exp_avg_lr"].lerp_(rate, 1 - hp["beta3"])
        param.addcmul_(minimum_(rate, exp_avg_lr), exp_avg, value=-1)


# ------------------------------------------------------------------------------------------
# ADOPT
# ------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "ADOPT: Modified Adam Can Converge with Any beta2 with the Optimal Rate",
        "2411.02853",
        2024,
        "Taniguchi, Harada, Minegishi, Oshima, Jeong, Nagahara, Iiyama, Suzuki, Iwasawa, Matsuo",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "torch-adopt 0.1.0"),
)
class ADOPT(Optimizer):
    r"""ADOPT: normalise by the *previous* second moment, then take momentum (Algorithm 2).

    .. math::
        v_0 = g_0^2 \ \text{(first step: no update)},\qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,
              \mathrm{clip}\Big(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)},\ c_t\Big),

        \theta_t = \theta_{t-1} - \eta\, m_t,\qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    with :math:`c_t = t^{1/4}` (``clip=True``), :math:`t` counting the updates before this one
    (1 on the first real update), as in the authors' package ``torch-adopt``
    (``clip_lambda = step**0.25``). Defaults are the package's: lr 1e-3, betas (0.9, 0.9999),
    eps 1e-6. ``weight_decay`` is added to the gradient, or with
    ``decoupled_weight_decay=True`` (the package's ``decouple``) applied as
    :math:`\theta \leftarrow (1-\eta\lambda)\theta`, which, as in the package, skips the
    initialising first step. State ``exp_avg``, ``exp_avg_sq``: 8 bytes per fp32 parameter,
    with the package's names.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "paper, torch-adopt"),
        "betas": Hyper((0.9, 0.9999), Betas(2), "paper, torch-adopt"),
        "eps": Hyper(1e-6, NON_NEGATIVE, "paper, torch-adopt"),
        "weight_decay": weight_decay_hyper(0.0),
        "decoupled_weight_decay": Hyper(False, Flag(), "torch-adopt (decouple)"),
        "clip": Hyper(True, Flag(), "torch-adopt: clip_lambda = step**0.25"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # the decoupled decay skips the first step: handled in update
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ADAM_STATE

    def update(self, param, grad, state, step, hp) -> None:
        beta1, beta2 = hp["betas"]
        lr, weight_decay = hp["lr"], hp["weight_decay"]
        decoupled = hp["decoupled_weight_decay"]
        if weight_decay != 0 and not decoupled:
            grad = grad.add(param, alpha=weight_decay)
        exp_avg_sq = state["exp_avg_sq"]
        if step == 1:
            exp_avg_sq.addcmul_(grad, grad)
            return
        if weight_decay != 0 and decoupled:
            param.mul_(1 - lr * weight_decay)
        normed = grad / exp_avg_sq.sqrt().clamp_min_(hp["eps"])
        if hp["clip"]:
            clip = (step - 1) ** 0.25
            normed.clamp_min_(-clip).clamp_max_(clip)
        exp_avg = state["exp_avg"].lerp_(normed, 1 - beta1)
        param.add_(exp_avg, alpha=-lr)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)


# ------------------------------------------------------------------------------------------
# EXAdam
# ------------------------------------------------------------------------------------------
@register(
    paper=Paper("EXAdam: The Power of Adaptive Cross-Moments", "2412.20302", 2024, "Adly"),
    category="adaptive",
    verified_against=("fp64 reference", "authors' exadam.py (read, not run)"),
)
class EXAdam(Optimizer):
    r"""EXAdam: Adam with cross-moment debiasing and a gradient acceleration term.

    .. math::
        d_1 = 1 + \beta_2^t \frac{v_t}{v_t + \epsilon},\qquad
        d_2 = 1 + \beta_1^t \frac{m_t^2}{m_t^2 + \epsilon},

        \tilde m_t = \frac{d_1 m_t}{1-\beta_1^t},\quad
        \tilde v_t = \frac{d_2 v_t}{1-\beta_2^t},\quad
        \tilde g_t = \frac{d_1 g_t}{1-\beta_1^t},\qquad
        \theta_t = \theta_{t-1}
        - \alpha_t \frac{\tilde m_t + \tilde g_t}{\sqrt{\tilde v_t}+\epsilon}

    (:math:`m_t, v_t` Adam's moments.) These equations are those of the authors' code
    (AhmedMostafa16/EXAdam ``exadam.py``, read: same :math:`d_1, d_2, \tilde m, \tilde v,
    \tilde g` and update, eps added outside the root); the paper's Algorithm 1 itself could not
    be read (only abstracts and the opening were reachable).

    Step size: the first version of the paper (arXiv:2412.20302v1; its abstract lists "three
    key enhancements", the third "a dynamic step size formula that allows for continuous growth
    of the learning rate") uses :math:`\alpha_t = \alpha \ln(\sqrt{2}\sqrt{t+1})`; the revised
    paper (v2, whose abstract lists only the two other enhancements) and the authors' code use
    a constant :math:`\alpha_t = \alpha`, our default; ``growing_lr=True`` gives the v1
    schedule (its exact form was taken from the v1 description and not re-checked against the
    v1 text). Defaults (lr 1e-3, Adam's betas, eps 1e-8) and the decoupled ``weight_decay``
    (:math:`\theta \leftarrow (1-\alpha\lambda) \theta`, applied before the update, although
    the code's comment calls it an L2 penalty) are the authors' code's. State ``exp_avg``,
    ``exp_avg_sq`` (the code's ``m``, ``v``): 8 bytes per fp32 parameter.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-3, "paper, authors' code"),
        "betas": ADAM_BETAS,
        "eps": Hyper(1e-8, NON_NEGATIVE, "authors' code"),
        "weight_decay": weight_decay_hyper(0.0, "authors' code (decoupled)"),
        "growing_lr": Hyper(False, Flag(), "paper v2 and authors' code (paper v1: True)"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "decoupled"
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ADAM_STATE

    def update(self, param, grad, state, step, hp) -> None:
        beta1, beta2 = hp["betas"]
        eps = hp["eps"]
        exp_avg, exp_avg_sq = adam_moments_(state, grad, beta1, beta2)
        d1 = exp_avg_sq.div(exp_avg_sq.add(eps)).mul_(beta2**step).add_(1)
        exp_avg_2 = exp_avg * exp_avg
        d2 = exp_avg_2.div_(exp_avg_2.add(eps)).mul_(beta1**step).add_(1)
        numerator = (exp_avg + grad).mul_(d1)
        denom = d2.mul_(exp_avg_sq).div_(1 - beta2**step).sqrt_().add_(eps)
        lr = hp["lr"] * (math.log(math.sqrt(2 * (step + 1))) if hp["growing_lr"] else 1.0)
        param.addcdiv_(numerator, denom, value=-lr / (1 - beta1**step))


# ------------------------------------------------------------------------------------------
# Grams
# ------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "Grams: Gradient Descent with Adaptive Momentum Scaling",
        "2412.17107",
        2024,
        "Cao, Li, Song",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "grams-pytorch 0.0.2"),
)
class Grams(Optimizer):
    r"""Grams: the direction of the current gradient, the magnitude of Adam's update.

    .. math::
        u_t = \frac{\eta\sqrt{1-\beta_2^t}}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t}+\epsilon},\qquad
        \theta_t = (1-\eta\lambda)\,\theta_{t-1} - \mathrm{sign}(g_t) \odot |u_t|

    (Algorithm 1; :math:`m_t, v_t` Adam's moments.) Defaults and forms are those of the
    authors' package ``grams-pytorch`` 0.0.2: lr 1e-3, Adam's betas, eps 1e-6 added to the
    uncorrected :math:`\sqrt{v_t}` (the paper adds :math:`\epsilon` to the bias-corrected
    root), decoupled ``weight_decay``. The package overwrites ``p.grad`` with the update; we
    do not. State ``exp_avg``, ``exp_avg_sq``: 8 bytes per fp32 parameter.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "paper, grams-pytorch"),
        "betas": ADAM_BETAS,
        "eps": Hyper(1e-6, NON_NEGATIVE, "grams-pytorch"),
        "weight_decay": weight_decay_hyper(0.0, "paper, grams-pytorch (decoupled)"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "decoupled"
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ADAM_STATE

    def update(self, param, grad, state, step, hp) -> None:
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = adam_moments_(state, grad, beta1, beta2)
        step_size = hp["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        direction = grad.sign().mul_(exp_avg.abs())
        param.addcdiv_(direction, exp_avg_sq.sqrt().add_(hp["eps"]), value=-step_size)


# ------------------------------------------------------------------------------------------
# Optimistic-AMSGrad
# ------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "An Optimistic Acceleration of AMSGrad for Nonconvex Optimization",
        "1903.01435",
        2019,
        "Wang, Li, Karimi, Li",
    ),
    category="adaptive",
    verified_against=("fp64 reference",),
)
class OptimisticAMSGrad(Optimizer):
    r"""Optimistic-AMSGrad: an AMSGrad half-step, then a step along the predicted gradient.

    The rule as implemented (unconstrained, so projections are the identity):

    .. math::
        \theta_t = \beta_1\theta_{t-1} + (1-\beta_1) g_t,\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,\quad \hat v_t = \max(\hat v_{t-1}, v_t),

        w_{t+1/2} = w_{t-1/2} - \eta\,\theta_t / \sqrt{\hat v_t},\qquad
        w_{t+1} = w_{t+1/2} - \eta\, h_{t+1} / \sqrt{\hat v_t},\qquad
        h_{t+1} = \beta_1 \theta_{t-1} + (1-\beta_1)\, m_{t+1}

    with :math:`w_1 = w_{1/2}` the initial parameters and :math:`v_0 = \hat v_0 = \epsilon`
    (no bias correction). Gradients are taken at :math:`w_t`, the model's parameters;
    :math:`w_{t+1/2}` is kept in the state (``half_iterate``). The guess :math:`m_{t+1}` of the
    next gradient is the last gradient, :math:`m_{t+1} = g_t`, for which :math:`h_{t+1} =
    \theta_t`.

    Verification status: the paper's algorithm block could **not** be read (only the opening
    of arXiv:1903.01435 was reachable), so the equations above are unverified against it.
    The authors' repository README (``optimistic_amsgrad``) states the setting of all the
    paper's experiments: :math:`\eta` = 0.001, :math:`\beta_1` = 0.9, :math:`\beta_2` = 0.99,
    and a gradient predictor that extrapolates from the latest ``span`` = 5 iterates.
    Deviation: that extrapolation predictor (the paper's default) is not implemented; we
    use the last gradient. The authors' code itself was not found in the index.

    Defaults: lr 1e-3 and betas (0.9, 0.99) as in the authors' experiments; eps 1e-8 (the
    :math:`\epsilon` of :math:`v_0`, AMSGrad's usual value); ``weight_decay`` is L2 (coupled).
    State ``exp_avg`` (:math:`\theta_t`), ``exp_avg_sq``, ``max_exp_avg_sq``, ``half_iterate``:
    16 bytes per fp32 parameter.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "authors' README (all the paper's experiments)"),
        "betas": Hyper((0.9, 0.99), Betas(2), "authors' README (all the paper's experiments)"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "v_0 = eps; value: AMSGrad's usual default"),
        "weight_decay": weight_decay_hyper(0.0),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "coupled"
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "half_iterate")

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        if name == "half_iterate":
            return param.detach().clone(memory_format=torch.preserve_format)
        if name in ("exp_avg_sq", "max_exp_avg_sq"):
            return filled_like(param, hp["eps"])
        return super().init_buffer(name, param, hp)

    def update(self, param, grad, state, step, hp) -> None:
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = adam_moments_(state, grad, beta1, beta2)
        denom = maximum_(state["max_exp_avg_sq"], exp_avg_sq).sqrt()
        half = state["half_iterate"].addcdiv_(exp_avg, denom, value=-hp["lr"])
        param.copy_(half).addcdiv_(exp_avg, denom, value=-hp["lr"])  # h_{t+1} = theta_t


# ------------------------------------------------------------------------------------------
# Adam+CM (critical momenta)
# ------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "Promoting Exploration in Memory-Augmented Adam using Critical Momenta",
        "2307.09638",
        2023,
        "Malviya, Mordido, Baratin, Harikandeh, Huang, Lacoste-Julien, Pascanu, Chandar",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "authors' code chandar-lab/CMOptimizer (read)"),
)
class AdamCM(GroupNormOptimizer):
    r"""Adam+CM: Adam on the sum of its momentum and the mean of a buffer of critical momenta.

    A buffer of up to :math:`C` past momenta is kept, each with a priority (the gradient norm
    when it entered, decayed by ``decay`` every step). Each step, with
    :math:`\bar m^{c}_t` the mean of the buffer:

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad a_t = m_t + \bar m^{c}_t,

        v_t = \beta_2 v_{t-1} + (1-\beta_2) a_t^2,\qquad
        \theta_t = \theta_{t-1} - \frac{\eta}{1-\beta_1^t}\,
                   \frac{a_t}{\sqrt{v_t/(1-\beta_2^t)}+\epsilon}

    then :math:`m_t` enters the buffer with priority :math:`\lVert g_t\rVert` if the buffer is
    not full, or replaces the lowest-priority entry if :math:`\lVert g_t\rVert` exceeds that
    priority. With ``synced=True`` (default) :math:`\lVert g_t\rVert` is the sum of the L2
    norms of all gradients of the param group, else the tensor's own norm.

    Everything follows the authors' code (chandar-lab/CMOptimizer, ``cmoptimizer/optim.py``,
    ``Adam_CM``; re-read for this check: the first step, the summed per-tensor norms of
    ``synced``, the buffer mean taken before the new entry, the replacement test and the
    per-step priority decay agree), including its first step: the buffer is seeded with the
    raw gradient :math:`g_1` and no update is made (:math:`m` and :math:`v` stay 0); bias
    corrections count that step. Defaults are the code's: ``topc`` :math:`C` = 5, ``decay``
    0.7, Adam's lr, betas and eps; decoupled ``weight_decay``. Not implemented: the code's
    ``kappa`` (only its sign is used there: ``kappa = 0`` is Adam), ``critical_test`` (random
    FIFO replacement, default off) and ``buffer_dtype``. The buffer mean is recomputed from the
    buffer each step rather than kept as a running sum (one buffer less, a little more
    reading). State: ``exp_avg``, ``exp_avg_sq`` (+ ``max_exp_avg_sq`` with ``amsgrad``),
    ``critical_momenta`` (:math:`C` momenta) and ``critical_priorities`` (:math:`C` floats per
    tensor): :math:`(2 + C)\cdot 4` = 28 bytes per fp32 parameter at the defaults.

    Not checked against the paper: its Algorithm 1 could not be read (only the abstract and
    opening of arXiv:2307.09638 were reachable), so differences between the paper's pseudo-code
    and the authors' code (e.g. the first step, which the code spends on seeding the buffer)
    are not known.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "authors' code (Adam)"),
        "betas": ADAM_BETAS,
        "eps": Hyper(1e-8, NON_NEGATIVE, "authors' code (Adam)"),
        "weight_decay": weight_decay_hyper(0.0, "authors' code (decoupled)"),
        "amsgrad": Hyper(False, Flag(), "authors' code"),
        "topc": Hyper(5, Interval(1, integer=True), "authors' code (topC)"),
        "decay": Hyper(0.7, COEFFICIENT, "authors' code"),
        "synced": Hyper(True, Flag(), "authors' code"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "decoupled"

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq", "critical_momenta", "critical_priorities")
        return names + ("max_exp_avg_sq",) if hp["amsgrad"] else names

    @classmethod
    def state_bytes_per_param(cls, hp=None, dtype=torch.float32) -> float:
        full = cls.with_defaults(hp)
        itemsize = torch.empty((), dtype=dtype).element_size()
        per_element = (2 + int(full["amsgrad"]) + int(full["topc"])) * itemsize
        # plus C priorities per tensor, counted at the registry's reference layer
        numel = sum(math.prod(shape) for shape in REFERENCE_SHAPES)
        return per_element + len(REFERENCE_SHAPES) * int(full["topc"]) * itemsize / numel

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        topc = int(hp["topc"])
        if name == "critical_momenta":
            return param.new_zeros((topc, *param.shape))
        if name == "critical_priorities":
            real = param.real.dtype if param.is_complex() else param.dtype
            return torch.zeros(topc, dtype=real, device=param.device)
        return super().init_buffer(name, param, hp)

    def group_step(self, group, norms, hp) -> None:
        if hp["synced"]:
            hp["grad_norm"] = norms.sum()

    def update(self, param, grad, state, step, hp) -> None:
        if isinstance(param, TensorList):
            for i in range(len(param)):
                one = {name: buffers[i] for name, buffers in state.items()}
                self.update(param[i], grad[i], one, step, hp)
            return
        beta1, beta2 = hp["betas"]
        norm = hp["grad_norm"].to(param.device) if hp["synced"] else grad.norm()
        momenta, priorities = state["critical_momenta"], state["critical_priorities"]
        stored = min(step - 1, momenta.shape[0])  # entries in the buffer before this step
        if step == 1:  # the authors' first step: seed the buffer with g_1, no update
            momenta[0].copy_(grad)
            priorities[0] = norm
            priorities.mul_(hp["decay"])
            return
        exp_avg = state["exp_avg"].lerp_(grad, 1 - beta1)
        aggregate = exp_avg + momenta[:stored].sum(0).div_(stored)
        if stored < momenta.shape[0]:
            momenta[stored].copy_(exp_avg)
            priorities[stored] = norm
        else:  # replace the lowest priority if this gradient's norm is larger (no host sync)
            index = priorities.argmin().view(1)
            replace = norm > priorities[index]
            new = torch.where(replace.view((1,) * momenta.dim()), exp_avg, momenta[index])
            momenta.index_copy_(0, index, new)
            priorities.index_copy_(0, index, torch.where(replace, norm, priorities[index]))
        exp_avg_sq = state["exp_avg_sq"].mul_(beta2).addcmul_(aggregate, aggregate, value=1 - beta2)
        if hp["amsgrad"]:
            exp_avg_sq = maximum_(state["max_exp_avg_sq"], exp_avg_sq)
        denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(hp["eps"])
        param.addcdiv_(aggregate, denom, value=-hp["lr"] / (1 - beta1**step))
        priorities.mul_(hp["decay"])


__all__ = [
    "RAdam",
    "AdaBelief",
    "AdaBound",
    "AMSBound",
    "AdaMod",
    "ADOPT",
    "EXAdam",
    "Grams",
    "OptimisticAMSGrad",
    "AdamCM",
]
