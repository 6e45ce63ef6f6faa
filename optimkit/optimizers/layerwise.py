"""Layer-wise adaptive optimizers: one scalar (a trust ratio, a second moment, a projection
test) per parameter tensor. A "layer" is one parameter tensor throughout this module.

Papers:
    Y. You, I. Gitman, B. Ginsburg, "Large Batch Training of Convolutional Networks",
    arXiv:1708.03888 (LARS);
    K. Do et al., "Revisiting LARS for Large Batch Training Generalization of Neural
    Networks", arXiv:2309.14053 (TVLARS);
    Y. You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
    arXiv:1904.00962 (LAMB);
    B. Ginsburg et al., "Stochastic Gradient Methods with Layer-wise Adaptive Moments for
    Training of Deep Networks", arXiv:1905.11286 (NovoGrad);
    B. Heo et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on
    Scale-invariant Weights", arXiv:2006.08217 (AdamP, SGDP).

Per-tensor scalars are computed for a whole bucket at once: the per-tensor norms
(``torch._foreach_norm``) are stacked into one vector, combined with single kernels, and
handed back as a :class:`TensorList` of 0-d tensors that multiplies the bucket.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    MAXIMIZE,
    NON_NEGATIVE,
    POSITIVE,
    Betas,
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

__all__ = ["LAMB", "LARS", "TVLARS", "AdamP", "SGDP", "NovoGrad"]


# ----------------------------------------------------------------------------------------------
# per-tensor scalars of a tensor or of a bucket
# ----------------------------------------------------------------------------------------------
def _stacked(values: TensorLike) -> Tensor:
    """Per-tensor 0-d values as one vector (a 0-d tensor stays as it is)."""
    return torch.stack(values.tensors) if isinstance(values, TensorList) else values


def _unstacked(vector: Tensor, like: TensorLike) -> TensorLike:
    return TensorList(vector.unbind()) if isinstance(like, TensorList) else vector


def _divide_into(numerator: TensorLike, denominator: TensorLike) -> TensorLike:
    """``numerator / denominator`` written over ``denominator`` (a temporary): the same
    numbers as the out-of-place quotient, without allocating another parameter-sized
    buffer."""
    for n, d in zip(_tensors(numerator), _tensors(denominator)):
        torch.div(n, d, out=d)
    return denominator


def _dims(param: TensorLike) -> list[int]:
    return [t.dim() for t in param] if isinstance(param, TensorList) else [param.dim()]


def _keep_excluded(ratio: Tensor, param: TensorLike, exclude_vectors: bool) -> Tensor:
    """Trust ratio 1 for one-dimensional tensors (biases, norm scales) when
    ``exclude_vectors`` is set (``p.ndim == 1``, the test of the Barlow Twins / TVLARS code;
    a 0-d scalar is still adapted)."""
    if not exclude_vectors:
        return ratio
    excluded = [d == 1 for d in _dims(param)]
    if not any(excluded):
        return ratio
    if all(excluded):
        return torch.ones_like(ratio)
    mask = torch.tensor(excluded, device=ratio.device)
    return torch.where(mask, torch.ones_like(ratio), ratio)


def _guarded(ratio: Tensor, weight_norm: Tensor, other_norm: Tensor) -> Tensor:
    """The ratio where both norms are positive, else 1 (apex FusedLAMB, NVIDIA LARC)."""
    valid = (weight_norm > 0) & (other_norm > 0)
    return torch.where(valid, ratio, torch.ones_like(ratio))


# ----------------------------------------------------------------------------------------------
# LAMB
# ----------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes",
        "1904.00962",
        2019,
        "You, Li, Reddi, Hseu, Kumar, Bhojanapalli, Song, Demmel, Keutzer, Hsieh",
    ),
    category="layer-wise",
    verified_against=("fp64 reference (paper Algorithm 2, apex FusedLAMB conventions)",),
)
class LAMB(Optimizer):
    r"""LAMB: Adam direction plus decoupled decay, rescaled per tensor by a trust ratio.

    Paper, Algorithm 2, for each parameter tensor :math:`x` (a layer):

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2,

        r_t = \frac{m_t/(1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon},\qquad
        u_t = r_t + \lambda x_{t-1},\qquad
        x_t = x_{t-1} - \eta\,\frac{\phi(\lVert x_{t-1}\rVert)}{\lVert u_t\rVert}\,u_t

    with :math:`\phi` the identity. The weight decay :math:`\lambda` is decoupled from the
    moments and sits inside the trust ratio, as in the paper. Zero norms: as in NVIDIA apex
    ``FusedLAMB``, the ratio is 1 when :math:`\lVert x\rVert = 0` or
    :math:`\lVert u\rVert = 0` (a zero-initialised layer takes a plain AdamW step); the ratio
    is not clipped (apex; the paper's bounded :math:`\phi` is not used in its experiments).

    Options: ``bias_correction`` (apex; the paper's Algorithm 2 corrects), ``grad_averaging``
    (apex: ``False`` accumulates :math:`m_t = \beta_1 m_{t-1} + g_t`),
    ``exclude_from_layer_adaptation``: one-dimensional tensors (biases, norm scales;
    ``p.ndim == 1`` as in the Barlow Twins LARS code) take a trust ratio of 1, i.e. a plain
    AdamW step; their weight decay is unchanged (put them in a param group with
    ``weight_decay=0`` to exclude them from decay as well, the BERT recipe).

    Defaults: apex ``FusedLAMB`` (lr 1e-3, betas (0.9, 0.999), eps 1e-6, weight_decay 0.01).
    Deviations from apex: apex skips the trust ratio in groups with ``weight_decay = 0`` unless
    ``use_nvlamb``; we always apply it, as the paper does (apex's ``use_nvlamb=True``). Apex's
    global gradient-norm clipping (``max_grad_norm``) is a gradient transform, not part of the
    rule: clip before ``step``.

    State: ``exp_avg``, ``exp_avg_sq``: 8 bytes per fp32 parameter.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-3, "apex FusedLAMB"),
        "betas": Hyper((0.9, 0.999), Betas(2), "paper, Algorithm 2 / apex FusedLAMB"),
        "eps": Hyper(1e-6, NON_NEGATIVE, "paper (BERT) / apex FusedLAMB"),
        "weight_decay": weight_decay_hyper(0.01, "apex FusedLAMB"),
        "bias_correction": Hyper(True, Flag(), "paper, Algorithm 2 / apex"),
        "grad_averaging": Hyper(True, Flag(), "apex FusedLAMB"),
        "exclude_from_layer_adaptation": Hyper(False, Flag(), "paper applies it to all layers"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # decoupled, inside the trust ratio
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if hp["grad_averaging"]:
            exp_avg.lerp_(grad, 1 - beta1)
        else:
            exp_avg.mul_(beta1).add_(grad)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        if hp["bias_correction"]:
            bias_correction1, bias_correction2 = 1 - beta1**step, 1 - beta2**step
        else:
            bias_correction1, bias_correction2 = 1.0, 1.0
        denom = exp_avg_sq.sqrt().div_(math.sqrt(bias_correction2)).add_(hp["eps"])
        update = _divide_into(exp_avg, denom)
        if bias_correction1 != 1.0:
            update.div_(bias_correction1)
        if hp["weight_decay"] != 0:
            update.add_(param, alpha=hp["weight_decay"])

        weight_norm, update_norm = _stacked(param.norm()), _stacked(update.norm())
        ratio = _guarded(weight_norm / update_norm, weight_norm, update_norm)
        ratio = _keep_excluded(ratio, param, hp["exclude_from_layer_adaptation"])
        update.mul_(_unstacked(ratio, param))
        param.add_(update, alpha=-hp["lr"])


# ----------------------------------------------------------------------------------------------
# LARS
# ----------------------------------------------------------------------------------------------
LARS_PAPER = Paper(
    "Large Batch Training of Convolutional Networks", "1708.03888", 2017, "You, Gitman, Ginsburg"
)


def _lars_hyperparams() -> dict[str, Hyper]:
    return {
        "lr": lr_hyper(1.0, "timm Lars (the paper gives a recipe-specific global lr)"),
        "momentum": Hyper(0.9, Interval(0.0, 1.0, high_open=True), "paper, section 5"),
        "weight_decay": weight_decay_hyper(5e-4, "paper (AlexNet / ResNet-50 recipes)"),
        "trust_coefficient": Hyper(1e-3, POSITIVE, "paper, eq. (6): eta = 0.001"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "NVIDIA LARC / timm Lars"),
        "exclude_from_layer_adaptation": Hyper(False, Flag(), "paper adapts every layer"),
        "maximize": MAXIMIZE,
    }


@register(paper=LARS_PAPER, category="layer-wise", verified_against=("fp64 reference",))
class LARS(Optimizer):
    r"""LARS: momentum SGD with a per-tensor local learning rate (You, Gitman & Ginsburg).

    For each parameter tensor :math:`w` (a layer), with trust coefficient :math:`\eta`,
    weight decay :math:`\beta`, momentum :math:`\mu` and global learning rate :math:`\gamma`
    (paper, Algorithm 1):

    .. math::
        \lambda = \eta\,\frac{\lVert w\rVert}{\lVert g\rVert + \beta\lVert w\rVert + \epsilon},
        \qquad
        b_t = \mu\, b_{t-1} + \lambda\,(g_t + \beta w),\qquad
        w \leftarrow w - \gamma\, b_t

    Zero norms: :math:`\lambda = 1` when :math:`\lVert w\rVert = 0` or
    :math:`\lVert g\rVert = 0` (NVIDIA LARC, timm). ``exclude_from_layer_adaptation``:
    one-dimensional tensors (biases, BatchNorm/LayerNorm scales; ``p.ndim == 1`` as in the
    Barlow Twins LARS code) use :math:`\lambda = 1`
    (momentum SGD with coupled decay; put them in a ``weight_decay=0`` group to skip decay
    too, the usual recipe).

    Deviations: the paper keeps :math:`\gamma` inside the buffer
    (:math:`v = \mu v + \gamma\lambda(g+\beta w),\ w \leftarrow w - v`); like
    ``torch.optim.SGD``, NVIDIA LARC and timm we keep it outside (identical for a constant
    :math:`\gamma`). ``eps`` (1e-8, LARC/timm) is not in the paper; pass 0 for the paper's
    exact ratio. Defaults: momentum 0.9, weight decay 5e-4 and :math:`\eta = 0.001` (paper);
    ``lr = 1.0`` (timm; the paper's global rate comes with its polynomial-decay recipe).

    State: ``momentum_buffer``: 4 bytes per fp32 parameter.
    """

    tensorwise = True

    hyperparams = _lars_hyperparams()
    weight_decay_mode = None  # coupled, but the ratio needs the gradient norm without it
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",)

    def trust_scale(self, step: int, hp: Mapping[str, Any]) -> float:
        """A factor of the trust coefficient at this step (1 for LARS)."""
        return 1.0

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        weight_decay = hp["weight_decay"]
        weight_norm, grad_norm = _stacked(param.norm()), _stacked(grad.norm())
        coefficient = hp["trust_coefficient"] * self.trust_scale(step, hp)
        ratio = coefficient * weight_norm / (grad_norm + weight_decay * weight_norm + hp["eps"])
        ratio = _guarded(ratio, weight_norm, grad_norm)
        ratio = _keep_excluded(ratio, param, hp["exclude_from_layer_adaptation"])
        direction = grad.add(param, alpha=weight_decay) if weight_decay != 0 else grad
        buf = state["momentum_buffer"]
        buf.mul_(hp["momentum"]).add_(direction * _unstacked(ratio, param))
        param.add_(buf, alpha=-hp["lr"])


# ----------------------------------------------------------------------------------------------
# AdamP and SGDP
# ----------------------------------------------------------------------------------------------
ADAMP_PAPER = Paper(
    "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights",
    "2006.08217",
    2020,
    "Heo, Chun, Oh, Han, Yun, Kim, Uh, Ha",
)


def _tensors(x: TensorLike) -> Sequence[Tensor]:
    return x.tensors if isinstance(x, TensorList) else [x]


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """Dot products of the rows of two matrices, as a batched matrix product: no
    parameter-sized temporary (``(a * b).sum(1)`` and ``vecdot`` allocate one; a second
    one per tensor makes the step of large tensors page-fault on fresh memory), though
    slower to compute than ``vecdot`` when memory is reused."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def _radial_coefficient(
    param: Tensor, grad: Tensor, direction: Tensor, delta: float, eps: float
) -> tuple[Tensor, Tensor]:
    """The projection of ``direction`` when ``param`` looks scale-invariant, as a coefficient
    ``c`` per row (shaped to broadcast against ``param``): the projected direction is
    ``direction - c * param``; also a 0-d bool tensor telling whether it projects.

    The test of the authors' code: first channel-wise (rows of ``param.reshape(n, -1)``),
    then layer-wise (the whole tensor): if the largest :math:`|\\cos(g, w)|` over the view's
    rows is below :math:`\\delta/\\sqrt{\\text{row length}}`, project out of every row the
    component along that row of :math:`w`: with :math:`\\hat w = w/(\\lVert w\\rVert +
    \\epsilon)`, :math:`d - \\hat w (\\hat w \\cdot d) = d - w\\,(w\\cdot d)/(\\lVert w\\rVert
    + \\epsilon)^2`. Both views' statistics come from one pass of row reductions (the layer's
    norms and dot products are those of its rows, combined); no data-dependent branch (no
    host synchronisation): ``c`` is selected with ``torch.where`` (0 when not projected).
    """
    rows, stat = param.shape[0], torch.promote_types(param.dtype, torch.float32)
    param_rows, grad_rows = param.reshape(rows, -1), grad.reshape(rows, -1)
    param_norm = torch.linalg.vector_norm(param_rows, dim=1, dtype=stat)
    grad_norm = torch.linalg.vector_norm(grad_rows, dim=1, dtype=stat)
    if direction is grad:  # one dot product: vecdot, faster, with one temporary
        grad_dot = direction_dot = torch.linalg.vecdot(grad_rows, param_rows, dim=1).to(stat)
    else:
        grad_dot = _row_dot(grad_rows, param_rows).to(stat)
        direction_dot = _row_dot(param_rows, direction.reshape(rows, -1))
        direction_dot = direction_dot.to(stat)
    # channel-wise view: one row per output channel
    cosine = grad_dot / (grad_norm.clamp_min(eps) * param_norm.clamp_min(eps))
    channel = cosine.abs_().amax() < delta / math.sqrt(param_rows.shape[1])
    # layer-wise view: one row
    layer_param_norm, layer_grad_norm = param_norm.norm(), grad_norm.norm()
    cosine = grad_dot.sum() / (layer_grad_norm.clamp_min(eps) * layer_param_norm.clamp_min(eps))
    layer = (cosine.abs_() < delta / math.sqrt(param.numel())) & ~channel
    coefficient = torch.where(
        channel,
        direction_dot / param_norm.add_(eps).square_(),
        torch.where(layer, direction_dot.sum() / layer_param_norm.add_(eps).square_(), 0.0),
    )
    return coefficient.view([-1] + [1] * (param.dim() - 1)), channel | layer


def _project_and_decay_(
    param: TensorLike,
    grad: TensorLike,
    direction: TensorLike,
    hp: Mapping[str, Any],
    decay_scale: float,
    step_size: float,
    project_direction: bool,
) -> None:
    """AdamP/SGDP's projection of each tensor of at least two dimensions, its decoupled weight
    decay and its step :math:`w \\leftarrow w\\,(1 - \\eta\\lambda\\,\\rho\\,s) - \\alpha\\,d`,
    with :math:`\\rho` = ``wd_ratio`` for a projected tensor and 1 otherwise, ``decay_scale``
    :math:`s`, ``step_size`` :math:`\\alpha` and the projected direction
    :math:`d = d_0 - c\\,w` (:func:`_radial_coefficient`). With ``project_direction`` the
    projection is written into ``direction``; else ``direction`` is left as it is and the
    projection is folded into the decay factor: :math:`w\\,(1 - \\eta\\lambda\\rho s +
    \\alpha c) - \\alpha d_0` (one pass over the tensor fewer)."""
    weight_decay = hp["weight_decay"] * decay_scale * hp["lr"]
    vectors = []
    for p, g, d in zip(_tensors(param), _tensors(grad), _tensors(direction)):
        if p.dim() <= 1:
            vectors.append(p)
            continue
        if p.numel() == 0:
            continue
        coefficient, projected = _radial_coefficient(p, g, d, hp["delta"], hp["eps"])
        # the factors in float32 at least: a bfloat16 factor near 1 would round the step away
        decayed = torch.tensor(1 - weight_decay * hp["wd_ratio"], dtype=coefficient.dtype)
        factor = torch.where(projected, decayed, 1 - weight_decay)
        if project_direction:
            d.addcmul_(p, coefficient, value=-1)
            if weight_decay > 0:
                p.mul_(factor)
        else:
            p.mul_(coefficient.mul_(step_size).add_(factor))
    if vectors and weight_decay > 0:
        torch._foreach_mul_(vectors, 1 - weight_decay)
    param.add_(direction, alpha=-step_size)


_PROJECTION_HYPERPARAMS = {
    "delta": Hyper(0.1, POSITIVE, "paper, section 3.3 / authors' package adamp"),
    "wd_ratio": Hyper(0.1, Interval(0.0, 1.0), "paper, section 3.3 / authors' package adamp"),
}


@register(
    paper=ADAMP_PAPER,
    category="layer-wise",
    verified_against=("fp64 reference", "adamp 0.3.0 (authors' package)"),
)
class AdamP(Optimizer):
    r"""AdamP: Adam whose step loses its radial part on scale-invariant weights (Heo et al.).

    The Adam direction :math:`p_t = \hat m_t/(\sqrt{\hat v_t}+\epsilon)` (Nesterov:
    :math:`(\beta_1 m_t + (1-\beta_1) g_t)/(\ldots)`, bias-corrected by the step size).
    For a tensor :math:`w` of two or more dimensions, if
    :math:`\max_{\text{rows}} |\cos(g, w)| < \delta/\sqrt{\dim(\text{row})}`, first with the
    channel-wise view (one row per output channel) and else with the layer-wise view (one row),
    the weight is taken as scale-invariant and

    .. math::
        p_t \leftarrow p_t - \hat w\,(\hat w\cdot p_t)\ \text{per row},\qquad
        \hat w = w/(\lVert w\rVert + \epsilon),

    and its weight decay is scaled by ``wd_ratio``. Then
    :math:`w \leftarrow w(1-\eta\lambda\rho) - \eta\,p_t/(1-\beta_1^t)`.
    Tensors of at most one dimension (biases, norm scales) are never projected.

    Defaults: the authors' package ``adamp`` (lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    weight_decay 0, delta 0.1, wd_ratio 0.1, nesterov False), matching the paper. The cosine
    uses ``torch.nn.functional.cosine_similarity`` with ``eps`` as the authors' code does.
    No deviation from the authors' code; the test is computed without host synchronisation.

    State: ``exp_avg``, ``exp_avg_sq``: 8 bytes per fp32 parameter.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-3, "authors' package adamp"),
        "betas": Hyper((0.9, 0.999), Betas(2), "authors' package adamp"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "authors' package adamp"),
        "weight_decay": weight_decay_hyper(0.0, "authors' package adamp"),
        **_PROJECTION_HYPERPARAMS,
        "nesterov": Hyper(False, Flag(), "authors' package adamp"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # decoupled, scaled by wd_ratio on projected tensors

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def update(
        self,
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
        denom = exp_avg_sq.sqrt().div_(math.sqrt(1 - beta2**step)).add_(hp["eps"])
        numerator = exp_avg.lerp(grad, 1 - beta1) if hp["nesterov"] else exp_avg
        direction = _divide_into(numerator, denom)
        step_size = hp["lr"] / (1 - beta1**step)
        _project_and_decay_(param, grad, direction, hp, 1.0, step_size, project_direction=False)


@register(
    paper=ADAMP_PAPER,
    category="layer-wise",
    verified_against=("fp64 reference", "adamp 0.3.0 (authors' package)"),
)
class SGDP(Optimizer):
    r"""SGDP: momentum SGD whose step loses its radial part on scale-invariant weights.

    .. math::
        b_t = \mu b_{t-1} + (1-\tau) g_t,\qquad
        p_t = g_t + \mu b_t\ \text{(Nesterov) or } b_t,

    then the projection of :class:`AdamP` on tensors of two or more dimensions, and
    :math:`w \leftarrow w\,(1 - \eta\lambda\rho/(1-\mu)) - \eta\, p_t` (:math:`\rho` =
    ``wd_ratio`` when projected, else 1; the decay is divided by :math:`1-\mu` as in the
    authors' code).

    Defaults: the authors' package ``adamp`` (momentum 0, dampening 0, nesterov False,
    eps 1e-8, delta 0.1, wd_ratio 0.1, weight_decay 0); its ``lr`` has no default, we take 0.1
    (the authors' README example, with ``momentum=0.9, nesterov=True`` there).

    Deviation from the paper, following the authors' code: without Nesterov the projection is
    applied in place to the momentum buffer itself (the authors' ``d_p`` is the buffer), so the
    buffer carries the projected direction into the next step.

    State: ``momentum`` when ``momentum != 0`` (4 bytes per fp32 parameter), else none.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(0.1, "authors' README example (no default in their code)"),
        "momentum": Hyper(0.0, Interval(0.0, 1.0, high_open=True), "authors' package adamp"),
        "dampening": Hyper(0.0, Interval(0.0, 1.0), "authors' package adamp"),
        "weight_decay": weight_decay_hyper(0.0, "authors' package adamp"),
        "nesterov": Hyper(False, Flag(), "authors' package adamp"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "authors' package adamp"),
        **_PROJECTION_HYPERPARAMS,
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # decoupled, scaled by wd_ratio / (1 - momentum)

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("momentum",) if hp["momentum"] != 0 else ()

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        momentum, lr = hp["momentum"], hp["lr"]
        decay_scale = 1 / (1 - momentum)
        if momentum != 0:
            buf = state["momentum"]
            buf.mul_(momentum).add_(grad, alpha=1 - hp["dampening"])
            if hp["nesterov"]:
                direction = grad.add(buf, alpha=momentum)
                _project_and_decay_(param, grad, direction, hp, decay_scale, lr, False)
            else:  # the authors' code projects the buffer itself
                _project_and_decay_(param, grad, buf, hp, decay_scale, lr, True)
        else:  # the direction is the (dampened) gradient: folded into the step size
            step_size = lr if hp["nesterov"] else lr * (1 - hp["dampening"])
            _project_and_decay_(param, grad, grad, hp, decay_scale, step_size, False)


# ----------------------------------------------------------------------------------------------
# NovoGrad
# ----------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "Stochastic Gradient Methods with Layer-wise Adaptive Moments for Training of Deep "
        "Networks",
        "1905.11286",
        2019,
        "Ginsburg, Castonguay, Hrinchuk, Kuchaiev, Lavrukhin, Leary, Li, Nguyen, Zhang, Cohen",
    ),
    category="layer-wise",
    verified_against=("fp64 reference", "NVIDIA NeMo Novograd (one-off fp32 parity run)"),
)
class NovoGrad(Optimizer):
    r"""NovoGrad: a per-layer scalar second moment, gradient normalised before the momentum.

    For each parameter tensor :math:`w` (a layer), paper Algorithm 1:

    .. math::
        v_1 = \lVert g_1\rVert^2,\qquad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)\lVert g_t\rVert^2,

        m_t = \beta_1 m_{t-1} + c\,\Big(\frac{g_t}{\sqrt{v_t}+\epsilon} + d\,w_{t-1}\Big),\qquad
        w_t = w_{t-1} - \eta\, m_t

    with :math:`c = 1` (paper) or :math:`c = 1-\beta_1` with ``grad_averaging=True`` (NVIDIA's
    option); :math:`m_0 = 0`, so :math:`m_1 = c\,(g_1/\sqrt{v_1} + d\,w_0)` as in the paper.
    ``weight_decay`` :math:`d` is the paper's decoupled decay, added to the normalised gradient
    (so it enters the momentum).

    Defaults: betas (0.95, 0.98) (paper and NVIDIA NeMo's ``Novograd``), lr 1e-3, eps 1e-8,
    weight_decay 0, grad_averaging False (NeMo; the paper's experiments use
    :math:`d \approx 10^{-3}`). Deviation from NeMo: the first step is recognised by the step
    count (paper: :math:`v_1 = \lVert g_1\rVert^2`), not by testing :math:`v = 0` (a
    synchronising comparison that also re-seeds :math:`v` after all-zero gradients). NeMo's
    ``amsgrad`` and ``luc`` options are not offered.

    State: ``exp_avg`` (parameter-shaped, 4 bytes per fp32 parameter) and ``exp_avg_sq``, one
    scalar per tensor.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-3, "NVIDIA NeMo Novograd"),
        "betas": Hyper((0.95, 0.98), Betas(2), "paper, section 4 / NeMo"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "NVIDIA NeMo Novograd"),
        "weight_decay": weight_decay_hyper(0.0, "NVIDIA NeMo Novograd"),
        "grad_averaging": Hyper(False, Flag(), "NVIDIA NeMo Novograd"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # added to the normalised gradient, see update
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        # exp_avg is parameter-shaped; exp_avg_sq is one scalar per tensor (not per element)
        return torch.empty((), dtype=dtype).element_size()

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        if name == "exp_avg_sq":
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
        beta1, beta2 = hp["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad_norm = grad.norm()
        if step == 1:
            exp_avg_sq.copy_(grad_norm * grad_norm)
        else:
            exp_avg_sq.mul_(beta2).addcmul_(grad_norm, grad_norm, value=1 - beta2)
        direction = grad / exp_avg_sq.sqrt().add_(hp["eps"])
        if hp["weight_decay"] != 0:
            direction.add_(param, alpha=hp["weight_decay"])
        if hp["grad_averaging"]:
            direction.mul_(1 - beta1)
        exp_avg.mul_(beta1).add_(direction)
        param.add_(exp_avg, alpha=-hp["lr"])


# ----------------------------------------------------------------------------------------------
# TVLARS
# ----------------------------------------------------------------------------------------------
@register(
    paper=Paper(
        "Revisiting LARS for Large Batch Training Generalization of Neural Networks",
        "2309.14053",
        2023,
        "Do, Nguyen, Nguyen, Tran-Thanh, Tran, Pham",
    ),
    category="layer-wise",
    verified_against=("fp64 reference", "authors' code KhoiDOO/tvlars (one-off parity run)"),
)
class TVLARS(Optimizer):
    r"""TVLARS: LARS whose trust ratio is scaled by a time-varying, sigmoid-like factor
    instead of a learning-rate warm-up.

    For each parameter tensor :math:`w` (a layer), at step :math:`t` (1 on the first step):

    .. math::
        \phi(t) = \frac{1}{\alpha + e^{\lambda (t - d_e)}} + \gamma_{\min},\qquad
        d = g + \beta w,

        r = \eta\,\phi(t)\,\frac{\min(\lVert w\rVert, c)}{\min(\lVert d\rVert, c)},\qquad
        b_t = \mu\, b_{t-1} + r\, d,\qquad w \leftarrow w - \gamma\, b_t

    :math:`\phi` starts near :math:`1/\alpha + \gamma_{\min}` (large ratios: exploration),
    and after the delay :math:`d_e` decays smoothly to :math:`\gamma_{\min}` (LARS with
    trust coefficient :math:`\eta\gamma_{\min}`). :math:`r = 1` where a norm is zero.

    Defaults follow the authors' code (``opt/tvlars.py``): :math:`\eta` = 1e-3,
    :math:`\lambda` (``decay``) = 1e-3, momentum 0.9, weight decay 5e-4, and its
    :math:`\phi(t) = 1/(0.1 + e^{\lambda t})`, i.e. ``alpha = 0.1``, ``delay_steps = 0``,
    ``min_scale = 0`` of the paper's formula (the paper's :math:`\phi` with its delay and floor
    is available through these three options). As in that code (and unlike :class:`LARS`'s
    paper ratio :math:`\lVert g\rVert + \beta\lVert w\rVert`), the ratio divides by the norm
    of the decayed gradient :math:`d`, and both norms are clipped at ``norm_clip``
    :math:`c` = 10. ``weight_decay_filter`` / ``lars_adaptation_filter`` (the authors' names)
    exclude one-dimensional tensors (``p.ndim == 1``: biases, norm scales) from the decay /
    from the ratio (then :math:`r = 1`). ``lr`` has no default in the authors' code; 1.0 as for
    :class:`LARS`.

    Verification status: the paper's values of :math:`d_e, \lambda, \gamma_{\min}, \alpha`
    could not be found (only abstracts, summaries and the paper's opening were reachable);
    :math:`\phi` is the form quoted by a summary of the paper. Re-read for this check: the
    authors' ``opt/tvlars.py`` at its latest revision (2023-11-20) is the rule above with no
    delay and no floor; an earlier revision (2023-08-17) instead kept the plain LARS ratio for
    the first 10 epochs and applied :math:`1/(0.1 + e^{\lambda t})` (global step :math:`t`)
    afterwards; their sweep script (``script/tvlars/script.json``) tries
    :math:`\lambda` from 1e-6 to 5e-2 and ``lr`` from 1 to 35 depending on the batch size.

    State: ``momentum_buffer``: 4 bytes per fp32 parameter.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1.0, "as LARS (the authors' code has no default)"),
        "momentum": Hyper(0.9, Interval(0.0, 1.0, high_open=True), "authors' code"),
        "weight_decay": weight_decay_hyper(5e-4, "authors' code"),
        "trust_coefficient": Hyper(1e-3, POSITIVE, "authors' code (eta)"),
        "decay": Hyper(1e-3, NON_NEGATIVE, "authors' code (lmbda)"),
        "alpha": Hyper(0.1, POSITIVE, "authors' code"),
        "delay_steps": Hyper(0, Interval(0, integer=True), "authors' code (no delay)"),
        "min_scale": Hyper(0.0, NON_NEGATIVE, "authors' code (no floor)"),
        "norm_clip": Hyper(10.0, POSITIVE, "authors' code"),
        "weight_decay_filter": Hyper(False, Flag(), "authors' code"),
        "lars_adaptation_filter": Hyper(False, Flag(), "authors' code"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # coupled, per tensor (weight_decay_filter)
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",)

    @staticmethod
    def phi(step: int, hp: Mapping[str, Any]) -> float:
        """The time-varying factor of the trust ratio at ``step`` (1 on the first step)."""
        exponent = hp["decay"] * (step - hp["delay_steps"])
        return 1.0 / (hp["alpha"] + math.exp(min(exponent, 700.0))) + hp["min_scale"]

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        weight_decay = hp["weight_decay"]
        decays = [
            0.0 if hp["weight_decay_filter"] and d == 1 else weight_decay for d in _dims(param)
        ]
        if all(d == 0 for d in decays):
            direction = grad
        elif isinstance(param, TensorList) and len(set(decays)) > 1:
            direction = grad + param * decays
        else:
            direction = grad.add(param, alpha=decays[0])
        clip = hp["norm_clip"]
        weight_norm = _stacked(param.norm()).clamp_max(clip)
        direction_norm = _stacked(direction.norm()).clamp_max(clip)
        scale = hp["trust_coefficient"] * self.phi(step, hp)
        ratio = _guarded(scale * weight_norm / direction_norm, weight_norm, direction_norm)
        ratio = _keep_excluded(ratio, param, hp["lars_adaptation_filter"])
        buf = state["momentum_buffer"]
        buf.mul_(hp["momentum"]).add_(direction * _unstacked(ratio, param))
        param.add_(buf, alpha=-hp["lr"])
