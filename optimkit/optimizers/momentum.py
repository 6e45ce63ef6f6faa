"""Momentum variants: complex momentum.

Paper:
    J. Lorraine, D. Acuna, P. Vicol, D. Duvenaud, "Complex Momentum for Optimization in Games",
    arXiv:2102.08431 (Algorithm 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    MAXIMIZE,
    Hyper,
    Interval,
    Optimizer,
    TensorLike,
    TensorList,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.registry import Paper, register


def _halves(buffer: TensorLike) -> tuple[TensorLike, TensorLike]:
    """The real and imaginary halves of buffers laid out as ``(2, *param.shape)``."""
    if isinstance(buffer, TensorList):
        return TensorList(b[0] for b in buffer), TensorList(b[1] for b in buffer)
    return buffer[0], buffer[1]


@register(
    paper=Paper(
        "Complex Momentum for Optimization in Games",
        "2102.08431",
        2021,
        "Lorraine, Acuna, Vicol, Duvenaud",
    ),
    category="sgd",
    verified_against=("fp64 reference (complex arithmetic)", "torch.optim.SGD at phase 0"),
)
class ComplexMomentum(Optimizer):
    r"""Gradient descent with a complex momentum coefficient; the real part moves the weights.

    With :math:`\beta = |\beta|\,e^{i\arg\beta}` (``momentum`` = :math:`|\beta|`,
    ``momentum_phase`` = :math:`\arg\beta` in radians), a complex buffer :math:`\mu`
    (:math:`\mu_0 = 0`) and real parameters :math:`\omega`:

    .. math::
        \mu_{j+1} = \beta\,\mu_j - g_j,\qquad
        \omega_{j+1} = \omega_j + \eta\,\Re(\mu_{j+1})

    Written out with :math:`\mu = a + ib`: :math:`a \leftarrow |\beta|\cos\phi\,a -
    |\beta|\sin\phi\,b - g`, :math:`b \leftarrow |\beta|\cos\phi\,b + |\beta|\sin\phi\,a`. With
    ``momentum_phase = 0`` this is heavy-ball momentum and matches ``torch.optim.SGD`` with the
    same ``momentum`` step for step. The learning rate :math:`\eta` is real (the paper also
    allows a complex :math:`\alpha`; only :math:`\Re(\alpha\mu)` matters, which a real
    :math:`\eta` and a phase on :math:`\beta` cover for the recommended real step size).

    Verification status: the paper's body (Algorithm 1, the experiments' settings) could not be
    read; only its abstract and opening were reachable (arXiv:2102.08431, stored copies). The
    abstract confirms real-valued parameter updates and analyses of both simultaneous and
    alternating updates; we implement the simultaneous form (every parameter updated from
    gradients at the same point; an alternating schedule between players is the caller's
    choice of when to call ``step``). The update form above (buffer :math:`\beta\mu - g`,
    parameters moved by the real part) agrees with a third-party write-up of the method
    (a blog post with a reference implementation), not with the paper's text itself.

    Defaults: lr 1e-3 (as ``torch.optim.SGD``), ``momentum`` 0.9 and ``momentum_phase``
    :math:`\pi/8`: optimkit choices, **not** taken from the paper; the paper's recommended
    :math:`|\beta|` and :math:`\arg\beta` could not be found. ``weight_decay`` (coupled,
    default 0) is added to the gradient. Complex parameters are handled as their real views
    (the complex buffer is then per real component).

    State: ``momentum_buffer``, the complex :math:`\mu` stored as two real halves, shape
    ``(2, *param.shape)`` in the parameter's dtype (so checkpoints cast cleanly to the
    parameter's dtype): 8 bytes per fp32 parameter.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-3, "torch.optim.SGD-like default"),
        "momentum": Hyper(0.9, Interval(0.0, 1.0, high_open=True), "optimkit choice, |beta|"),
        "momentum_phase": Hyper(
            math.pi / 8, Interval(-math.pi, math.pi), "optimkit choice, arg beta (radians)"
        ),
        "weight_decay": weight_decay_hyper(0.0),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "coupled"
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",)

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        return 2 * torch.empty((), dtype=dtype).element_size()

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        return param.new_zeros((2, *param.shape))

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        beta_real = hp["momentum"] * math.cos(hp["momentum_phase"])
        beta_imag = hp["momentum"] * math.sin(hp["momentum_phase"])
        real, imag = _halves(state["momentum_buffer"])
        rotated = real * beta_imag  # beta_imag * a, before a changes
        real.mul_(beta_real).sub_(imag, alpha=beta_imag).sub_(grad)
        imag.mul_(beta_real).add_(rotated)
        param.add_(real, alpha=hp["lr"])


__all__ = ["ComplexMomentum"]
