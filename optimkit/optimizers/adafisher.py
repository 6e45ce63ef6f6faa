r"""AdaFisher and AdaFisherW: a diagonal block-Kronecker Fisher in an Adam-like step.

Paper: D. M. Gomes, Y. Zhang, E. Belilovsky, G. Wolf, M. S. Hosseini, "AdaFisher: Adaptive
Second Order Optimization via Fisher Information", arXiv:2405.16397 (ICLR 2025).
Authors' code: github.com/AtlasAnalyticsLab/AdaFisher ``optimizers/AdaFisher.py`` (HEAD eb858c6),
which we follow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.curvature import CurvatureOptimizer, Layer, statistics_dtype
from optimkit.engine import (
    COEFFICIENT,
    MAXIMIZE,
    POSITIVE,
    Hyper,
    Interval,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.registry import Paper, register

__all__ = ["AdaFisher", "AdaFisherW", "adafisher_batch_diagonals", "min_max_normalize"]

PAPER = Paper(
    "AdaFisher: Adaptive Second Order Optimization via Fisher Information",
    "2405.16397",
    2024,
    "Gomes, Zhang, Belilovsky, Wolf, Hosseini",
)


def min_max_normalize(x: Tensor, epsilon: float = 1e-6) -> Tensor:
    r"""The authors' ``MinMaxNormalization``: :math:`+\infty \to 1`, :math:`-\infty \to 0`,
    then :math:`(x - \min x) / (\max x - \min x + \epsilon)`."""
    x = torch.where(x == float("inf"), torch.ones_like(x), x)
    x = torch.where(x == float("-inf"), torch.zeros_like(x), x)
    low = x.min()
    return (x - low) / (x.max() - low + epsilon)


def adafisher_batch_diagonals(
    layer: Layer, inputs: Tensor, grad_outputs: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    r"""Diagonals of one batch's Kronecker factors (authors' ``Compute_H_D`` /
    ``Compute_S_D``): :math:`H = \mathrm{mean}_r\,\bar a_r^{\,2}` over the input rows (a
    convolution's patches, one row per example and position) and
    :math:`S = \mathrm{mean}_r\, g_r^{\,2}` over the output-gradient rows (the raw output
    gradients, not rescaled by the batch size)."""
    rows, _, _ = layer.input_rows(inputs, dtype)
    rows = layer.with_ones(rows)
    grad_rows, _, _ = layer.output_grad_rows(grad_outputs, dtype)
    return rows.square().mean(dim=0), grad_rows.square().mean(dim=0)


@register(
    paper=PAPER,
    category="second-order",
    shape_aware=True,
    needs_model=True,
    verified_against=("fp64 re-statement of AtlasAnalyticsLab/AdaFisher (HEAD eb858c6)",),
)
class AdaFisher(CurvatureOptimizer):
    r"""AdaFisher: momentum divided by a damped diagonal Kronecker-factored Fisher.

    ``AdaFisher(model, lr=...)`` preconditions every ``nn.Linear`` / ``nn.Conv2d`` layer of
    ``model``. Every other parameter (and every parameter when a plain iterable is given) uses
    :math:`\tilde F = 1`, i.e. bias-corrected momentum SGD, as the authors' ``ones_like``
    fallback. The authors also precondition ``BatchNorm2d`` and ``LayerNorm``; here those take
    the fallback (a deviation).

    Per layer, at steps :math:`k` with :math:`(k-1) \bmod T = 0` (the authors update the
    statistics when their step counter is a multiple of ``TCov``), from the last
    forward/backward pass (:func:`adafisher_batch_diagonals` gives :math:`\hat H, \hat S`;
    :math:`H, S` start at 1):

    .. math::
        H \leftarrow \tfrac{\gamma}{10} H + \tfrac{\gamma}{100}\,\mathrm{MinMax}(\hat H),\qquad
        S \leftarrow \tfrac{\gamma}{10} S + \tfrac{\gamma}{100}\,\mathrm{MinMax}(\hat S)

        \tilde F_{ij} = S_i H_j + \lambda\quad(\text{the bias column uses } H_{d_{in}+1})

    and for every parameter (:math:`t` its step count):

    .. math::
        m \leftarrow \beta m + (1-\beta)(g + \delta\theta),\qquad
        \theta \leftarrow \theta - \frac{\eta}{1-\beta^t}\,\frac{m}{\tilde F}.

    (The odd-looking :math:`\gamma/10, \gamma/100` average is the authors' ``update_running_avg``;
    with :math:`\gamma = 0.8` it is their earlier ``gammas=[0.92, 0.008]``.) Defaults from the
    authors' code: ``lr`` 1e-3, ``beta`` 0.9, ``damping`` :math:`\lambda` 1e-3 (``Lambda``),
    ``gamma`` 0.8, ``stat_update_freq`` :math:`T` 100 (``TCov``), ``weight_decay``
    :math:`\delta` 0.

    Robustness: statistics are fp32 (fp64 for fp64 weights); a batch statistic with a NaN is
    skipped (warned once, counted in ``state["curvature_failures"]``); :math:`\tilde F \ge
    \lambda > 0` so the division is safe.

    State: ``exp_avg`` per parameter (parameter dtype, as the authors); per layer ``H``
    (:math:`d_{in} + b`) and ``S`` (:math:`d_{out}`) in fp32. Bytes for a layer with :math:`n`
    parameters: :math:`4n + 4(d_{in} + b + d_{out})`; ``info().state_bytes`` reports the
    parameter-shaped part (4 bytes/param).
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "authors' code"),
        "beta": Hyper(0.9, COEFFICIENT, "authors' code"),
        "damping": Hyper(1e-3, POSITIVE, "authors' code (Lambda)"),
        "gamma": Hyper(0.8, COEFFICIENT, "authors' code"),
        "stat_update_freq": Hyper(100, Interval(1, integer=True), "authors' code (TCov)"),
        "weight_decay": weight_decay_hyper(0.0, "authors' code"),
        "maximize": MAXIMIZE,
    }
    layer_state_keys = ("H", "S")
    decoupled = False

    @classmethod
    def param_state_bytes(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        """The parameter-shaped ``exp_avg`` (the class docstring gives the per-layer extra)."""
        return torch.empty((), dtype=dtype).element_size()

    def layer_fisher(self, index: int, layer: Layer, state: dict, step: int, hp: dict):
        """Update the layer's diagonals when due; return ``(F_weight, F_bias)`` or None."""
        captured = self._capture.get(index)
        if captured is not None and (step - 1) % hp["stat_update_freq"] == 0:
            h_batch, s_batch = adafisher_batch_diagonals(
                layer, *captured, statistics_dtype(layer.weight)
            )
            h_batch, s_batch = min_max_normalize(h_batch), min_max_normalize(s_batch)
            if bool(torch.isfinite(h_batch).all() & torch.isfinite(s_batch).all()):
                if "H" not in state:
                    state["H"] = torch.ones_like(h_batch)
                    state["S"] = torch.ones_like(s_batch)
                gamma = hp["gamma"]
                state["H"].mul_(gamma * 1e-1).add_(h_batch, alpha=gamma * 1e-2)
                state["S"].mul_(gamma * 1e-1).add_(s_batch, alpha=gamma * 1e-2)
            else:
                self._record_failure(state, "a batch Fisher diagonal was not finite; skipped")
        if "H" not in state:
            return None
        fisher = state["S"].unsqueeze(1) * state["H"].unsqueeze(0) + hp["damping"]
        return layer.split(fisher)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: dict[int, Tensor] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                self._init_step(state)
                state["step"] += 1
                grads[id(p)] = -p.grad if group["maximize"] else p.grad
        fishers: dict[int, Tensor] = {}
        groups = self.param_group_index()
        for index, layer in enumerate(self.layers):  # independent per layer
            w, b = layer.weight, layer.bias
            if id(w) not in grads or (b is not None and id(b) not in grads):
                continue
            state = self.state[w]
            hp = self.group_hyperparams(groups[id(w)])
            pieces = self.layer_fisher(index, layer, state, int(state["step"].item()), hp)
            if pieces is not None:
                fishers[id(w)] = pieces[0]
                if b is not None:
                    fishers[id(b)] = pieces[1]
        for group in self.param_groups:
            hp = self.group_hyperparams(group)
            for p in group["params"]:
                if id(p) in grads:
                    self._update(p, grads[id(p)], self.state[p], fishers.get(id(p)), hp)
        self._capture.clear()
        return loss

    def _update(self, p: Tensor, grad: Tensor, state: dict, fisher, hp: dict) -> None:
        beta, lr, decay = hp["beta"], hp["lr"], hp["weight_decay"]
        step = int(state["step"].item())
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avg = state["exp_avg"]
        if decay != 0 and not self.decoupled:
            grad = grad.add(p, alpha=decay)
        exp_avg.mul_(beta).add_(grad, alpha=1 - beta)
        bias_correction = 1 - beta**step
        direction = (
            exp_avg / bias_correction if fisher is None else exp_avg / bias_correction / fisher
        )
        if self.decoupled and decay != 0:
            direction = direction + decay * p
        p.sub_((lr * direction).to(p.dtype))


@register(
    paper=PAPER,
    category="second-order",
    shape_aware=True,
    needs_model=True,
    verified_against=("fp64 re-statement of AtlasAnalyticsLab/AdaFisher (HEAD eb858c6)",),
)
class AdaFisherW(AdaFisher):
    r"""AdaFisherW: AdaFisher with decoupled weight decay (the authors' ``AdaFisherW``).

    As :class:`AdaFisher`, except that the weight decay is not added to the gradient:

    .. math::
        m \leftarrow \beta m + (1-\beta) g,\qquad
        \theta \leftarrow \theta - \eta\Big(\frac{m}{(1-\beta^t)\tilde F} + \delta\theta\Big).

    Same defaults, statistics, fallback and state (4 bytes/param plus the per-layer diagonals).
    """

    decoupled = True
