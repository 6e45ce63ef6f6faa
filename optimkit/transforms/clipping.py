"""Clipping and normalising transforms: global-norm, component-wise, coordinate-wise, AutoClip,
spike-aware (SPAM), AdaClip and AdaGN (Stable-SPAM).

Each rule is also a plain function on one tensor (``spike_clip``, ``ada_clip``, ``ada_gn``) so
the optimizers that bundle it (:class:`optimkit.SPAM`, :class:`optimkit.StableSPAM`) run the
same code as the stand-alone transform.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import Choice, Flag, Interval
from optimkit.registry import Paper
from optimkit.transforms.base import GradientTransform

__all__ = [
    "GlobalNormClip",
    "ComponentNormClip",
    "CoordinateClip",
    "AutoClip",
    "SpikeClip",
    "AdaClip",
    "AdaGN",
    "global_norm",
    "spike_clip",
    "ada_clip",
    "ada_gn",
    "stat_dtype",
]

POSITIVE = Interval(0.0, low_open=True)


def _group(tensors: Sequence[Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def global_norm(grads: Sequence[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of all gradients taken together, computed as ``torch.nn.utils.clip_grad_norm_``
    does (per-tensor norms by device and dtype, then the norm of those norms)."""
    norms: list[Tensor] = []
    for index in _group(grads).values():
        norms.extend(torch._foreach_norm([grads[i] for i in index], norm_type))
    device = grads[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)


