"""Gravity: a kinematic optimizer with a bounded gradient term and a random initial velocity.

Paper:
    D. Bahrami, S. Pourmohammad Zadeh, "Gravity Optimizer: a Kinematic Approach on Optimization
    in Deep Learning", arXiv:2101.09192. Authors' code: github.com/dariush-bahrami/
    gravity.optimizer (Keras: ``implementations/gravity_optimizer_keras.py`` and README; a
    PyTorch port in ``implementations/gravity_optimizer_pytorch.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    COEFFICIENT,
    MAXIMIZE,
    NON_NEGATIVE,
    Hyper,
    Interval,
    Optimizer,
    TensorLike,
    TensorList,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.registry import Paper, register


@register(
    paper=Paper(
        "Gravity Optimizer: a Kinematic Approach on Optimization in Deep Learning",
        "2101.09192",
        2021,
        "Bahrami, Pourmohammad Zadeh",
    ),
    category="adaptive",
    verified_against=(
        "fp64 reference",
        "authors' Keras code and math notes (read; TensorFlow, no parity run)",
    ),
)
class Gravity(Optimizer):
    r"""Gravity: momentum on a gradient term bounded per tensor, with a growing averaging weight.

    For each tensor, with :math:`t` counted from 1:

    .. math::
        M_t = \frac{1}{\max_i |g_{t,i}|},\qquad
        \zeta_t = \frac{g_t}{1 + (g_t / M_t)^2},\qquad
        \hat\beta_t = \frac{\beta\,(t-1) + 1}{(t-1) + 2}

        v_t = \hat\beta_t v_{t-1} + (1-\hat\beta_t)\,\zeta_t,\qquad
        \theta_t = \theta_{t-1} - \eta\, v_t,\qquad
        v_0 \sim \mathcal N\big(0, (\alpha/\eta)^2\big)

    Defaults lr 0.1, alpha 0.01, beta 0.9: the authors' final Keras implementation (README and
    ``gravity_optimizer_keras.py``) and their PyTorch port (an older Keras module in the repo
    had lr 0.01, alpha 4e-3 and a max-min form of :math:`M`; we follow the final one).

    The paper's algorithm block could not be read (only its opening was reachable); the
    authors' derivation notes in the same repository (``gravity_optimizer_math.md``, read) give
    :math:`m = 1/\max|G|`, :math:`\zeta = g/(1+(g/m)^2)`, :math:`V_t = \hat\beta V_{t-1} +
    (1-\hat\beta)\zeta`, :math:`\hat\beta = (\beta t + 1)/(t + 2)` with :math:`t = 0` at
    the first update (two data, :math:`V_0` and :math:`V_1`), :math:`\beta` = 0.9 recommended,
    and a random normal initial :math:`V`, all as implemented here.

    The step count in :math:`\hat\beta` follows the authors' Keras code, which uses
    ``optimizer.iterations`` *before* it is incremented (0 on the first step, so
    :math:`\hat\beta_1 = 1/2`); their PyTorch port increments first (:math:`\hat\beta_1 =
    (\beta + 1)/3`). We follow the Keras code (the reference implementation of the paper).

    The initial velocity is random with standard deviation :math:`\alpha/\eta` (the group's
    learning rate when the state is created), as in the authors' code. So that runs are
    reproducible and independent of the global RNG, it is drawn in float64 from a generator
    seeded by ``seed`` and the parameter's position within its param group (two tensors at the
    same position of different groups share a seed), then cast to the parameter's dtype.
    ``alpha = 0`` starts from zero velocity. A zero gradient gives :math:`\zeta = 0` (the
    ``1/max`` is infinite; no NaN). ``weight_decay`` (not in the paper; default 0) is added to
    the gradient.

    State: ``velocity``: 4 bytes per fp32 parameter.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(0.1, "authors' code (Keras and PyTorch)"),
        "alpha": Hyper(0.01, NON_NEGATIVE, "authors' code"),
        "beta": Hyper(0.9, COEFFICIENT, "authors' code"),
        "seed": Hyper(0, Interval(0, integer=True), "optimkit: seeds the initial velocity"),
        "weight_decay": weight_decay_hyper(0.0, "not in the paper"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "coupled"
    impls = ("reference", "foreach", "fused")

    def check_combination(self, hp: Mapping[str, Any]) -> None:
        lr = hp.get("lr", 0.1)
        lr = lr.item() if isinstance(lr, Tensor) else lr
        if hp.get("alpha", 0.0) > 0 and lr == 0:
            raise ValueError(
                "Gravity: alpha > 0 needs lr > 0 (the initial velocity has std alpha / lr)"
            )

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("velocity",)

    def _position_in_group(self, param: Tensor) -> int:
        for group in self.param_groups:
            for index, candidate in enumerate(group["params"]):
                if candidate is param:
                    return index
        raise KeyError("parameter not in any param group")

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        dtype = self.state_dtype(name, param) or param.dtype  # the noise in the state's dtype
        velocity = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
        if hp["alpha"] == 0:
            return velocity
        generator = torch.Generator().manual_seed(
            int(hp["seed"]) * 1_000_003 + self._position_in_group(param)
        )
        real = torch.view_as_real(velocity) if velocity.is_complex() else velocity
        noise = torch.randn(real.shape, generator=generator, dtype=torch.float64)
        real.copy_(noise.mul_(hp["alpha"] / hp["lr"]))
        return velocity

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        iterations = step - 1  # the Keras optimizer.iterations before this step
        beta_hat = (hp["beta"] * iterations + 1) / (iterations + 2)
        scaled = grad.abs()
        scaled.mul_(_max(scaled))  # |g| / M, with 1/M = max |g| per tensor
        denom = scaled.mul_(scaled).add_(1.0)  # zeta = g / denom
        velocity = state["velocity"]
        velocity.mul_(beta_hat).addcdiv_(grad, denom, value=1 - beta_hat)  # lerp to zeta
        param.add_(velocity, alpha=-hp["lr"])


def _max(x: TensorLike) -> TensorLike:
    """The largest element of each tensor (0 for an empty one), as 0-d tensors: one pass,
    where ``norm(inf)`` is an order of magnitude slower on the CPU."""
    if not isinstance(x, TensorList):
        return x.amax() if x.numel() else x.new_zeros(())
    if all(t.numel() for t in x):
        return TensorList(torch._foreach_max(x.tensors))
    return TensorList(_max(t) for t in x)


__all__ = ["Gravity"]
