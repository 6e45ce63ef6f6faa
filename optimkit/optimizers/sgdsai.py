"""SGD-SaI: SGD with momentum and learning rates scaled once, at initialisation, by the
gradient signal-to-noise ratio of each parameter tensor.

Paper:
    M. Xu, L. Xiang, X. Cai, H. Wen, "No More Adam: Learning Rate Scaling at Initialization is
    All You Need", arXiv:2412.11768; authors' package: ``sgd-sai`` (``sgd_sai.SGD_sai``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
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


def _gsnr(grad: Tensor, eps: float) -> Tensor:
    """g-SNR of one tensor: ``||g|| / (std(g) + eps)``, the unbiased std of a one-element
    tensor (NaN) taken as 0, as in the authors' code."""
    if grad.numel() <= 1:
        return grad.norm() / eps
    return grad.norm() / (grad.std().nan_to_num() + eps)


@register(
    paper=Paper(
        "No More Adam: Learning Rate Scaling at Initialization is All You Need",
        "2412.11768",
        2024,
        "Xu, Xiang, Cai, Wen",
    ),
    category="sgd",
    verified_against=("fp64 reference", "sgd-sai 1.0.3 (authors' package)"),
    battery={"hp": {"eps": 1.0}},
)
class SGDSaI(Optimizer):
    r"""SGD-SaI: momentum SGD whose per-tensor learning rate is fixed at the first step by
    the gradient signal-to-noise ratio.

    For each parameter tensor :math:`w` (with decoupled weight decay :math:`\lambda`):

    .. math::
        \mathrm{gsnr} = \frac{\lVert g_1\rVert_2}{\operatorname{std}(g_1) + \epsilon}
        \ \text{(once, at the first step)},\qquad
        b_1 = g_1,\quad b_t = \mu b_{t-1} + (1-\mu) g_t,

        w_t = (1-\eta\lambda)\,w_{t-1} - \eta\,\mathrm{gsnr}\; b_t

    Defaults: the authors' package (lr 1e-2, momentum 0.9, eps 1e-8, weight_decay 1e-2).
    Deviation from the paper, following the authors' code: Algorithm 1 (line 14) divides
    every g-SNR by the largest one over all parameter blocks; the package (sgd-sai 1.0.3, also
    the code in the authors' repository) uses the raw ratio. The normalisation is one constant
    frozen at the first step, so the paper's rule is this one with ``lr / max_k gsnr_k``.
    Also as in the authors' code: the std is the unbiased one, and for a one-element tensor
    (std undefined) it is taken as 0, so such a tensor's g-SNR is :math:`|g_1|/\epsilon`
    (with the default eps, a huge step: give scalar parameters their own group or a larger
    ``eps``; the generic test battery, whose model has a 0-d parameter, runs with
    ``eps = 1``). The g-SNR is computed from the
    first gradient each tensor receives and kept in the state (so it survives checkpoints).
    Deviations from the package: its first ``step`` evaluates the closure twice (once for its
    warm-up) and a parameter without a gradient at the first step never gets a g-SNR (an
    error later); here each tensor computes its own at its own first step. ``momentum = 0``
    (which the package cannot run) is plain SGD scaled by the g-SNR, with no buffer.

    State: ``momentum_buffer`` (4 bytes per fp32 parameter) and ``gsnr``, one scalar per tensor.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-2, "authors' package sgd-sai"),
        "momentum": Hyper(0.9, Interval(0.0, 1.0, high_open=True), "authors' package sgd-sai"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "authors' package sgd-sai"),
        "weight_decay": weight_decay_hyper(1e-2, "authors' package sgd-sai"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "decoupled"
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("gsnr", "momentum_buffer") if hp["momentum"] != 0 else ("gsnr",)

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        # the momentum buffer is parameter-shaped; gsnr is one scalar per tensor
        full = cls.with_defaults(hp)
        return torch.empty((), dtype=dtype).element_size() if full["momentum"] != 0 else 0

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        if name == "gsnr":
            real_dtype = param.real.dtype if param.is_complex() else param.dtype
            return torch.zeros((), dtype=real_dtype, device=param.device)
        return super().init_buffer(name, param, hp)

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        momentum, gsnr = hp["momentum"], state["gsnr"]
        if step == 1:  # one-time, per-tensor: the g-SNR at initialisation
            if isinstance(grad, TensorList):
                gsnr.copy_(TensorList(_gsnr(g, hp["eps"]) for g in grad))
            else:
                gsnr.copy_(_gsnr(grad, hp["eps"]))
        if momentum != 0:
            buf = state["momentum_buffer"]
            if step == 1:
                buf.copy_(grad)
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - momentum)
            grad = buf
        param.add_(grad * (gsnr * -hp["lr"]))


__all__ = ["SGDSaI"]
