"""CoRe: the Continual Resilient optimizer.

Paper:
    M. Eckhoff, M. Reiher, "CoRe Optimizer: An All-in-One Solution for Machine Learning",
    arXiv:2307.15663 (and "Lifelong Machine Learning Potentials", J. Chem. Theory Comput. 2023).
    Authors' package: ``core-optimizer`` on PyPI (``core_optimizer.CoRe``), version 1.1.0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    MAXIMIZE,
    NON_NEGATIVE,
    UNIT,
    Hyper,
    Interval,
    Optimizer,
    TensorLike,
    TensorList,
)
from optimkit.registry import Paper, register


@dataclass(frozen=True)
class NumberTuple:
    """A tuple of ``count`` real numbers that must satisfy ``test`` (described by ``text``)."""

    count: int
    text: str
    test: Callable[..., bool]

    def describe(self) -> str:
        return self.text

    def check(self, owner: str, name: str, value: Any) -> None:
        ok = (
            isinstance(value, (tuple, list))
            and len(value) == self.count
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            and not any(math.isnan(v) for v in value)
            and self.test(*value)
        )
        if not ok:
            raise ValueError(f"{owner}: invalid {name} = {value!r}; allowed: {self.text}")


def _plasticity(
    score: Tensor, frozen: float, step: int, score_history: int
) -> tuple[Tensor | None, bool]:
    """The plasticity mask P of one tensor (None: all ones) and whether its score decays."""
    if score_history <= 0 or step - 1 < score_history:
        return None, False
    count = int(frozen * score.numel())
    if count <= 0:
        return None, False
    threshold = torch.topk(score.flatten(), count).values[count - 1]  # k-th largest, no sync
    return (~score.ge(0.999999 * threshold)).to(score.dtype), True


@register(
    paper=Paper(
        "CoRe Optimizer: An All-in-One Solution for Machine Learning",
        "2307.15663",
        2023,
        "Eckhoff, Reiher",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "core-optimizer 1.1.0 (PyPI, authors')"),
)
class CoRe(Optimizer):
    r"""CoRe: Adam-like moments, Rprop-like per-weight step sizes, and frozen-weight scores.

    With gradient :math:`G_t` and :math:`t` counted from 1:

    .. math::
        \beta_{1,t} = \beta_1^b + (\beta_1^a - \beta_1^b)\,
                      e^{-((t-1)/\beta_1^c)^2},\qquad
        g_t = \beta_{1,t} g_{t-1} + (1-\beta_{1,t}) G_t,\qquad
        h_t = \beta_2 h_{t-1} + (1-\beta_2) G_t^2

        s_t = \begin{cases}\min(\eta_+ s_{t-1}, s_{\max}) & g_{t-1} g_t P_t > 0\\
                           \max(\eta_- s_{t-1}, s_{\min}) & g_{t-1} g_t P_t < 0\\
                           s_{t-1} & \text{otherwise}\end{cases}
        \quad(\text{then clamped to } [s_{\min}, s_{\max}])

        u_t = \frac{g_t/(1-\beta_{1,t}^t)}{\sqrt{h_t/(1-\beta_2^t)} + \epsilon}\,P_t\,s_t
        \quad(\operatorname{sign} g_t\,P_t\,s_t \text{ when } \beta_2 < 0),\qquad
        \theta_t = (1 - d\,|u_t|)\,\theta_{t-1} - u_t

    **Stability-plasticity balance** (``score_history`` :math:`n > 0`): the score
    :math:`S_t = S_{t-1} + g_t u_t / n` accumulates each weight's contribution; from step
    :math:`n+1` on, the fraction ``frozen`` of the weights of each tensor with the highest
    scores (at or above 0.999999 times the k-th largest score) gets :math:`P_t = 0` (frozen: no
    step-size change, no update, no decay), and the score then decays by :math:`1 - 1/n`
    before the new contribution is added.

    Defaults (``lr`` 1e-3 = initial step size :math:`s_0`, step_sizes (1e-6, 1e-2), etas
    (0.7375, 1.2), betas (0.7375, 0.8125, 250, 0.99), eps 1e-8, weight_decay 0.1,
    score_history 0, frozen 0) are those of the authors' package, which follows the paper's
    recommended general-purpose values. ``lr`` only sets :math:`s_0` at the first step (as in
    the package); later changes (schedulers) do not affect the step sizes.

    Follows the authors' package (core-optimizer 1.1.0) step for step: the decay of the score
    happens only for tensors with at least one frozen weight, and the weight decay is scaled by
    :math:`|u_t|` (so frozen weights are not decayed). Deviation: the package also accepts
    lists for ``weight_decay`` and ``frozen``, cycled over the tensors of a group; here each is
    one number per parameter group (use param groups for per-tensor values). For complex
    parameters the fraction ``frozen`` is taken of the real components (which are what is
    ranked); the package ranks the real components too but takes the fraction of the complex
    element count, so it freezes half as many.

    State: ``exp_avg`` (:math:`g`), ``exp_avg_sq`` (:math:`h`, not kept when
    :math:`\beta_2 < 0`), ``step_size`` (:math:`s`), and ``score`` (:math:`S`, only when
    ``score_history > 0``): 12 bytes per fp32 parameter at the defaults.
    """

    tensorwise = True  # the plasticity ranks the weights of each tensor (a top-k per tensor)

    @property
    def elementwise(self) -> bool:  # type: ignore[override]
        """Without a score history (the default) the rule has no reduction at all: the engine
        may then cut tensors into cache-sized pieces (on the CPU, whole large tensors with
        this rule's temporaries overflow the last-level cache)."""
        return all(group["score_history"] == 0 for group in self.param_groups)

    hyperparams = {
        "lr": Hyper(1e-3, Interval(0.0, low_open=True, tensor=True), "authors' package"),
        "step_sizes": Hyper(
            (1e-6, 1e-2),
            NumberTuple(2, "a pair (min, max) with 0 < min <= max", lambda a, b: 0 < a <= b),
            "authors' package",
        ),
        "etas": Hyper(
            (0.7375, 1.2),
            NumberTuple(
                2,
                "a pair (eta_minus, eta_plus) with 0 < eta_minus <= 1 <= eta_plus",
                lambda a, b: 0 < a <= 1 <= b,
            ),
            "authors' package",
        ),
        "betas": Hyper(
            (0.7375, 0.8125, 250.0, 0.99),
            NumberTuple(
                4,
                "(beta1a, beta1b, beta1c, beta2) with beta1a, beta1b in [0, 1), beta1c > 0, "
                "beta2 < 1 (beta2 < 0: sign updates)",
                lambda a, b, c, d: 0 <= a < 1 and 0 <= b < 1 and c > 0 and d < 1,
            ),
            "authors' package",
        ),
        "eps": Hyper(1e-8, NON_NEGATIVE, "authors' package"),
        "weight_decay": Hyper(0.1, NON_NEGATIVE, "authors' package"),
        "score_history": Hyper(0, Interval(0, integer=True), "authors' package"),
        "frozen": Hyper(0.0, UNIT, "authors' package"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # the decay is scaled by |u_t| inside the rule
    impls = ("reference", "foreach", "fused")  # fused: without a score history

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        names: tuple[str, ...] = ("exp_avg",)
        if hp["betas"][3] >= 0:
            names += ("exp_avg_sq",)
        names += ("step_size",)
        if hp["score_history"] > 0:
            names += ("score",)
        return names

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        if name == "step_size":
            lr = float(hp["lr"])
            return torch.full_like(param, complex(lr, lr) if param.is_complex() else lr)
        return super().init_buffer(name, param, hp)

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        beta1a, beta1b, beta1c, beta2 = hp["betas"]
        eta_minus, eta_plus = hp["etas"]
        step_size_min, step_size_max = hp["step_sizes"]
        score_history = hp["score_history"]
        beta1 = beta1b + (beta1a - beta1b) * math.exp(-(((step - 1) / beta1c) ** 2))
        exp_avg, step_size = state["exp_avg"], state["step_size"]
        if beta2 >= 0:
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        new_avg = grad.lerp(exp_avg, beta1)  # g_t = (1 - beta1) G_t + beta1 g_{t-1}

        # plasticity: per tensor (a top-k per tensor), only once the score history is full
        plasticity = None
        if score_history > 0:
            scores = state["score"]
            if isinstance(scores, TensorList):
                masks = [_plasticity(s, hp["frozen"], step, score_history) for s in scores]
                if any(decay for _, decay in masks):
                    plasticity = TensorList(
                        m if m is not None else torch.ones_like(s)
                        for (m, _), s in zip(masks, scores)
                    )
                    decaying = [s for (_, decay), s in zip(masks, scores) if decay]
                    TensorList(decaying).mul_(1 - 1 / score_history)
            else:
                plasticity, decay = _plasticity(scores, hp["frozen"], step, score_history)
                if decay:
                    scores.mul_(1 - 1 / score_history)

        # Rprop-like step-size adaptation from the sign of g_{t-1} g_t (P_t)
        direction = (new_avg * exp_avg).sign_()
        if plasticity is not None:
            direction.mul_(plasticity)
        increase = direction.clamp_min(0.0)  # 1 where the sign is kept, else 0
        decrease = direction.clamp_max_(0.0)  # -1 where it flipped, else 0
        factor = increase.mul_(eta_plus - 1.0).add_(decrease, alpha=1.0 - eta_minus).add_(1.0)
        step_size.mul_(factor).clamp_min_(step_size_min).clamp_max_(step_size_max)

        if beta2 >= 0:
            denom = (state["exp_avg_sq"] / (1 - beta2**step)).sqrt_().add_(hp["eps"])
            update = (new_avg / (1 - beta1**step)).div_(denom)
        else:
            update = new_avg.sign()
        update.mul_(step_size)
        if plasticity is not None:
            update.mul_(plasticity)
        if score_history > 0:
            state["score"].addcmul_(new_avg, update, value=1 / score_history)
        if hp["weight_decay"] != 0:
            param.addcmul_(update.abs(), param, value=-hp["weight_decay"])
        param.sub_(update)
        exp_avg.copy_(new_avg)


__all__ = ["CoRe"]