def _scale_by_norm(grads: Sequence[Tensor], max_norm: Tensor | float, norm: Tensor) -> list:
    """``g * min(1, max_norm / (norm + 1e-6))``, torch's clipping coefficient."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    out: list[Tensor] = [torch.empty(0)] * len(grads)
    for (device, dtype), index in _group(grads).items():
        scaled = torch._foreach_mul([grads[i] for i in index], coef.to(device))
        for i, g in zip(index, scaled):
            out[i] = g.to(dtype)  # as an in-place multiply: compute promoted, store in dtype
    return out


class GlobalNormClip(GradientTransform):
    r"""Clip the global gradient norm (``torch.nn.utils.clip_grad_norm_``, composable).

    .. math:: \tilde g_i = g_i\,\min\Big(1, \frac{c}{\lVert (g_1,\dots,g_n)\rVert_p + 10^{-6}}\Big)

    Equal, bit for bit, to ``clip_grad_norm_(params, max_norm, norm_type)`` over the same
    tensors. The norm of the last call is in ``last_norm`` (a tensor; no host sync). No state.
    """

    def __init__(self, max_norm: float, norm_type: float = 2.0) -> None:
        super().__init__()
        POSITIVE.check(self.name, "max_norm", max_norm)
        POSITIVE.check(self.name, "norm_type", norm_type)
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)
        self.last_norm: Tensor | None = None

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def transform(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        norm = global_norm(grads, self.norm_type)
        self.last_norm = norm
        return _scale_by_norm(grads, self.max_norm, norm)


class ComponentNormClip(GradientTransform):
    r"""Component-wise gradient-norm clipping (Yang, Ma et al., "Improving Stability of
    Fine-Tuning Pretrained Language Models via Component-Wise Gradient Norm Clipping").

    Each component :math:`C` (by default each parameter tensor; or the lists of parameters given
    as ``components``, e.g. one per module) is clipped on its own:

    .. math:: \tilde g_C = g_C\,\min\big(1, c / (\lVert g_C\rVert_p + 10^{-6})\big)

    i.e. ``clip_grad_norm_`` applied to each component separately. No state.
    """

    paper = Paper(
        "Improving Stability of Fine-Tuning Pretrained Language Models via Component-Wise "
        "Gradient Norm Clipping",
        "2210.10325",
        2022,
        "Yang, Ma",
    )

    def __init__(
        self,
        max_norm: float,
        norm_type: float = 2.0,
        components: Sequence[Sequence[Tensor]] | None = None,
    ) -> None:
        super().__init__()
        POSITIVE.check(self.name, "max_norm", max_norm)
        POSITIVE.check(self.name, "norm_type", norm_type)
        self.max_norm = float(max_norm)
        self.norm_type = float(norm_type)
        self._component: dict[int, int] = {}
        for c, members in enumerate(components or ()):
            for p in members:
                if id(p) in self._component:
                    raise ValueError(f"{self.name}: a parameter is in two components")
                self._component[id(p)] = c

    def config(self) -> dict[str, Any]:
        return {"max_norm": self.max_norm, "norm_type": self.norm_type}

    def transform(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        parts: dict[Any, list[int]] = {}
        for i, p in enumerate(params):
            key = self._component.get(id(p), ("own", i))
            parts.setdefault(key, []).append(i)
        out: list[Tensor] = list(grads)
        for index in parts.values():
            sub = [grads[i] for i in index]
            for i, g in zip(
                index, _scale_by_norm(sub, self.max_norm, global_norm(sub, self.norm_type))
            ):
                out[i] = g
        return out


class CoordinateClip(GradientTransform):
    r"""Coordinate-wise clipping with an adaptive threshold (Pan, Li, "Toward Understanding Why
    Adam Converges Faster Than SGD for Transformers").

    Per tensor, the threshold :math:`\tau` is the magnitude at the top-``fraction`` of the
    coordinates (the :math:`k`-th smallest :math:`|g_j|`, :math:`k=\lceil(1-q)\,n\rceil`), and

    .. math:: \tilde g_j = \operatorname{clamp}(g_j, -\tau, \tau)

    so about a fraction :math:`q` of the coordinates is clipped. Written from the paper's
    description (no authors' code found); the threshold is per tensor. No state.
    """

    paper = Paper(
        "Toward Understanding Why Adam Converges Faster Than SGD for Transformers",
        "2306.00204",
        2023,
        "Pan, Li",
    )

    def __init__(self, fraction: float = 0.01) -> None:
        super().__init__()
        Interval(0.0, 1.0, low_open=True, high_open=True).check(self.name, "fraction", fraction)
        self.fraction = float(fraction)

    def config(self) -> dict[str, Any]:
        return {"fraction": self.fraction}

    def transform(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        out = []
        for g in grads:
            n = g.numel()
            k = max(1, math.ceil((1.0 - self.fraction) * n))
            tau = g.detach().abs().flatten().kthvalue(k).values
            out.append(torch.clamp(g, -tau, tau))
        return out


class AutoClip(GradientTransform):
    r"""AutoClip: clip to a percentile of the gradient-norm history (Seetharaman et al.).

    .. math:: \eta_c(t) = \text{percentile}_p\big(\lVert g_1\rVert, \dots, \lVert g_t\rVert\big),
              \qquad \tilde g_t = g_t \min\big(1, \eta_c(t)/(\lVert g_t\rVert + 10^{-6})\big)

    Defaults (``percentile=10``, the whole history, the global norm, the current norm included)
    are the paper's and its reference code's. ``history`` keeps only the last norms;
    ``scope="per_param"`` keeps one history per tensor; ``include_current=False`` takes the
    percentile of the previous norms only (no clipping on the first step), as the PyPI package
    ``autoclip`` (``QuantileClip``) does: ``AutoClip(90, history=1000, scope="per_param",
    include_current=False)`` equals ``QuantileClip(quantile=0.9)``. The percentile interpolates
    linearly (``numpy.percentile``'s default). State: the history of norms (no
    parameter-shaped state).
    """

    paper = Paper(
        "AutoClip: Adaptive Gradient Clipping for Source Separation Networks",
        "2007.14469",
        2020,
        "Seetharaman, Wichern, Pardo, Le Roux",
    )

    def __init__(
        self,
        percentile: float = 10.0,
        history: int | None = None,
        scope: str = "global",
        include_current: bool = True,
    ) -> None:
        super().__init__()
        Interval(0.0, 100.0, low_open=True).check(self.name, "percentile", percentile)
        if history is not None:
            Interval(1.0, integer=True).check(self.name, "history", history)
        Choice(("global", "per_param")).check(self.name, "scope", scope)
        Flag().check(self.name, "include_current", include_current)
        self.percentile = float(percentile)
        self.history = None if history is None else int(history)
        self.scope = scope
        self.include_current = include_current

    def config(self) -> dict[str, Any]:
        return {
            "percentile": self.percentile,
            "history": self.history,
            "scope": self.scope,
            "include_current": self.include_current,
        }

    def _threshold(self, store: dict[str, Any], norm: Tensor) -> Tensor:
        dtype = torch.promote_types(norm.dtype, torch.float32)
        past = store.get("history")
        if past is None:
            past = torch.zeros(0, dtype=dtype, device=norm.device)
        current = norm.detach().reshape(1).to(dtype)
        full = torch.cat([past, current])
        if self.history is not None:
            full = full[-self.history :]
        q = self.percentile / 100.0
        if self.include_current:
            threshold = torch.quantile(full, q)
        elif past.numel() == 0:
            threshold = torch.tensor(math.inf, dtype=dtype, device=norm.device)
        else:
            threshold = torch.quantile(past, q)
        store["history"] = full
        return threshold

    def transform(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        if self.scope == "global":
            norm = global_norm(grads)
            return _scale_by_norm(grads, self._threshold(self.shared, norm), norm)
        out = []
        for p, g in zip(params, grads):
            norm = global_norm([g])
            out.extend(_scale_by_norm([g], self._threshold(self.param_state(p), norm), norm))
        return out


# ---------------------------------------------------------------------------------------------
# SPAM and Stable-SPAM pieces
# ---------------------------------------------------------------------------------------------
def spike_clip(grad: Tensor, exp_avg_sq: Tensor, threshold: float) -> Tensor:
    r"""SPAM's spike-aware clipping of one tensor (out of place):
    :math:`\tilde g_i = \operatorname{sign}(g_i)\sqrt{\theta v_i}` where :math:`g_i^2 > \theta
    v_i`, else :math:`g_i`."""
    mask = grad * grad > threshold * exp_avg_sq
    return torch.where(mask, grad.sign() * torch.sqrt(exp_avg_sq * threshold), grad)


def ada_clip(grad: Tensor, m_max: Tensor, step: int, theta: float) -> Tensor:
    r"""Stable-SPAM's AdaClip on one tensor; updates the 0-d ``m_max`` in place.

    .. math:: m_t = \theta m_{t-1} + (1-\theta)\max_i|g_i|,\quad \hat m_t = m_t/(1-\theta^t),
              \quad \tilde g_i = g_i\,\hat m_t / \max_j|g_j| \ \text{where}\ |g_i| > \hat m_t
    """
    return ada_clip_many([grad], [m_max], step, theta)[0]


def ada_clip_many(
    grads: Sequence[Tensor], m_max: Sequence[Tensor], step: int, theta: float
) -> list[Tensor]:
    """:func:`ada_clip` of each tensor (new tensors; ``m_max``: their 0-d statistics, one
    dtype), with multi-tensor kernels: the per-tensor scalars are combined as one vector."""
    magnitude = torch._foreach_abs(grads)
    gmax = torch.stack(torch._foreach_max(magnitude)).to(m_max[0].dtype)
    m_hat = ada_clip_thresholds(gmax, m_max, step, theta).unbind()
    clipped = torch._foreach_div(grads, gmax.unbind())
    torch._foreach_mul_(clipped, m_hat)
    for g, mag, c, threshold in zip(grads, magnitude, clipped, m_hat):
        torch.where(mag > threshold, c, g, out=c)
    return _cast(clipped, grads)


def ada_clip_thresholds(gmax: Tensor, m_max: Sequence[Tensor], step: int, theta: float) -> Tensor:
    r"""AdaClip's per-tensor part: from each tensor's ``max |g|`` (a vector), update the 0-d
    statistics ``m_max`` in place and return the thresholds :math:`\hat m_t` (a vector)."""
    new_max = torch.stack(list(m_max)).mul_(theta).add_(gmax * (1 - theta))
    torch._foreach_copy_(list(m_max), new_max.unbind())
    return new_max / (1 - theta**step)


def ada_gn_scales(
    norm: Tensor,
    m_norm: Sequence[Tensor],
    v_norm: Sequence[Tensor],
    step: int,
    gamma1: float,
    gamma2: float,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """AdaGN's per-tensor part: from each tensor's gradient norm (a vector), update the 0-d
    statistics in place and return ``(divisor, scale)`` (vectors): the gradient becomes
    ``g / divisor * scale`` (``g`` itself for a tensor of norm 0)."""
    m_norm, v_norm = list(m_norm), list(v_norm)
    new_m = torch.stack(m_norm).mul_(gamma1).add_(norm * (1 - gamma1))
    new_v = torch.stack(v_norm).mul_(gamma2).add_(norm * norm * (1 - gamma2))
    torch._foreach_copy_(m_norm + v_norm, new_m.unbind() + new_v.unbind())
    m_hat = new_m / (1 - gamma1**step)
    v_hat = new_v / (1 - gamma2**step)
    scale = m_hat / (torch.sqrt(v_hat) + eps)
    positive = norm > 0  # else g / 1 * 1 = g
    one = torch.ones_like(norm)
    return torch.where(positive, norm, one), torch.where(positive, scale, one)


def _cast(tensors: list[Tensor], like: Sequence[Tensor]) -> list[Tensor]:
    """Back to the gradients' dtypes (a 0-d low-precision gradient divided by a 0-d float32
    statistic is promoted)."""
    return [t.to(g.dtype) for t, g in zip(tensors, like)]


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of AdaClip/AdaGN's scalar statistics: the gradient's, at least float32 (a
    squared norm overflows float16)."""
    return torch.promote_types(dtype, torch.float32)


def ada_gn(
    grad: Tensor,
    m_norm: Tensor,
    v_norm: Tensor,
    step: int,
    gamma1: float,
    gamma2: float,
    eps: float,
) -> Tensor:
    r"""Stable-SPAM's AdaGN on one tensor; updates the 0-d ``m_norm``, ``v_norm`` in place.

    .. math:: a_t = \gamma_1 a_{t-1} + (1-\gamma_1)\lVert g\rVert,\quad
              b_t = \gamma_2 b_{t-1} + (1-\gamma_2)\lVert g\rVert^2,\quad
              \tilde g = \frac{g}{\lVert g\rVert}\,
              \frac{a_t/(1-\gamma_1^t)}{\sqrt{b_t/(1-\gamma_2^t)} + \epsilon}
    """
    return ada_gn_many([grad], [m_norm], [v_norm], step, gamma1, gamma2, eps)[0]


def ada_gn_many(
    grads: Sequence[Tensor],
    m_norm: Sequence[Tensor],
    v_norm: Sequence[Tensor],
    step: int,
    gamma1: float,
    gamma2: float,
    eps: float,
    inplace: bool = False,
) -> list[Tensor]:
    """:func:`ada_gn` of each tensor, with multi-tensor kernels: the per-tensor scalars are
    combined as one vector. A tensor of norm 0 (all zeros) is left as it is. New tensors, or
    with ``inplace`` ``grads`` themselves rescaled, where that rounds alike (not for 0-d
    low-precision tensors, whose quotient by a float32 statistic is promoted)."""
    norm = torch.stack(torch._foreach_norm(grads, 2, dtype=m_norm[0].dtype))
    divisor, scale = ada_gn_scales(norm, m_norm, v_norm, step, gamma1, gamma2, eps)
    if inplace and all(g.dim() > 0 or g.dtype == norm.dtype for g in grads):
        out = list(grads)
        torch._foreach_div_(out, divisor.unbind())
    else:
        out = torch._foreach_div(grads, divisor.unbind())
    torch._foreach_mul_(out, scale.unbind())
    return _cast(out, grads)


SPAM_PAPER = Paper(
    "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM Training",
    "2501.06842",
    2025,
    "Huang, Zhu, Jin, Liu, Wang, Liu",
)
STABLE_SPAM_PAPER = Paper(
    "Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit Adam",
    "2502.17055",
    2025,
    "Huang, Hu, Zhu, Jin, Liu, Wang, Liu",
)


class SpikeClip(GradientTransform):
    r"""SPAM's spike-aware clipping as a stand-alone transform.

    With its own second-moment estimate :math:`v` (rate :math:`\beta_2`, updated with the clipped
    gradient, as Adam's :math:`v` is inside SPAM):

    .. math:: \tilde g_i = \operatorname{sign}(g_i)\sqrt{\theta v_{t-1,i}}\ \text{if}\
              g_i^2 > \theta v_{t-1,i}\ \text{else}\ g_i,\qquad
              v_t = \beta_2 v_{t-1} + (1-\beta_2)\tilde g^2

    Clipping starts at step ``delay`` (the authors' ``grad_accu_steps``, 20), when :math:`v` has
    gathered enough history. Defaults (threshold 5000, delay 20) are the authors' code's.
    Inside :class:`optimkit.SPAM`, Adam's own :math:`v` is used instead. State: :math:`v`
    (one parameter-sized buffer).
    """

    paper = SPAM_PAPER
    buffers_per_param = 1

    def __init__(self, threshold: float = 5000.0, beta2: float = 0.999, delay: int = 20) -> None:
        super().__init__()
        POSITIVE.check(self.name, "threshold", threshold)
        Interval(0.0, 1.0, high_open=True).check(self.name, "beta2", beta2)
        Interval(0.0, integer=True).check(self.name, "delay", delay)
        self.threshold, self.beta2, self.delay = float(threshold), float(beta2), int(delay)

    def config(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "beta2": self.beta2, "delay": self.delay}

    def transform(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        out = []
        for p, g in zip(params, grads):
            state = self.param_state(p)
            if "exp_avg_sq" not in state:
                state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] = 0
            state["step"] += 1
            v = state["exp_avg_sq"]
            new = spike_clip(g, v, self.threshold) if state["step"] >= self.delay else g
            v.mul_(self.beta2).addcmul_(new, new, value=1 - self.beta2)
            out.append(new)
        return out


class AdaClip(GradientTransform):
    r"""Stable-SPAM's AdaClip: clip entries above a bias-corrected EMA of each tensor's
    maximum magnitude (see :func:`ada_clip`). Default ``theta=0.999`` (authors' code, where it
    is named ``gamma3``). State: two scalars per tensor."""

    paper = STABLE_SPAM_PAPER

    def __init__(self, theta: float = 0.999) -> None:
        super().__init__()
        Interval(0.0, 1.0, high_open=True).check(self.name, "theta", theta)
        self.theta = float(theta)

    def config(self) -> dict[str, Any]:
        return {"theta": self.theta}

    def transform(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        out = []
        for p, g in zip(params, grads):
            state = self.param_state(p)
            if "m_max" not in state:
                state["m_max"] = torch.zeros((), dtype=stat_dtype(g.dtype), device=g.device)
                state["step"] = 0
            state["step"] += 1
            out.append(ada_clip(g, state["m_max"], state["step"], self.theta))
        return out


class AdaGN(GradientTransform):
    r"""Stable-SPAM's AdaGN: rescale each tensor to a bias-corrected EMA of its norm divided by
    the root of an EMA of its squared norm (see :func:`ada_gn`). Defaults ``gamma1=0.7``,
    ``gamma2=0.9``, ``eps=1e-8`` (authors' code). State: three scalars per tensor."""

    paper = STABLE_SPAM_PAPER

    def __init__(self, gamma1: float = 0.7, gamma2: float = 0.9, eps: float = 1e-8) -> None:
        super().__init__()
        unit = Interval(0.0, 1.0, high_open=True)
        unit.check(self.name, "gamma1", gamma1)
        unit.check(self.name, "gamma2", gamma2)
        Interval(0.0).check(self.name, "eps", eps)
        self.gamma1, self.gamma2, self.eps = float(gamma1), float(gamma2), float(eps)

    def config(self) -> dict[str, Any]:
        return {"gamma1": self.gamma1, "gamma2": self.gamma2, "eps": self.eps}

    def transform(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        out = []
        for p, g in zip(params, grads):
            state = self.param_state(p)
            if "m_norm" not in state:
                state["m_norm"] = torch.zeros((), dtype=stat_dtype(g.dtype), device=g.device)
                state["v_norm"] = torch.zeros((), dtype=stat_dtype(g.dtype), device=g.device)
                state["step"] = 0
            state["step"] += 1
            out.append(
                ada_gn(
                    g,
                    state["m_norm"],
                    state["v_norm"],
                    state["step"],
                    self.gamma1,
                    self.gamma2,
                    self.eps,
                )
            )
        return out
