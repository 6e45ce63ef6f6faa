"""MADGRAD: momentumized, adaptive, dual-averaged gradient.

Paper:
    A. Defazio, S. Jelassi, "Adaptivity without Compromise: A Momentumized, Adaptive, Dual
    Averaged Gradient Method for Stochastic Optimization", arXiv:2101.11075 (Algorithm 1);
    authors' package: ``madgrad`` (facebookresearch/madgrad).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    MAXIMIZE,
    NON_NEGATIVE,
    Flag,
    Hyper,
    Interval,
    Optimizer,
    TensorLike,
    TensorList,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.registry import Paper, register


def _zero_to_inf_(rms: TensorLike) -> None:
    """``eps = 0``: a coordinate that never saw a gradient gets an infinite denominator (its
    dual average is zero), as in the authors' code."""
    for t in rms.tensors if isinstance(rms, TensorList) else [rms]:
        t.masked_fill_(t == 0, math.inf)


@register(
    paper=Paper(
        "Adaptivity without Compromise: A Momentumized, Adaptive, Dual Averaged Gradient "
        "Method for Stochastic Optimization",
        "2101.11075",
        2021,
        "Defazio, Jelassi",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "madgrad 1.3 (authors' package)"),
)
class MADGRAD(Optimizer):
    r"""MADGRAD: dual averaging with a cube-root AdaGrad denominator and momentum.

    With :math:`k = t-1` (0 on the first step) and :math:`\eta' = \eta + \epsilon`
    (the authors' code adds ``eps`` to a non-zero lr "for stability"), Algorithm 1:

    .. math::
        \lambda_k = \eta'\sqrt{k+1},\qquad
        s_{k+1} = s_k + \lambda_k g_k,\qquad
        \nu_{k+1} = \nu_k + \lambda_k g_k^2,

        z_{k+1} = x_0 - \frac{s_{k+1}}{\nu_{k+1}^{1/3} + \epsilon},\qquad
        x_{k+1} = (1-c)\,x_k + c\,z_{k+1},\quad c = 1 - \text{momentum}

    :math:`x_0` is the parameter at the first step (a non-zero initial buffer). With
    ``momentum = 0`` the authors keep no :math:`x_0`: it is recomputed as
    :math:`x_k + s_k/(\nu_k^{1/3}+\epsilon)` and :math:`x_{k+1} = z_{k+1}`. ``weight_decay`` is
    an L2 term added to the gradient, or with ``decouple_decay=True`` (the authors'
    experimental option) :math:`x_{k+1} \mathrel{-}= \eta'\lambda\, x_k` after the step.

    Defaults: lr 1e-2, momentum 0.9, eps 1e-6, weight_decay 0 (paper and authors' package).
    Deviations from the authors' package: the step count is per parameter (theirs is one
    global counter, which differs only for parameters that start receiving gradients late);
    state is kept in the parameter's dtype (theirs upcasts fp16/bf16 to fp32); sparse
    gradients are not supported; with ``momentum = 0`` and ``eps = 0`` the zero-to-infinity
    guard of the denominator is also applied when :math:`x_0` is rebuilt (the package divides
    0 by 0 there on the first step and returns NaN).

    State: ``grad_sum_sq`` (:math:`\nu`), ``s``, and ``x0`` when ``momentum != 0``: 12 bytes per
    fp32 parameter (8 without momentum).
    """

    hyperparams = {
        "lr": lr_hyper(1e-2, "paper / authors' package"),
        "momentum": Hyper(0.9, Interval(0.0, 1.0, high_open=True), "paper / authors' package"),
        "weight_decay": weight_decay_hyper(0.0, "authors' package"),
        "eps": Hyper(1e-6, NON_NEGATIVE, "authors' package"),
        "decouple_decay": Hyper(False, Flag(), "authors' package (experimental option)"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # coupled (L2) or the authors' decoupled form, see update
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        names = ("grad_sum_sq", "s")
        return names + ("x0",) if hp["momentum"] != 0 else names

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        if name == "x0":
            return param.detach().clone(memory_format=torch.preserve_format)
        return super().init_buffer(name, param, hp)

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        eps, momentum, weight_decay = hp["eps"], hp["momentum"], hp["weight_decay"]
        lr = hp["lr"] + eps if hp["lr"] != 0 else 0.0
        lamb = lr * math.sqrt(step)
        decoupled = hp["decouple_decay"] and weight_decay != 0
        if weight_decay != 0 and not hp["decouple_decay"]:
            grad = grad.add(param, alpha=weight_decay)
        grad_sum_sq, s = state["grad_sum_sq"], state["s"]

        if momentum == 0:  # x0 from the current point and the old dual average
            rms = grad_sum_sq.pow(1 / 3).add_(eps)
            if eps == 0:
                _zero_to_inf_(rms)
            x0 = param + s / rms
        else:
            x0 = state["x0"]

        grad_sum_sq.addcmul_(grad, grad, value=lamb)
        rms = grad_sum_sq.pow(1 / 3).add_(eps)
        if eps == 0:
            _zero_to_inf_(rms)
        s.add_(grad, alpha=lamb)
        z = x0 - s / rms

        keep = momentum  # x_{k+1} = momentum * x_k + (1 - momentum) * z
        if decoupled:
            keep = momentum - lr * weight_decay  # ... - lr' * weight_decay * x_k
        if momentum == 0 and not decoupled:
            param.copy_(z)
        else:
            param.mul_(keep).add_(z, alpha=1 - momentum)


__all__ = ["MADGRAD"]
