"""MARS: variance-reduced preconditioned optimisation (AdamW and Lion instances).

Paper:
    H. Yuan, Y. Liu, S. Wu, X. Zhou, Q. Gu, "MARS: Unleashing the Power of Variance Reduction
    for Training Large Models", arXiv:2411.10438. Authors' code: github.com/AGI-Arena/MARS
    (``MARS/optimizers/mars.py`` and ``MARS/train_mars.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    MAXIMIZE,
    NON_NEGATIVE,
    Betas,
    Choice,
    Flag,
    Hyper,
    Optimizer,
    TensorLike,
    TensorList,
    lr_hyper,
    maximum_,
    weight_decay_hyper,
)
from optimkit.registry import Paper, register


def _pick(x: TensorLike, index: list[int]) -> TensorLike:
    return TensorList(x[i] for i in index) if isinstance(x, TensorList) else x


def _is_matrix(t: Tensor) -> bool:
    return t.dim() == 2


@register(
    paper=Paper(
        "MARS: Unleashing the Power of Variance Reduction for Training Large Models",
        "2411.10438",
        2024,
        "Yuan, Liu, Wu, Zhou, Gu",
    ),
    category="adaptive",
    verified_against=("fp64 reference (approx and exact)", "AGI-Arena/MARS mars.py (read)"),
)
class MARS(Optimizer):
    r"""MARS: a scaled stochastic recursive momentum (variance reduction) inside AdamW or Lion.

    For a matrix parameter (``dim() == 2``; every parameter with ``optimize_1d=True``), with
    gradient :math:`g_t = \nabla f(x_t, \xi_t)` and previous gradient :math:`\tilde g`:

    .. math::
        c_t = g_t + \gamma\,\frac{\beta_1}{1-\beta_1}\,(g_t - \tilde g),\qquad
        \tilde c_t = c_t / \max(1, \lVert c_t\rVert_2),\qquad
        m_t = \beta_1 m_{t-1} + (1-\beta_1)\,\tilde c_t

    then ``optimizer="adamw"``:

    .. math::
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\,\tilde c_t^2,\qquad
        x_{t+1} = x_t - \eta\Big(\lambda x_t + \frac{m_t}
                  {(1-\beta_1^t)\,(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)}\Big)

    or ``optimizer="lion"``: :math:`x_{t+1} = x_t - \eta\,(\lambda x_t + \operatorname{sign} m_t)`.
    The norm in :math:`\tilde c_t` is the norm of the whole tensor (authors' code).

    **Two variants, chosen by how ``step`` is called.**

    * ``step()`` (no closure): *MARS-approx*, the paper's practical variant and the authors'
      default (``is_approx=True``): :math:`\tilde g = g_{t-1} = \nabla f(x_{t-1}, \xi_{t-1})`,
      the previous step's gradient, kept in ``state["last_grad"]``. One gradient per step.
    * ``step(closure)``: *exact MARS*: :math:`\tilde g = \nabla f(x_{t-1}, \xi_t)`, the gradient
      of the **current** mini-batch at the **previous** parameters. The optimizer keeps
      :math:`x_{t-1}` in ``state["prev_param"]``; ``step`` first loads :math:`x_{t-1}` into the
      parameters and calls the closure (its gradients are :math:`\tilde g`), then restores
      :math:`x_t` and calls the closure again (its gradients are :math:`g_t`; its loss is the
      one returned). The closure must therefore evaluate the **same mini-batch** each time it
      is called within one ``step`` (a closure over the current batch does; do not draw a new
      batch inside it). It is called once on the first step, twice afterwards. This matches
      the authors' exact scheme (``train_mars.py`` computes :math:`\nabla f(x_t, \xi_{t+1})`
      one iteration ahead and keeps it in ``previous_grad``/``last_grad``), but needs one
      stored tensor instead of two. Transient memory during the step: one copy of the
      parameters and one extra gradient.

    Mixing both calls is allowed: switching variant drops the other variant's buffer and
    the first step after the switch uses :math:`\tilde g = 0`.

    **Non-matrix tensors** (authors' choice, ``optimize_1d=False``, the default): every
    parameter that is not 2-D (biases, norms, scalars, and also conv kernels, since the authors'
    test is ``grad.dim() == 2``) is trained by plain AdamW on the raw gradient with
    ``betas_1d`` (0.9, 0.95), learning rate :math:`\eta\cdot` ``lr_1d_factor`` and decoupled
    decay ``weight_decay_1d`` (0.1), all the authors' defaults (``lr_1d = 3e-3 = lr`` gives
    ``lr_1d_factor = 1``; the authors store ``lr_1d / lr`` at construction, so schedulers scale
    both rates, as here). With ``optimize_1d=True`` every tensor gets the MARS rule with
    ``betas`` and ``weight_decay``.

    Defaults (authors' code): lr 3e-3, betas (0.95, 0.99), eps 1e-8, weight_decay 0, gamma
    0.025, amsgrad False. Step 1 uses :math:`\tilde g = 0` (the authors initialise
    ``last_grad`` to zeros), so :math:`c_1 = (1 + \gamma\beta_1/(1-\beta_1))\,g_1`.

    Deviations from the authors' code: ``last_grad`` is a copy of the gradient, not a
    reference to ``p.grad`` (theirs becomes zero if the gradient is zeroed in place); the
    decoupled decay is applied as :math:`x(1-\eta\lambda)` before the step (same value up to
    rounding). The Shampoo instance (``mars-shampoo``) is not provided. Complex parameters are
    rejected (the matrix test would see their real views).

    State: ``exp_avg``; ``exp_avg_sq`` (AdamW flavour, and for the AdamW fallback of non-matrix
    tensors unless ``optimize_1d``); ``max_exp_avg_sq`` with ``amsgrad``; ``last_grad``
    (``step()``) or ``prev_param`` (``step(closure)``). Buffers are allocated per parameter
    group for every tensor of the group (as the authors' code does), so non-matrix tensors
    also carry the unused correction buffer: 12 bytes per fp32 parameter at the defaults (8 for
    Lion with ``optimize_1d=True``).
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(3e-3, "authors' code (MARS default lr)"),
        "betas": Hyper((0.95, 0.99), Betas(2), "authors' code; paper GPT-2 runs"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "authors' code"),
        "weight_decay": weight_decay_hyper(0.0, "authors' code"),
        "gamma": Hyper(0.025, NON_NEGATIVE, "paper and authors' code"),
        "optimizer": Hyper("adamw", Choice(("adamw", "lion")), "authors' code (mars-adamw)"),
        "amsgrad": Hyper(False, Flag(), "authors' code"),
        "optimize_1d": Hyper(False, Flag(), "authors' code"),
        "lr_1d_factor": Hyper(1.0, NON_NEGATIVE, "authors' code: lr_1d / lr = 3e-3 / 3e-3"),
        "betas_1d": Hyper((0.9, 0.95), Betas(2), "authors' code"),
        "weight_decay_1d": weight_decay_hyper(0.1, "authors' code"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # decay is part of the rule (and differs for non-matrix tensors)
    impls = ("reference", "foreach", "fused")  # fused: the approximate variant (plain step())
    supports_complex = False

    def __init__(self, params: Any, lr: float | Tensor | None = None, **kwargs: Any) -> None:
        self._exact = False
        super().__init__(params, lr, **kwargs)

    # ------------------------------------------------------------------------------------
    @staticmethod
    def _moment_buffers(hp: Mapping[str, Any]) -> tuple[str, ...]:
        names: tuple[str, ...] = ("exp_avg",)
        if hp["optimizer"] == "adamw" or not hp["optimize_1d"]:
            names += ("exp_avg_sq",)
        if hp["amsgrad"]:
            names += ("max_exp_avg_sq",)
        return names

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        if hp.get("exact", False):
            # last_grad is transient here: filled by step(closure), removed after the update
            return cls._moment_buffers(hp) + ("prev_param", "last_grad")
        return cls._moment_buffers(hp) + ("last_grad",)

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        full = cls.with_defaults(hp)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return (len(cls._moment_buffers(full)) + 1) * itemsize

    def group_hyperparams(self, group: Mapping[str, Any]) -> dict[str, Any]:
        hp = super().group_hyperparams(group)
        hp["exact"] = self._exact
        return hp

    def _drop(self, key: str) -> None:
        for state in self.state.values():
            state.pop(key, None)

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step: MARS-approx without a closure, exact MARS with one (see the class doc)."""
        if closure is None:
            self._exact = False
            self._drop("prev_param")
            return super().step()
        self._exact = True
        self._drop("last_grad")
        with_previous = [
            (p, group)
            for group in self.param_groups
            for p in group["params"]
            if "prev_param" in self.state[p]
        ]
        if with_previous:
            params = [p for p, _ in with_previous]
            current = torch._foreach_mul(params, 1.0)  # a copy of x_t
            torch._foreach_copy_(params, [self.state[p]["prev_param"] for p in params])
            with torch.enable_grad():
                closure()
            for p, group in with_previous:
                grad, p.grad = p.grad, None  # take ownership: the next closure call starts clean
                if grad is not None:
                    self.state[p]["last_grad"] = -grad if group["maximize"] else grad
            torch._foreach_copy_(params, current)
            del current
        with torch.enable_grad():
            loss = closure()
        try:
            super().step()
        finally:
            self._drop("last_grad")
        return loss

    # ------------------------------------------------------------------------------------
    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        if hp["exact"]:
            state["prev_param"].copy_(param)  # x_t, before this update
        if isinstance(param, TensorList):
            if hp["optimize_1d"]:
                self._mars(param, grad, state, step, hp)
            else:
                matrix = [i for i, t in enumerate(param) if _is_matrix(t)]
                other = [i for i, t in enumerate(param) if not _is_matrix(t)]
                for index, rule in ((matrix, self._mars), (other, self._adamw_1d)):
                    if index:
                        sub_state = {k: _pick(v, index) for k, v in state.items()}
                        rule(_pick(param, index), _pick(grad, index), sub_state, step, hp)
        elif hp["optimize_1d"] or _is_matrix(param):
            self._mars(param, grad, state, step, hp)
        else:
            self._adamw_1d(param, grad, state, step, hp)
        if not hp["exact"]:
            state["last_grad"].copy_(grad)

    @staticmethod
    def _adam_direction(
        exp_avg: TensorLike,
        exp_avg_sq: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        beta1: float,
        beta2: float,
        hp: Mapping[str, Any],
    ) -> TensorLike:
        if hp["amsgrad"]:
            exp_avg_sq = maximum_(state["max_exp_avg_sq"], exp_avg_sq)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = math.sqrt(1 - beta2**step)
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(hp["eps"]).mul_(bias_correction1)
        # exp_avg / denom, written over denom: no second parameter-sized temporary
        for m, d in zip(*(x if isinstance(x, TensorList) else [x] for x in (exp_avg, denom))):
            torch.div(m, d, out=d)
        return denom

    def _mars(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        beta1, beta2 = hp["betas"]
        lr = hp["lr"]
        correction = (grad - state["last_grad"]).mul_(hp["gamma"] * beta1 / (1 - beta1))
        c = correction.add_(grad)
        c.div_(c.norm().clamp_min(1.0))  # c / max(1, ||c||), per tensor
        exp_avg = state["exp_avg"]
        exp_avg.mul_(beta1).add_(c, alpha=1 - beta1)
        if hp["optimizer"] == "adamw":
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2).addcmul_(c, c, value=1 - beta2)
            direction = self._adam_direction(exp_avg, exp_avg_sq, state, step, beta1, beta2, hp)
        else:
            direction = exp_avg.sign()
        if hp["weight_decay"] != 0:
            param.mul_(1 - lr * hp["weight_decay"])
        param.add_(direction, alpha=-lr)

    def _adamw_1d(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        beta1, beta2 = hp["betas_1d"]
        lr = hp["lr"] * hp["lr_1d_factor"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        direction = self._adam_direction(exp_avg, exp_avg_sq, state, step, beta1, beta2, hp)
        if hp["weight_decay_1d"] != 0:
            param.mul_(1 - lr * hp["weight_decay_1d"])
        param.add_(direction, alpha=-lr)


__all__ = ["MARS"]
