"""SPAM and Stable-SPAM: Adam with spike-aware clipping, gradient normalisation and momentum
reset, built from the transforms' rules (:mod:`optimkit.transforms.clipping`) and Adam's rule
(:meth:`optimkit.optimizers.adam.Adam.update`).

Papers:
    T. Huang, Z. Zhu, G. Jin, L. Liu, Z. Wang, S. Liu, "SPAM: Spike-Aware Adam with Momentum
    Reset for Stable LLM Training", arXiv:2501.06842; authors' code TianjinYellow/SPAM-Optimizer
    (``galore_torch/SPAM.py``).
    T. Huang, H. Hu, Z. Zhu, G. Jin, L. Liu, Z. Wang, S. Liu, "Stable-SPAM: How to Train in 4-Bit
    More Stably than 16-Bit Adam", arXiv:2502.17055; authors' code TianjinYellow/StableSPAM
    (``galore_torch/stablespam.py``).
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
    Flag,
    Hyper,
    Interval,
    Optimizer,
    TensorLike,
    TensorList,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.optimizers.adam import Adam
from optimkit.registry import register
from optimkit.transforms.clipping import (
    SPAM_PAPER,
    STABLE_SPAM_PAPER,
    ada_clip_many,
    ada_gn_many,
    spike_clip,
    stat_dtype,
)

__all__ = ["SPAM", "StableSPAM"]

COUNT = Interval(0.0, integer=True)


def _tensors(x: TensorLike) -> list[Tensor]:
    return list(x) if isinstance(x, TensorList) else [x]


def _like(template: TensorLike, tensors: list[Tensor]) -> TensorLike:
    return TensorList(tensors) if isinstance(template, TensorList) else tensors[0]


def spam_warmup_scale(step: int, interval: int, warmup: int) -> float:
    r"""SPAM's learning-rate factor after a momentum reset (authors' ``CosineDecay(0.99, N)``):
    with :math:`c` the steps since the last reset (:math:`c = 0` at the reset step),
    :math:`1 - 0.99\,(1 + \cos(\pi c / (N + 1)))/2` while :math:`c < N`, else 1. No warm-up
    before the first reset."""
    if interval == 0 or step < interval:
        return 1.0
    c = step % interval
    if c >= warmup:
        return 1.0
    return 1.0 - 0.99 * (1.0 + math.cos(math.pi * c / (warmup + 1))) / 2.0


@register(
    paper=SPAM_PAPER,
    category="adaptive",
    verified_against=("fp64 reference from the authors' code",),
    battery={"hp": {"reset_interval": 4, "warmup_steps": 2, "clip_delay": 2, "threshold": 2.0}},
)
class SPAM(Optimizer):
    r"""SPAM: Adam with spike-aware clipping and periodic momentum reset with warm-up.

    At step :math:`t` (per parameter), with reset interval :math:`\Delta T`, warm-up :math:`N`,
    threshold :math:`\theta`:

    .. math::
        m, v \leftarrow 0 \quad\text{if } t \bmod \Delta T = 0 \qquad\text{(momentum reset)}

        g_i \leftarrow \operatorname{sign}(g_i)\sqrt{\theta v_i}\ \text{ if } g_i^2 > \theta v_i
        \qquad\text{(spike-aware clipping, with the previous } v)

        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \theta \leftarrow \theta - \eta\, s_t \frac{\sqrt{1-\beta_2^t}}{1-\beta_1^t}
        \frac{m}{\sqrt v + \epsilon},\quad \theta \leftarrow (1 - \eta\lambda)\theta

    where :math:`s_t` is the cosine warm-up after each reset (:func:`spam_warmup_scale`). The
    clipping runs from step ``clip_delay`` on and skips the first ``clip_delay`` steps after
    each reset (authors' ``grad_accu_steps``). The clipping is
    :func:`optimkit.transforms.spike_clip` (also the :class:`~optimkit.transforms.SpikeClip`
    transform) and the moment update Adam's rule (:meth:`Adam.update`, with
    :math:`\epsilon/\sqrt{1-\beta_2^t}` so that :math:`\epsilon` is added to :math:`\sqrt v` as
    in the authors' code).

    Defaults are the authors' code's: lr 1e-3, betas (0.9, 0.999), eps 1e-6, threshold 5000,
    reset_interval 500, warmup_steps 150, clip_delay 20. We follow the authors' code where it
    differs from the paper: bias correction is not restarted by a reset; the decoupled weight
    decay :math:`(1-\eta\lambda)` comes after the update and is not warmed up. Deviations from
    the code: the step clock is per parameter (the authors count optimizer steps; equal when
    every parameter has a gradient at every step); ``reset_interval=0`` / ``threshold=0``
    disable the reset / the clipping; ``p.grad`` is not modified (the authors clip it in place).
    Sparse momentum (``density < 1``, the authors' ``density`` option, matrices only): the
    moments live on a random subset of the coordinates (a boolean ``mask``; the first mask has
    exactly ``int(density * numel)`` coordinates, each later one, drawn at every momentum reset,
    keeps each coordinate with probability ``density``, as the authors' ``update_mask_random``;
    the moments restart at zero there, as the reset that follows the authors' redraw makes
    them); the update is scattered back to the masked coordinates. As in the authors' code,
    weight decay has no effect in that mode (their decay acts on a copy). The masks come from
    generators seeded by ``seed``, the parameter's mask id and the step, so they are
    reproducible and a resumed run draws the same ones (the authors use the global RNG).

    State: ``exp_avg``, ``exp_avg_sq``: 8 bytes per fp32 parameter; with ``density < 1``,
    ``mask`` (1 byte per parameter), the moments on the masked coordinates
    (:math:`8 \cdot` density bytes per fp32 parameter on average) and a 0-d ``mask_id``.
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-3, "SPAM authors' code"),
        "betas": Hyper((0.9, 0.999), Betas(2), "SPAM authors' code"),
        "eps": Hyper(1e-6, NON_NEGATIVE, "SPAM authors' code"),
        "weight_decay": weight_decay_hyper(0.0, "SPAM authors' code"),
        "threshold": Hyper(5000.0, NON_NEGATIVE, "SPAM paper and code (theta)"),
        "reset_interval": Hyper(500, COUNT, "SPAM paper and code (DeltaT)"),
        "warmup_steps": Hyper(150, COUNT, "SPAM paper and code (N)"),
        "clip_delay": Hyper(20, COUNT, "SPAM authors' code (grad_accu_steps)"),
        "density": Hyper(
            1.0, Interval(0.0, 1.0, low_open=True), "SPAM authors' code (1: dense momentum)"
        ),
        "seed": Hyper(0, COUNT, "ours: seeds the random masks of density < 1"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = None  # applied after the update, as in the authors' code
    impls = ("reference", "foreach", "fused")  # fused: dense momentum (density 1)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._masks_made = 0  # numbers each sparse parameter's mask stream (saved in its state)
        super().__init__(*args, **kwargs)

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        if hp["density"] < 1:
            return ("mask_id", "mask", "exp_avg", "exp_avg_sq")
        return ("exp_avg", "exp_avg_sq")

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        full = cls.with_defaults(hp)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if full["density"] < 1:  # a bool mask, and the moments on a density fraction
            return 1 + 2 * itemsize * full["density"]
        return 2 * itemsize

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["density"] < 1 and any(p.dim() != 2 or p.is_complex() for p in group["params"]):
            raise ValueError(
                "SPAM: density < 1 (sparse momentum) applies to real matrices only, as in the "
                "authors' code; put other parameters in a param group with density=1"
            )

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        if hp["density"] >= 1:
            return super().init_buffer(name, param, hp)
        count = int(hp["density"] * param.numel())  # the first mask has exactly this many
        if name == "mask_id":
            self._masks_made += 1
            return torch.tensor(self._masks_made - 1)
        if name == "mask":
            generator = _mask_generator(hp["seed"], self._masks_made - 1, 0, param.device)
            chosen = torch.randperm(param.numel(), generator=generator, device=param.device)
            mask = torch.zeros(param.numel(), dtype=torch.bool, device=param.device)
            mask[chosen[:count]] = True
            return mask.view(param.shape)
        return torch.zeros(count, dtype=param.dtype, device=param.device)

    def state_dtype(self, key: str, param: Tensor) -> torch.dtype | None:
        """The sparse-momentum mask and its id keep their dtypes through checkpoints."""
        own = {"mask": torch.bool, "mask_id": torch.int64}.get(key)
        return own if own is not None else super().state_dtype(key, param)

    def _upgrade_state(self, state: dict[str, Any]) -> None:
        super()._upgrade_state(state)
        if "mask_id" in state:
            self._masks_made = max(self._masks_made, int(state["mask_id"]) + 1)

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        if hp["density"] < 1:
            for one in zip(_tensors(param), _tensors(grad), *map(_tensors, state.values())):
                self._sparse_update(one[0], one[1], dict(zip(state, one[2:])), step, hp)
            return
        interval, delay, threshold = hp["reset_interval"], hp["clip_delay"], hp["threshold"]
        if interval and step % interval == 0:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
        since_reset = step % interval if interval else step
        if threshold != 0 and step >= delay and since_reset >= delay:
            clipped = [
                spike_clip(g, v, threshold)
                for g, v in zip(_tensors(grad), _tensors(state["exp_avg_sq"]))
            ]
            grad = _like(grad, clipped)
        beta2 = hp["betas"][1]
        adam_hp = {
            **hp,
            "lr": hp["lr"] * spam_warmup_scale(step, interval, hp["warmup_steps"]),
            "eps": hp["eps"] / math.sqrt(1 - beta2**step),
            "amsgrad": False,
        }
        Adam.update(self, param, grad, state, step, adam_hp)
        if hp["weight_decay"] != 0:
            param.mul_(1 - hp["lr"] * hp["weight_decay"])

    def _sparse_update(
        self, param: Tensor, grad: Tensor, state: dict[str, Tensor], step: int, hp: Mapping
    ) -> None:
        """density < 1: the moments live on the coordinates of a random mask, redrawn at every
        momentum reset (authors' ``update_mask_random``: each coordinate kept with probability
        ``density``); the update is scattered back to those coordinates."""
        interval, delay, threshold = hp["reset_interval"], hp["clip_delay"], hp["threshold"]
        mask, exp_avg, exp_avg_sq = state["mask"], state["exp_avg"], state["exp_avg_sq"]
        if interval and step % interval == 0:
            generator = _mask_generator(hp["seed"], int(state["mask_id"]), step, param.device)
            drawn = torch.rand(param.shape, generator=generator, device=param.device)
            mask.copy_(drawn < hp["density"])
            count = int(mask.sum())
            exp_avg.resize_(count).zero_()
            exp_avg_sq.resize_(count).zero_()
        masked_grad = grad[mask]
        since_reset = step % interval if interval else step
        if threshold != 0 and step >= delay and since_reset >= delay:
            masked_grad = spike_clip(masked_grad, exp_avg_sq, threshold)
        beta2 = hp["betas"][1]
        adam_hp = {
            **hp,
            "lr": hp["lr"] * spam_warmup_scale(step, interval, hp["warmup_steps"]),
            "eps": hp["eps"] / math.sqrt(1 - beta2**step),
            "amsgrad": False,
        }
        delta = torch.zeros_like(masked_grad)
        Adam.update(self, delta, masked_grad, state, step, adam_hp)
        param.index_put_((mask,), delta, accumulate=True)
        # The authors' weight decay for density < 1 acts on a copy (p.data[mask].add_), so it
        # has no effect; we follow the code and apply none here.


def _mask_generator(seed: int, mask_id: int, step: int, device: torch.device) -> torch.Generator:
    """A generator for one parameter's mask at one step, from (seed, mask id, step) alone, so a
    run resumed from a checkpoint draws the same masks as one that never stopped."""
    return torch.Generator(device=device).manual_seed(
        (int(seed) * 1_000_003 + mask_id * 10_007 + step) % (2**63)
    )


def stable_spam_schedule(hp: Mapping[str, Any], step: int) -> tuple[int, int, float]:
    """Stable-SPAM's clocks and cosine factor at engine step ``step``: (AdaClip/AdaGN clock,
    Adam's step, the factor of gamma1 and beta1; 1 without ``total_steps``)."""
    clock, adam_step = _stable_spam_steps(step, hp["reset_interval"])
    scale = 1.0
    total = hp["total_steps"]
    if total > 0:
        eta_min = hp["eta_min"]
        scale = eta_min + (1 - eta_min) * (1 + math.cos(math.pi * step / (total + 1))) / 2
    return clock, adam_step, scale


def _stable_spam_steps(step: int, interval: int) -> tuple[int, int]:
    """(clock of AdaClip/AdaGN, clock of Adam's bias correction) at engine step ``step``,
    reproducing the authors' per-parameter counter, which a reset sets back to 1 after
    AdaClip/AdaGN have used it and before Adam does."""
    if interval == 0:
        return step, step
    clock = step if step <= interval else (step - 1) % interval + 2
    return clock, (1 if step % interval == 0 else clock)


@register(
    paper=STABLE_SPAM_PAPER,
    category="adaptive",
    verified_against=("fp64 reference from the authors' code",),
    battery={
        "hp": {"reset_interval": 4},
        "skip": {
            "low_precision": "float16: AdaGN scales each tensor's gradient to norm ~1, so "
            "(1-beta2)*g^2 underflows float16 and eps=1e-8 is 0 there: Adam's denominator is 0 "
            "(as in the authors' code); bfloat16 is tested in tests/optimizers/test_spam.py"
        },
    },
)
class StableSPAM(Optimizer):
    r"""Stable-SPAM: Adam with AdaClip, AdaGN and momentum reset.

    Per tensor, at clock :math:`k` (see below):

    .. math::
        \text{AdaClip: } m^{max} \leftarrow \theta m^{max} + (1-\theta)\max|g|,\ \
        g_i \leftarrow g_i\frac{\hat m^{max}}{\max|g|}\ \text{where}\ |g_i| > \hat m^{max}
        = \frac{m^{max}}{1-\theta^k}

        \text{AdaGN: } a \leftarrow \gamma_1 a + (1-\gamma_1)\lVert g\rVert,\ \
        b \leftarrow \gamma_2 b + (1-\gamma_2)\lVert g\rVert^2,\ \
        g \leftarrow \frac{g}{\lVert g\rVert}
        \frac{a/(1-\gamma_1^k)}{\sqrt{b/(1-\gamma_2^k)}+\epsilon}

    then Adam's rule (:meth:`Adam.update`, decoupled weight decay before it). Every
    ``reset_interval`` steps :math:`m, v` are reset. With ``total_steps`` :math:`T > 0`,
    :math:`\beta_1` and :math:`\gamma_1` are scaled by :math:`s_t = 0.5 + 0.25(1 + \cos(\pi t /
    (T+1)))` (authors' ``CosineDecay(1.0, T, eta_min=0.5)``); ``total_steps=0`` (default, the
    authors' ``total_T=None``) keeps :math:`s_t = 1`.

    The pieces are :func:`optimkit.transforms.ada_clip` and :func:`optimkit.transforms.ada_gn`
    (also the :class:`~optimkit.transforms.AdaClip` / :class:`~optimkit.transforms.AdaGN`
    transforms). Defaults are the authors' code's: lr 1e-3, betas (0.9, 0.999), eps 1e-8,
    gamma1 0.7, gamma2 0.9, theta 0.999 (``gamma3``), reset_interval 1000
    (``update_proj_gap``).

    We follow the authors' code, which differs from a literal reading of the paper at a reset
    step :math:`t = j\Delta T`: their counter :math:`k` is set back to 1 *after* AdaClip/AdaGN
    used it, that step's Adam update still uses the old :math:`m, v` with the bias correction
    of step 1, and the zeroed moments start at the next step (clock 2); AdaClip/AdaGN
    statistics are never reset. Deviations from the code: the clock is per parameter
    (the authors count optimizer steps; equal when every parameter has a gradient at every
    step); ``p.grad`` is not modified.

    State: ``exp_avg``, ``exp_avg_sq`` (8 bytes per fp32 parameter, 12 with ``amsgrad``) and
    three scalars per tensor (``m_max``, ``m_norm``, ``v_norm``, kept in float32 at least: the
    authors keep them in the gradient's dtype, where a squared norm overflows float16).
    """

    tensorwise = True

    hyperparams = {
        "lr": lr_hyper(1e-3, "Stable-SPAM authors' code"),
        "betas": Hyper((0.9, 0.999), Betas(2), "Stable-SPAM authors' code"),
        "eps": Hyper(1e-8, NON_NEGATIVE, "Stable-SPAM authors' code"),
        "weight_decay": weight_decay_hyper(0.0, "Stable-SPAM authors' code"),
        "amsgrad": Hyper(False, Flag(), "Stable-SPAM authors' code"),
        "gamma1": Hyper(0.7, Interval(0.0, 1.0, high_open=True), "Stable-SPAM authors' code"),
        "gamma2": Hyper(0.9, Interval(0.0, 1.0, high_open=True), "Stable-SPAM authors' code"),
        "theta": Hyper(0.999, Interval(0.0, 1.0, high_open=True), "authors' code (gamma3)"),
        "reset_interval": Hyper(1000, COUNT, "authors' code (update_proj_gap)"),
        "total_steps": Hyper(0, COUNT, "authors' code (total_T=None)"),
        "eta_min": Hyper(0.5, Interval(0.0, 1.0), "authors' code"),
        "maximize": MAXIMIZE,
    }
    weight_decay_mode = "decoupled"
    impls = ("reference", "foreach", "fused")

    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        names = ("exp_avg", "exp_avg_sq", "m_max", "m_norm", "v_norm")
        return names + ("max_exp_avg_sq",) if hp["amsgrad"] else names

    _SCALARS = ("m_max", "m_norm", "v_norm")

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        if name in self._SCALARS:
            real = torch.view_as_real(param) if param.is_complex() else param
            return torch.zeros((), dtype=stat_dtype(real.dtype), device=param.device)
        return super().init_buffer(name, param, hp)

    def state_dtype(self, key: str, param: Tensor) -> torch.dtype | None:
        """The per-tensor statistics keep their own precision through checkpoints."""
        if key in self._SCALARS:
            return stat_dtype(param.real.dtype)
        return super().state_dtype(key, param)

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        full = cls.with_defaults(hp)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return (3 if full["amsgrad"] else 2) * itemsize

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        interval = hp["reset_interval"]
        clock, adam_step, scale = stable_spam_schedule(hp, step)
        gamma1 = hp["gamma1"] * scale
        m_max, m_norm, v_norm = (_tensors(state[k]) for k in self._SCALARS)
        clipped = ada_clip_many(_tensors(grad), m_max, clock, hp["theta"])
        gamma2, eps = hp["gamma2"], hp["eps"]
        new = ada_gn_many(clipped, m_norm, v_norm, clock, gamma1, gamma2, eps, inplace=True)
        grad = _like(grad, new)
        beta1, beta2 = hp["betas"]
        adam_hp = {**hp, "betas": (beta1 * scale, beta2)}
        Adam.update(self, param, grad, state, adam_step, adam_hp)
        if interval and step % interval == 0:
            state["exp_avg"].zero_()
            state["exp_avg_sq"].zero_()
