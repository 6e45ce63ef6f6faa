"""SWATS: start with Adam, switch each layer to SGD with momentum when a learning-rate
estimate settles.

Paper:
    N. S. Keskar, R. Socher, "Improving Generalization Performance by Switching from Adam to
    SGD", arXiv:1712.07628 (Algorithm 1). No official code.
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
    Betas,
    Hyper,
    Optimizer,
    TensorLike,
    TensorList,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.registry import Paper, register

_SCALARS = ("sgd_phase", "exp_avg_lr", "sgd_lr")


def _as_list(x: TensorLike) -> list[Tensor]:
    return list(x) if isinstance(x, TensorList) else [x]


@register(
    paper=Paper(
        "Improving Generalization Performance by Switching from Adam to SGD",
        "1712.07628",
        2017,
        "Keskar, Socher",
    ),
    category="adaptive",
    verified_against=("fp64 reference (Algorithm 1)",),
)
class SWATS(Optimizer):
    r"""SWATS: Adam until a per-layer SGD learning-rate estimate settles, then SGD with momentum.

    Algorithm 1 of the paper, per parameter tensor ("layer"), :math:`k` counted from 1. In the
    Adam phase:

    .. math::
        m_k = \beta_1 m_{k-1} + (1-\beta_1) g_k,\qquad a_k = \beta_2 a_{k-1} + (1-\beta_2) g_k^2,

        p_k = -\alpha\,\frac{\sqrt{1-\beta_2^k}}{1-\beta_1^k}\,\frac{m_k}{\sqrt{a_k}+\epsilon},
        \qquad x_k = x_{k-1} + p_k

    and, if :math:`p_k^\top g_k \ne 0`:

    .. math::
        \gamma_k = \frac{p_k^\top p_k}{-p_k^\top g_k},\qquad
        \lambda_k = \beta_2 \lambda_{k-1} + (1-\beta_2)\gamma_k

    (else :math:`\lambda_k = \lambda_{k-1}`). When :math:`k > 1` and
    :math:`|\lambda_k/(1-\beta_2^k) - \gamma_k| < \epsilon_{\text{switch}}` the tensor switches
    to SGD with :math:`\Lambda = \lambda_k/(1-\beta_2^k)` and :math:`v = 0`; from then on

    .. math:: v_k = \beta_1 v_{k-1} + g_k,\qquad x_k = x_{k-1} - (1-\beta_1)\,\Lambda\, v_k.

    Defaults: lr (:math:`\alpha`) 1e-3, betas (0.9, 0.999), eps 1e-9: Algorithm 1. The paper
    uses the one :math:`\epsilon = 10^{-9}` both in Adam's denominator and in the switch test;
    here they are ``eps`` and ``switch_tol``, both 1e-9 by default (identical to the paper).
    The switch is per tensor ("per layer", as in the paper). ``weight_decay`` (default 0) is
    added to the gradient. After the switch the learning rate of the group no longer acts (the
    SGD phase uses the estimated :math:`\Lambda`, as in Algorithm 1); :math:`\Lambda` is used as
    estimated, without a sign check, as in Algorithm 1.

    State: ``exp_avg`` (:math:`m`, reused as the SGD momentum :math:`v` after the switch),
    ``exp_avg_sq`` (:math:`a`; unused after the switch), and three 0-d tensors per parameter:
    ``sgd_phase`` (0 or 1), ``exp_avg_lr`` (:math:`\lambda`) and ``sgd_lr`` (:math:`\Lambda`):
    8 bytes per fp32 parameter. Cost: the phase decides which rule runs, so each step reads
    the phase flags of a bucket back to the host once (one device sync per bucket per step);
    :math:`\gamma_k` needs one dot product per tensor.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-3, "paper, Algorithm 1"),
        "betas": Hyper((0.9, 0.999), Betas(2), "paper, Algorithm 1"),
        "eps": Hyper(1e-9, NON_NEGATIVE, "paper, Algorithm 1"),
        "switch_tol": Hyper(1e-9, NON_NEGATIVE, "paper, Algorithm 1 (the same epsilon)"),
        "weight_decay": weight_decay_hyper(0.0, "not in the paper"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "coupled"
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq") + _SCALARS

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        return 2 * torch.empty((), dtype=dtype).element_size()

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        if name in _SCALARS:
            dtype = param.real.dtype if param.is_complex() else param.dtype
            return torch.zeros((), dtype=dtype, device=param.device)
        return super().init_buffer(name, param, hp)

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        phases = _as_list(state["sgd_phase"])
        flags = torch.stack(phases).tolist() if len(phases) > 1 else [phases[0].item()]
        if isinstance(param, TensorList):
            groups = {
                phase: [i for i, f in enumerate(flags) if (f != 0) == phase]
                for phase in (False, True)
            }
            for phase, index in groups.items():
                if index:
                    rule = self._sgd_phase if phase else self._adam_phase
                    pick = lambda x, index=index: TensorList(x[i] for i in index)  # noqa: E731
                    rule(pick(param), pick(grad), {k: pick(v) for k, v in state.items()}, step, hp)
        elif flags[0] != 0:
            self._sgd_phase(param, grad, state, step, hp)
        else:
            self._adam_phase(param, grad, state, step, hp)

    @staticmethod
    def _sgd_phase(
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        beta1 = hp["betas"][0]
        velocity = state["exp_avg"]
        velocity.mul_(beta1).add_(grad)
        param.add_(velocity * state["sgd_lr"], alpha=-(1 - beta1))

    @staticmethod
    def _adam_phase(
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        scale = -hp["lr"] * math.sqrt(1 - beta2**step) / (1 - beta1**step)
        adam_step = (exp_avg / exp_avg_sq.sqrt().add_(hp["eps"])).mul_(scale)
        param.add_(adam_step)

        # the SGD learning-rate estimate, one scalar per tensor, computed for all at once
        steps, grads = _as_list(adam_step), _as_list(grad)
        dot_pg = torch.stack([(p * g).sum() for p, g in zip(steps, grads)])
        dot_pp = torch.stack([(p * p).sum() for p in steps])
        moving = dot_pg != 0
        gamma = torch.where(moving, dot_pp / -dot_pg, torch.zeros_like(dot_pp))
        lambdas = _as_list(state["exp_avg_lr"])
        old = torch.stack(lambdas)
        new = torch.where(moving, old * beta2 + gamma * (1 - beta2), old)
        estimate = new / (1 - beta2**step)
        switch = moving & ((estimate - gamma).abs() < hp["switch_tol"])
        if step <= 1:
            switch = torch.zeros_like(switch)
        sgd_lrs = _as_list(state["sgd_lr"])
        torch._foreach_copy_(lambdas, list(new.unbind()))
        torch._foreach_copy_(
            sgd_lrs, list(torch.where(switch, estimate, torch.stack(sgd_lrs)).unbind())
        )
        torch._foreach_copy_(_as_list(state["sgd_phase"]), list(switch.to(old.dtype).unbind()))
        keep = (~switch).to(old.dtype)
        torch._foreach_mul_(_as_list(exp_avg), list(keep.unbind()))  # v = 0 at the switch


__all__ = ["SWATS"]
