"""The AdaGrad / RMSprop family: accumulated or averaged squared gradients scale the step.

Papers:
    J. Duchi, E. Hazan, Y. Singer, "Adaptive Subgradient Methods for Online Learning and
    Stochastic Optimization", JMLR 12 (2011) (AdaGrad);
    T. Tieleman, G. Hinton, "Lecture 6.5 - RMSprop", COURSERA: Neural Networks for Machine
    Learning (2012);
    A. Attia, T. Koren, "SGD with AdaGrad Stepsizes: Full Adaptivity with High Probability to
    Unknown Parameters, Unbounded Gradients and Affine Variance", arXiv:2302.08783 (AdaGrad-Norm);
    S. Chezhegov et al., "Gradient Clipping Improves AdaGrad when the Noise Is Heavy-Tailed",
    arXiv:2406.04443 (Clip-RAdaGradD).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    MAXIMIZE,
    NON_NEGATIVE,
    POSITIVE,
    UNIT,
    Choice,
    Flag,
    Hyper,
    Optimizer,
    TensorList,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.optimizers._group import GroupNormOptimizer
from optimkit.registry import Paper, register


def filled_like(param: Tensor, value: float) -> Tensor:
    """A state buffer whose every real element is ``value`` (for a complex parameter both the
    real and the imaginary part, as ``torch.optim.Adagrad`` initialises its ``sum``)."""
    fill = complex(value, value) if param.is_complex() else value
    return torch.full_like(param, fill, memory_format=torch.preserve_format)


ADAGRAD_PAPER = Paper(
    "Adaptive Subgradient Methods for Online Learning and Stochastic Optimization",
    "",
    2011,
    "Duchi, Hazan, Singer",
)


@register(
    paper=Paper(
        "Lecture 6.5 - RMSprop: Divide the gradient by a running average of its recent magnitude",
        "",
        2012,
        "Tieleman, Hinton",
    ),
    category="adaptive",
    verified_against=("fp64 reference", "torch.optim.RMSprop"),
)
class RMSprop(Optimizer):
    r"""RMSprop: divide the gradient by a running average of its recent magnitude.

    .. math::
        v_t = \alpha v_{t-1} + (1-\alpha) g_t^2,\qquad
        \bar g_t = \alpha \bar g_{t-1} + (1-\alpha) g_t \ \text{(centered)},

        d_t = \sqrt{v_t - \bar g_t^2} + \epsilon \ \text{(centered) or}\ \sqrt{v_t} + \epsilon,

        b_t = \mu b_{t-1} + g_t / d_t,\quad \theta_t = \theta_{t-1} - \eta\, b_t
        \quad (\mu > 0), \qquad \text{else}\ \theta_t = \theta_{t-1} - \eta\, g_t / d_t

    The lecture gives the rule (decay 0.9) without defaults for a library; we follow
    ``torch.optim.RMSprop`` in every choice (lr 1e-2, alpha 0.99, eps 1e-8 added outside the
    square root, Graves' 2013 ``centered`` variant, momentum on the scaled gradient, coupled L2
    ``weight_decay``) and match it step for step; checkpoints are interchangeable (state
    ``square_avg``, ``momentum_buffer`` when ``momentum > 0``, ``grad_avg`` when ``centered``:
    4 to 12 bytes per fp32 parameter).
    """

    hyperparams = {
        "lr": lr_hyper(1e-2, "torch.optim.RMSprop"),
        "alpha": Hyper(0.99, UNIT, "torch.optim.RMSprop"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "torch.optim.RMSprop"),
        "weight_decay": weight_decay_hyper(0.0),
        "momentum": Hyper(0.0, NON_NEGATIVE, "torch.optim.RMSprop"),
        "centered": Hyper(False, Flag(), "torch.optim.RMSprop (Graves 2013)"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "coupled"
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        names: tuple[str, ...] = ("square_avg",)
        if hp["momentum"] > 0:
            names += ("momentum_buffer",)
        if hp["centered"]:
            names += ("grad_avg",)
        return names

    def update(self, param, grad, state, step, hp) -> None:
        alpha = hp["alpha"]
        square_avg = state["square_avg"].mul_(alpha).addcmul_(grad, grad, value=1 - alpha)
        if hp["centered"]:
            grad_avg = state["grad_avg"].lerp_(grad, 1 - alpha)
            avg = (square_avg - grad_avg * grad_avg).sqrt_()
        else:
            avg = square_avg.sqrt()
        avg.add_(hp["eps"])
        if hp["momentum"] > 0:
            buf = state["momentum_buffer"].mul_(hp["momentum"]).addcdiv_(grad, avg)
            param.add_(buf, alpha=-hp["lr"])
        else:
            param.addcdiv_(grad, avg, value=-hp["lr"])


@register(
    paper=ADAGRAD_PAPER,
    category="adaptive",
    verified_against=("fp64 reference", "torch.optim.Adagrad"),
)
class AdaGrad(Optimizer):
    r"""AdaGrad: per-coordinate steps scaled by the root of the summed squared gradients.

    .. math::
        s_t = s_{t-1} + g_t^2,\qquad
        \theta_t = \theta_{t-1} - \frac{\eta}{1 + (t-1)\,\delta}\,\frac{g_t}{\sqrt{s_t} + \epsilon}

    (the diagonal version, Duchi et al. section 1.1/figure 1, with
    :math:`s_0` = ``initial_accumulator_value`` and learning-rate decay :math:`\delta` =
    ``lr_decay``). Defaults and forms follow ``torch.optim.Adagrad`` (lr 1e-2, eps 1e-10 added
    outside the root, coupled L2 ``weight_decay``), which it matches step for step; checkpoints
    are interchangeable (state ``sum``). Differences from torch: state is created lazily at the
    first step (torch creates it at construction), each group uses its own
    ``initial_accumulator_value`` (torch uses the constructor's value for every group), and
    sparse gradients are rejected. State: ``sum``, 4 bytes per fp32 parameter.
    """

    hyperparams = {
        "lr": lr_hyper(1e-2, "torch.optim.Adagrad"),
        "lr_decay": Hyper(0.0, NON_NEGATIVE, "torch.optim.Adagrad"),
        "weight_decay": weight_decay_hyper(0.0),
        "initial_accumulator_value": Hyper(0.0, NON_NEGATIVE, "torch.optim.Adagrad"),
        "eps": Hyper(1e-10, NON_NEGATIVE, "torch.optim.Adagrad"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "coupled"
    elementwise = True
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        return filled_like(param, hp["initial_accumulator_value"])

    def update(self, param, grad, state, step, hp) -> None:
        clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
        accumulator = state["sum"].addcmul_(grad, grad)
        param.addcdiv_(grad, accumulator.sqrt().add_(hp["eps"]), value=-clr)


# ------------------------------------------------------------------------------------------
# AdaGrad-Norm and Clip-RAdaGradD: one accumulator for the whole param group
# ------------------------------------------------------------------------------------------
class _ScalarStepSize(GroupNormOptimizer):
    """Rules of the form :math:`\\theta \\leftarrow \\theta - s_t g_t` with one scalar
    :math:`s_t` for the whole group, computed by :meth:`group_step` into ``hp["step_size"]``."""

    group_state_keys = ("norm_sum",)
    weight_decay_mode = "coupled"
    elementwise = True

    def accumulator(self, group: Mapping[str, Any], hp: Mapping[str, Any]) -> Tensor:
        """The group's accumulator :math:`b_t^2` (created as :math:`b_0^2`)."""
        state = self.group_state(group)
        if "norm_sum" not in state:
            first = group["params"][0]
            state["norm_sum"] = torch.tensor(
                float(hp["b0"]) ** 2, dtype=self.scalar_dtype(first), device=first.device
            )
        return state["norm_sum"]

    def update(self, param, grad, state, step, hp) -> None:
        step_size = hp["step_size"]
        device = param[0].device if isinstance(param, TensorList) else param.device
        param.sub_(grad * step_size.to(device))


@register(
    paper=Paper(
        "SGD with AdaGrad Stepsizes: Full Adaptivity with High Probability to Unknown "
        "Parameters, Unbounded Gradients and Affine Variance",
        "2302.08783",
        2023,
        "Attia, Koren",
    ),
    category="adaptive",
    verified_against=("fp64 reference",),
)
class AdaGradNorm(_ScalarStepSize):
    r"""AdaGrad-Norm: SGD with one AdaGrad stepsize for all parameters (Attia & Koren).

    .. math::
        \eta_t = \frac{\eta}{\sqrt{\gamma^2 + \sum_{s=1}^{t} \lVert g_s \rVert^2}},\qquad
        \theta_{t+1} = \theta_t - \eta_t\, g_t

    The norm is over **all parameters of the param group** (the paper's setting: one scalar
    stepsize for the whole vector :math:`\theta`), not per tensor, so every tensor of a group
    takes the same stepsize; param groups are independent. The accumulator is one float
    (``norm_sum`` = :math:`\gamma^2 + \sum \lVert g_s \rVert^2`, kept in at least fp32 in the
    state of the group's first parameter), so the state is 0 bytes per parameter. The reference
    and foreach paths compute the same group norm once per step and share it.

    Checked against the paper's introduction (arXiv:2302.08783v2 LaTeX, read from its opening):
    SGD :math:`w_{t+1} = w_t - \eta_t g_t` from :math:`w_1`, called AdaGrad-Norm, with
    parameters :math:`\eta, \gamma > 0`; the stored excerpt ends just before the displayed
    stepsize formula, so the formula above (the standard AdaGrad-Norm stepsize, using the
    current gradient, i.e. without delay) is not checked character for character.

    Defaults: the paper proves its rates for any :math:`\eta, \gamma > 0` and gives no values;
    ``lr`` (:math:`\eta`) = 1e-2 (torch.optim.Adagrad's default) and ``b0`` (:math:`\gamma`) =
    1e-8, so that the first step has length :math:`\approx \eta`. ``weight_decay`` is added to
    the gradient (L2) before its norm is taken.
    """

    hyperparams = {
        "lr": lr_hyper(1e-2, "paper gives none; torch.optim.Adagrad's default"),
        "b0": Hyper(1e-8, POSITIVE, "paper: any gamma > 0; small"),
        "weight_decay": weight_decay_hyper(0.0),
        "maximize": MAXIMIZE,
    }

    impls = ("reference", "foreach", "fused")

    def group_step(self, group, norms, hp) -> None:
        norm_sum = self.accumulator(group, hp).add_(norms.square().sum())
        hp["step_size"] = hp["lr"] / norm_sum.sqrt()


@register(
    paper=Paper(
        "Gradient Clipping Improves AdaGrad when the Noise Is Heavy-Tailed",
        "2406.04443",
        2024,
        "Chezhegov, Klyukin, Semenov, Beznosikov, Gasnikov, Horvath, Takac, Gorbunov",
    ),
    category="adaptive",
    verified_against=(
        "fp64 reference",
        "authors' code Andron00e/Clipped-AdaGrad-and-Adam AdaGradClip_Delayed_Etta (read)",
    ),
)
class ClipRAdaGradD(GroupNormOptimizer):
    r"""Clip-RAdaGradD: clipped, reweighted AdaGrad with a delayed stepsize.

    As the authors' code does it (``AdaGradClip_Delayed_Etta``), with :math:`\hat g_t` the
    clipped gradient and :math:`\hat g_0 = 0`:

    .. math::
        b_t^2 = b_{t-1}^2 + \eta\, \hat g_{t-1}^2,\qquad
        \theta_{t+1} = \theta_t - \gamma\, \frac{\hat g_{t-1}}{b_t + \epsilon},\qquad
        \theta_{t+1} \leftarrow (1 - \gamma\lambda)\, \theta_{t+1}

    coordinate-wise (:math:`b_t^2` is a tensor, :math:`b_0^2` = ``initial_accumulator_value``).
    "Delay": the step at :math:`t` moves along the previous clipped gradient, with a stepsize
    that includes it, so the stepsize never depends on the sample it is applied to and the first
    step does not move. "Reweighted": :math:`\eta` weights the accumulated squares.
    ``clipping`` as in the code: ``"local"`` (each tensor's gradient clipped to norm
    ``max_grad_norm`` as ``torch.nn.utils.clip_grad_norm_`` does, coefficient
    ``min(1, c / (||g|| + 1e-6))``), ``"global"`` (the same over the whole param group),
    ``"elementwise"`` (each coordinate clamped to ``[-c, c]``) or ``"none"``.

    Source: the paper's algorithm block (arXiv:2406.04443) could not be read where this was
    written (only the abstracts: v1 names "Clipped Reweighted AdaGrad with Delay"), so this class
    follows the authors' code. Defaults from that code: ``lr`` 1e-3, ``eps`` 1e-10,
    ``clipping`` "local" (their README's recommendation), ``max_grad_norm`` 1.0, ``eta``
    (``etta``) 1.0, ``initial_accumulator_value`` (``exp_avg_sq_value``) 1e-4, ``weight_decay``
    0 applied after the step as :math:`\theta \leftarrow \theta - \gamma\lambda\theta`.
    Deviations: ``p.grad`` is not clipped in place (the code clips it, and keeps a reference to
    it as the previous gradient); ``maximize``.

    State: ``sum`` (:math:`b_t^2`) and ``prev_grad`` (:math:`\hat g_{t-1}`): 8 bytes per fp32
    parameter.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "authors' code"),
        "eps": Hyper(1e-10, NON_NEGATIVE, "authors' code"),
        "weight_decay": weight_decay_hyper(0.0, "authors' code"),
        "clipping": Hyper(
            "local", Choice(("local", "global", "elementwise", "none")), "authors' code and README"
        ),
        "max_grad_norm": Hyper(1.0, POSITIVE, "authors' code"),
        "eta": Hyper(1.0, NON_NEGATIVE, "authors' code (etta)"),
        "initial_accumulator_value": Hyper(1e-4, NON_NEGATIVE, "authors' code (exp_avg_sq_value)"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # applied after the step, as in the authors' code
    tensorwise = True  # the "global" coefficient is computed before update, in group_step
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("sum", "prev_grad")

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        buffer = super().init_buffer(name, param, hp)
        if name == "sum":  # b_0^2 in every real coordinate (both parts of a complex number)
            (torch.view_as_real(buffer) if buffer.is_complex() else buffer).fill_(
                hp["initial_accumulator_value"]
            )
        return buffer

    @classmethod
    def needs_group_norms(cls, hp: Mapping[str, Any]) -> bool:
        return hp["clipping"] == "global"  # only then the group's gradient norm comes first

    def group_step(self, group: dict[str, Any], norms: Tensor, hp: dict[str, Any]) -> None:
        total = norms.square().sum().sqrt()
        hp["global_clip"] = (hp["max_grad_norm"] / (total + 1e-6)).clamp_max(1.0)

    def update(self, param, grad, state, step, hp) -> None:
        limit = hp["max_grad_norm"]
        clipping = hp["clipping"]
        if clipping == "local":
            clipped = grad * (limit / (grad.norm() + 1e-6)).clamp_max(1.0)
        elif clipping == "global":
            clipped = grad * hp["global_clip"]
        elif clipping == "elementwise":
            clipped = grad.clamp_min(-limit).clamp_max_(limit)
        else:
            clipped = grad
        accumulator, prev_grad = state["sum"], state["prev_grad"]
        accumulator.addcmul_(prev_grad, prev_grad, value=hp["eta"])
        denom = accumulator.sqrt().add_(hp["eps"])
        param.addcdiv_(prev_grad, denom, value=-hp["lr"])
        prev_grad.copy_(clipped)
        if hp["weight_decay"] > 0:
            param.add_(param, alpha=-hp["lr"] * hp["weight_decay"])


__all__ = ["RMSprop", "AdaGrad", "AdaGradNorm", "ClipRAdaGradD"]
