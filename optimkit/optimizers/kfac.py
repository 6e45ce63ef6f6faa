r"""Kronecker-factored preconditioners for Linear and Conv2d layers: K-FAC and MKOR.

Both take the model, as their papers do (``KFAC(model, lr=...)``): module hooks
(:mod:`optimkit.curvature`) collect each layer's inputs :math:`\bar a` and output gradients
:math:`g`, and the layer's gradient in matrix form :math:`\nabla_W = [\nabla W, \nabla b]`
(:math:`d_{out} \times (d_{in}+1)`) is preconditioned by two factor inverses before a
momentum-SGD step. Preconditioned layers: ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``,
numeric padding, zero padding mode). Every other parameter (norm layers, embeddings, a frozen
layer's bias, or everything when a plain parameter iterable is given instead of a model) takes
the momentum-SGD step on its raw gradient, exactly ``torch.optim.SGD``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from optimkit.curvature import CurvatureOptimizer, Layer, statistics_dtype
from optimkit.engine import (
    COEFFICIENT,
    MAXIMIZE,
    NON_NEGATIVE,
    POSITIVE,
    Choice,
    Hyper,
    Interval,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.registry import Paper, register

__all__ = ["KFAC", "MKOR", "kfac_batch_factors", "sherman_morrison"]


# ----------------------------------------------------------------------------------------------
# per-layer pieces (each takes one layer and its own tensors)
# ----------------------------------------------------------------------------------------------
def kfac_batch_factors(
    layer: Layer, inputs: Tensor, grad_outputs: Tensor, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    r"""One batch's Kronecker factors of a layer.

    Linear (rows :math:`r = 1..R`, all leading dims are examples):
    :math:`A = \frac1R\sum_r \bar a_r \bar a_r^\top`,
    :math:`G = \frac1R\sum_r (R\,g_r)(R\,g_r)^\top` (the output gradient of a mean-reduced loss
    rescaled to a per-example gradient, as ``batch_averaged=True`` in KFAC-Pytorch).
    Conv2d (KFC, Grosse & Martens 2016; :math:`N` examples, :math:`L` output positions,
    patches :math:`\bar a_{n,t}`): :math:`A = \frac{1}{NL}\sum_{n,t}\bar a_{n,t}\bar a_{n,t}^\top`,
    :math:`G = \frac1N\sum_{n,t}(N g_{n,t})(N g_{n,t})^\top`.
    """
    rows, n, positions = layer.input_rows(inputs, dtype)
    rows = layer.with_ones(rows)
    a_factor = rows.T @ rows / (n * positions)
    grad_rows, n, _ = layer.output_grad_rows(grad_outputs, dtype)
    grad_rows = grad_rows * n
    g_factor = grad_rows.T @ grad_rows / n
    return a_factor, g_factor


def damped_inverses(
    a_factor: Tensor, g_factor: Tensor, damping: float, split: str
) -> tuple[Tensor, Tensor, bool]:
    r"""Factored Tikhonov damping (Martens & Grosse 2015, section 6.3) and exact inverses:
    :math:`(A + \pi\sqrt{\lambda} I)^{-1}` and :math:`(G + \frac{\sqrt{\lambda}}{\pi} I)^{-1}`
    with :math:`\pi = \sqrt{(\mathrm{tr} A / d_A) / (\mathrm{tr} G / d_G)}` (``split="pi"``;
    1 when a trace is zero or not finite) or :math:`\pi = 1` (``split="sqrt"``).
    Returns the inverses and whether the factors, both Cholesky factorisations and the
    inverses are all finite and successful."""
    gamma = math.sqrt(damping)
    if split == "pi":
        mean_a = torch.diagonal(a_factor).mean()
        mean_g = torch.diagonal(g_factor).mean()
        ratio = mean_a / mean_g
        ok = (mean_a > 0) & (mean_g > 0) & torch.isfinite(ratio)
        pi = torch.where(ok, ratio.abs().sqrt(), torch.ones_like(ratio))
    else:
        pi = torch.ones((), dtype=a_factor.dtype, device=a_factor.device)
    eye_a = torch.eye(a_factor.shape[0], dtype=a_factor.dtype, device=a_factor.device)
    eye_g = torch.eye(g_factor.shape[0], dtype=g_factor.dtype, device=g_factor.device)
    chol_a, info_a = torch.linalg.cholesky_ex(a_factor + (pi * gamma) * eye_a)
    chol_g, info_g = torch.linalg.cholesky_ex(g_factor + (gamma / pi) * eye_g)
    a_inv = torch.cholesky_inverse(chol_a)
    g_inv = torch.cholesky_inverse(chol_g)
    good = (info_a == 0) & (info_g == 0)
    for matrix in (a_factor, g_factor, a_inv, g_inv):
        good = good & torch.isfinite(matrix).all()
    return a_inv, g_inv, bool(good)


def sherman_morrison(inverse: Tensor, v: Tensor) -> Tensor:
    r""":math:`(P^{-1} + v v^\top)^{-1} = P - \frac{P v v^\top P}{1 + v^\top P v}` for
    :math:`P` the current inverse (the authors' ``sm_inverse``; ``v`` a column)."""
    left = inverse @ v
    right = v.T @ inverse
    return inverse - (left @ right) / (1 + right @ v)


def sgd_momentum_step(
    p: Tensor, direction: Tensor, state: dict[str, Any], hp: Mapping[str, Any]
) -> None:
    """``torch.optim.SGD`` (dampening 0, no Nesterov) on one parameter with the given
    direction instead of its gradient; coupled weight decay."""
    d = direction.to(p.dtype)
    if hp["weight_decay"] != 0:
        d = d.add(p, alpha=hp["weight_decay"])
    if hp["momentum"] != 0:
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = d.clone()
        else:
            buf.mul_(hp["momentum"]).add_(d)
        d = buf
    p.add_(d, alpha=-hp["lr"])


class _KroneckerOptimizer(CurvatureOptimizer):
    """Shared step: per-layer preconditioned directions, then momentum SGD on every parameter."""

    @classmethod
    def param_state_bytes(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        """Parameter-shaped state only (the momentum buffer); per-layer factors are counted
        in the class docstring's formula (none exist for a plain parameter list)."""
        full = cls.with_defaults(hp)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return itemsize if full["momentum"] != 0 else 0

    def layer_direction(
        self, index: int, layer: Layer, state: dict, grad_mat: Tensor, step: int, hp: dict
    ) -> Tensor | None:
        """The preconditioned gradient matrix of one layer (None: use the raw gradient)."""
        raise NotImplementedError

    def scale_directions(self, group_layers: list, hp: dict) -> None:
        """Optional group-wide rescaling of the directions (K-FAC's KL clipping)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = self.param_group_index()
        grads: dict[int, Tensor] = {}
        for group in self.param_groups:
            maximize = group["maximize"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                self._init_step(state)
                state["step"] += 1
                grads[id(p)] = -p.grad if maximize else p.grad
        directions: dict[int, Tensor] = {}
        per_group: dict[int, list] = {}
        for index, layer in enumerate(self.layers):  # independent per layer
            w, b = layer.weight, layer.bias
            if id(w) not in grads or (b is not None and id(b) not in grads):
                continue
            group = groups[id(w)]
            hp = self.group_hyperparams(group)
            state = self.state[w]
            dtype = statistics_dtype(w)
            bias_grad = grads[id(b)] if b is not None else None
            grad_mat = layer.grad_matrix(grads[id(w)], bias_grad, dtype)
            direction = self.layer_direction(
                index, layer, state, grad_mat, int(state["step"].item()), hp
            )
            if direction is not None:
                per_group.setdefault(id(group), []).append([layer, grad_mat, direction])
        for group in self.param_groups:
            entries = per_group.get(id(group), [])
            if entries:
                self.scale_directions(entries, self.group_hyperparams(group))
            for layer, _, direction in entries:
                weight_dir, bias_dir = layer.split(direction)
                directions[id(layer.weight)] = weight_dir
                if layer.bias is not None:
                    directions[id(layer.bias)] = bias_dir
        for group in self.param_groups:
            hp = self.group_hyperparams(group)
            for p in group["params"]:
                if id(p) in grads:
                    sgd_momentum_step(p, directions.get(id(p), grads[id(p)]), self.state[p], hp)
        self._capture.clear()
        return loss


@register(
    paper=Paper(
        "Optimizing Neural Networks with Kronecker-factored Approximate Curvature",
        "1503.05671",
        2015,
        "Martens, Grosse",
    ),
    category="second-order",
    shape_aware=True,
    needs_model=True,
    verified_against=("fp64 reference (paper's factors, exact inverses)",),
)
class KFAC(_KroneckerOptimizer):
    r"""K-FAC: Kronecker-factored natural-gradient preconditioning, then momentum SGD.

    ``KFAC(model, lr=..., ...)`` preconditions every ``nn.Linear`` / ``nn.Conv2d`` layer of
    ``model``; other parameters take plain momentum SGD (see :mod:`optimkit.optimizers.kfac`).
    ``KFAC(params)`` with a parameter iterable preconditions nothing (``torch.optim.SGD``).

    Per layer, at step :math:`k` (statistics every step, from the last forward/backward pass;
    :func:`kfac_batch_factors` gives the batch factors :math:`\hat A, \hat G`):

    .. math::
        \epsilon_k = \min(1 - 1/k,\ \epsilon_{max}),\qquad
        A \leftarrow \epsilon_k A + (1-\epsilon_k)\hat A,\qquad
        G \leftarrow \epsilon_k G + (1-\epsilon_k)\hat G \quad\text{(paper, section 5)}

        \text{every } T \text{ steps:}\quad
        A^{-1}_\gamma = (A + \pi\sqrt{\lambda} I)^{-1},\quad
        G^{-1}_\gamma = (G + \tfrac{\sqrt{\lambda}}{\pi} I)^{-1}\quad\text{(section 6.3)}

        V = G^{-1}_\gamma\, \nabla_W\, A^{-1}_\gamma,\qquad
        \nu = \min\Big(1, \sqrt{\kappa / (\eta^2 \textstyle\sum_{layers}\langle V,
        \nabla_W\rangle)}\Big),\qquad V \leftarrow \nu V

    and then ``torch.optim.SGD`` (momentum :math:`\mu`, coupled weight decay) on :math:`V` for the
    layer's parameters and on the raw gradient for the others. :math:`\nu` (KL clipping, over
    the layers of one param group) is not in the 2015 paper: it comes from the practical K-FAC of
    Ba, Grosse & Martens (2017) as implemented in KFAC-Pytorch (alecwangcq), which we follow for
    the step; ``kl_clip=0`` turns it off.

    Defaults: ``stat_decay`` :math:`\epsilon_{max}` 0.95 (paper, section 5);
    ``inv_update_freq`` :math:`T` 20 (paper's :math:`T_3`); ``damping_split`` "pi" (paper,
    section 6.3; "sqrt" is :math:`\pi = 1`); ``damping`` :math:`\lambda` 1e-3, ``lr`` 1e-3,
    ``momentum`` 0.9, ``kl_clip`` 1e-3, ``weight_decay`` 0 (KFAC-Pytorch defaults).

    Deviations from the paper: the damping is fixed (no Levenberg-Marquardt adaptation of
    :math:`\lambda`), and the step is KL-clipped momentum SGD instead of the paper's
    quadratic-model choice of :math:`\alpha, \mu` (both need extra curvature-vector products);
    the Fisher statistics are those of the backward pass the user runs (the empirical Fisher
    for the data loss; backpropagate a loss on targets sampled from the model for the paper's
    true Fisher); the factors come from the last forward/backward pass before ``step``.
    Robustness: a batch factor that is not finite is skipped, and a failed or non-finite
    Cholesky inverse keeps the previous inverses (raw gradient before any); both warn once and
    are counted in the weight's ``state["curvature_failures"]``. One host sync per layer and
    step checks finiteness.

    State: ``momentum_buffer`` per parameter (parameter dtype, as torch's SGD); per layer, in the
    weight's state and in fp32 (fp64 for fp64 weights): ``A``, ``A_inv``
    (:math:`(d_{in}+b)^2` each, :math:`b = 1` with a bias) and ``G``, ``G_inv``
    (:math:`d_{out}^2` each). Bytes for a layer with :math:`n` parameters:
    :math:`4n + 4\cdot 2\,[(d_{in}+b)^2 + d_{out}^2]`. ``info().state_bytes`` reports the
    parameter-shaped part (4 bytes/param at the defaults), the whole state of an unpreconditioned
    parameter.
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "KFAC-Pytorch (alecwangcq) default"),
        "momentum": Hyper(0.9, COEFFICIENT, "KFAC-Pytorch default"),
        "stat_decay": Hyper(0.95, COEFFICIENT, "paper, section 5: min(1 - 1/k, 0.95)"),
        "damping": Hyper(1e-3, POSITIVE, "KFAC-Pytorch default"),
        "damping_split": Hyper("pi", Choice(("pi", "sqrt")), "paper, section 6.3"),
        "inv_update_freq": Hyper(20, Interval(1, integer=True), "paper, T3 = 20"),
        "kl_clip": Hyper(1e-3, NON_NEGATIVE, "KFAC-Pytorch default (0: off)"),
        "weight_decay": weight_decay_hyper(0.0, "KFAC-Pytorch default"),
        "maximize": MAXIMIZE,
    }
    layer_state_keys = ("A", "G", "A_inv", "G_inv")

    def layer_direction(self, index, layer, state, grad_mat, step, hp):
        captured = self._capture.get(index)
        if captured is not None:
            dtype = grad_mat.dtype
            a_batch, g_batch = kfac_batch_factors(layer, *captured, dtype)
            if bool(torch.isfinite(a_batch).all() & torch.isfinite(g_batch).all()):
                count = state.get("factor_updates", 0) + 1
                decay = min(1.0 - 1.0 / count, hp["stat_decay"])
                if "A" not in state:
                    state["A"] = torch.zeros_like(a_batch)
                    state["G"] = torch.zeros_like(g_batch)
                state["A"].mul_(decay).add_(a_batch, alpha=1.0 - decay)
                state["G"].mul_(decay).add_(g_batch, alpha=1.0 - decay)
                state["factor_updates"] = count
            else:
                self._record_failure(state, "a batch Kronecker factor was not finite; skipped")
        due = (step - 1) % hp["inv_update_freq"] == 0 or "A_inv" not in state
        if "A" in state and due:
            a_inv, g_inv, good = damped_inverses(
                state["A"], state["G"], hp["damping"], hp["damping_split"]
            )
            if good:
                state["A_inv"], state["G_inv"] = a_inv, g_inv
            else:
                self._record_failure(state, "a factor inverse failed; the previous one is kept")
        if "A_inv" not in state:
            return None
        return state["G_inv"] @ grad_mat @ state["A_inv"]

    def scale_directions(self, entries, hp):
        if hp["kl_clip"] == 0:
            return
        vg_sum = sum((direction * grad_mat).sum() for _, grad_mat, direction in entries)
        vg_sum = vg_sum * hp["lr"] ** 2
        nu = torch.sqrt(hp["kl_clip"] / vg_sum.clamp_min(0.0)).clamp(max=1.0)
        for entry in entries:
            entry[2] = entry[2] * nu


@register(
    paper=Paper(
        "MKOR: Momentum-Enabled Kronecker-Factor-Based Optimizer Using Rank-1 Updates",
        "2306.01685",
        2023,
        "Mozaffari, Li, Dehnavi",
    ),
    category="second-order",
    shape_aware=True,
    needs_model=True,
    verified_against=("fp64 re-statement of Mohammad-Mozaffari/mkor mkor.py (HEAD 3a0e3bb)",),
)
class MKOR(_KroneckerOptimizer):
    r"""MKOR: Sherman-Morrison rank-1 updates of the factor inverses, norm-rescaled, then SGD.

    ``MKOR(model, lr=..., ...)`` preconditions every ``nn.Linear`` / ``nn.Conv2d`` layer; other
    parameters take plain momentum SGD on their raw gradients, as in the authors' code (their
    inner ``torch.optim.SGD`` steps every parameter). With a parameter iterable nothing is
    preconditioned (``torch.optim.SGD``).

    At steps :math:`k` with :math:`(k-1) \bmod f = 0` (or :math:`k \le` ``warmup_steps``), per
    layer, from the last forward/backward pass (authors' ``ComputeI`` / ``ComputeG``):
    :math:`a = \mathrm{mean}_n\,\mathrm{clip}_c(\bar a_n)` with :math:`\bar a_n` the example's
    input (a convolution's patches averaged over output positions) and a trailing 1 for the
    bias, and :math:`g = \mathrm{mean}_n\,\mathrm{clip}_c(N g_n)` (a convolution's output
    gradients averaged over positions), :math:`\mathrm{clip}_c` clamping to :math:`[-c, c]`.
    Then, first for :math:`A^{-1}` with :math:`a`, then for :math:`G^{-1}` with :math:`g`:

    .. math::
        P \leftarrow \begin{cases} I & \text{if the factor's reset flag is set (cleared)}\\
        \mathrm{SM}\big(\gamma P + (1-\gamma) I,\ v\big) & \text{otherwise}\end{cases},\qquad
        \mathrm{SM}(P, v) = P - \frac{P v v^\top P}{1 + v^\top P v}

    and if :math:`\max|P| > 2` both reset flags of the layer are set (flags start set, so the
    first update sets both inverses to :math:`I`). Every step:

    .. math::
        V = G^{-1} \nabla_W A^{-1},\qquad
        V \leftarrow V\,\frac{\|\nabla W\| + \|\nabla b\|}{\|V_W\| + \|V_b\|}

    (the norm-based stabiliser; the raw gradient when the ratio is not finite, e.g. a zero
    gradient), then ``torch.optim.SGD`` (momentum, coupled weight decay) on :math:`V`.

    Defaults: ``stat_decay`` :math:`\gamma` 0.95 (authors' code: the hard-coded 0.95/0.05 of
    ``_invert_factor``, equal to their ``stat_decay`` default), ``inv_update_freq`` :math:`f` 10,
    ``clipping_value`` :math:`c` 100, ``warmup_steps`` 0 (``mkor.MKOR`` defaults); ``lr`` 1e-3,
    ``momentum`` 0.9, ``weight_decay`` 0 (the authors' ``MKOROptimizer`` example defaults).

    Deviations from the authors' code: factors in fp32 (fp64 for fp64 weights), theirs fp16 by
    default (``half_precision=True``); their ``stabilization_factor`` blend
    :math:`(1-\zeta)P + \zeta I` on reset is unreachable in their code (the ``module not in
    factor_dict`` test is always true, so a reset always gives :math:`I`), and is not offered;
    no gradient accumulation, distributed backend, ``sgd_layers`` or ``grad_scale`` (use
    ``torch.amp.GradScaler``, which unscales gradients before ``step``; the hooked output
    gradients are then scaled, which the clip and norm rescaling mostly absorb);
    a Sherman-Morrison result that is not finite keeps the previous inverse (warned once,
    counted in ``state["curvature_failures"]``). The paper's MKOR-H (switching to a first-order
    optimizer when second-order steps stop helping) is not in the authors' public code and is not
    provided.

    State: ``momentum_buffer`` per parameter; per layer, in fp32, ``A_inv``
    (:math:`(d_{in}+b)^2`) and ``G_inv`` (:math:`d_{out}^2`). Bytes for a layer with :math:`n`
    parameters: :math:`4n + 4[(d_{in}+b)^2 + d_{out}^2]`; ``info().state_bytes`` reports the
    parameter-shaped part (4 bytes/param at the defaults).
    """

    hyperparams = {
        "lr": lr_hyper(1e-3, "authors' MKOROptimizer example default"),
        "momentum": Hyper(0.9, COEFFICIENT, "authors' MKOROptimizer example default"),
        "stat_decay": Hyper(0.95, COEFFICIENT, "authors' mkor.py (hard-coded 0.95)"),
        "inv_update_freq": Hyper(10, Interval(1, integer=True), "authors' mkor.py inv_freq"),
        "clipping_value": Hyper(100.0, POSITIVE, "authors' mkor.py"),
        "warmup_steps": Hyper(0, Interval(0, integer=True), "authors' mkor.py"),
        "weight_decay": weight_decay_hyper(0.0, "authors' MKOROptimizer example default"),
        "maximize": MAXIMIZE,
    }
    layer_state_keys = ("A_inv", "G_inv")

    @staticmethod
    def rank_one_vectors(
        layer: Layer, inputs: Tensor, grad_outputs: Tensor, clip: float, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """The authors' batch-mean input and output-gradient vectors (columns)."""
        rows, n, positions = layer.input_rows(inputs, dtype)
        per_example = rows.reshape(n, positions, -1).mean(dim=1)
        per_example = layer.with_ones(per_example).clamp(-clip, clip)
        grad_rows, n, positions = layer.output_grad_rows(grad_outputs, dtype)
        grad_example = (grad_rows.reshape(n, positions, -1) * n).mean(dim=1).clamp(-clip, clip)
        return per_example.mean(dim=0).unsqueeze(1), grad_example.mean(dim=0).unsqueeze(1)

    def _update_inverse(self, state: dict, key: str, v: Tensor, hp: dict) -> None:
        flag = "reset_" + key
        eye = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
        if state.get(flag, True) or key not in state:
            state[key] = eye
            state[flag] = False
            return
        gamma = hp["stat_decay"]
        updated = sherman_morrison(gamma * state[key] + (1 - gamma) * eye, v)
        if not bool(torch.isfinite(updated).all()):
            self._record_failure(state, "a Sherman-Morrison update was not finite; kept")
            return
        state[key] = updated
        if bool(updated.abs().max() > 2):
            state["reset_A_inv"] = True
            state["reset_G_inv"] = True

    def layer_direction(self, index, layer, state, grad_mat, step, hp):
        captured = self._capture.get(index)
        due = (step - 1) % hp["inv_update_freq"] == 0 or step - 1 < hp["warmup_steps"]
        if captured is not None and due:
            a, g = self.rank_one_vectors(layer, *captured, hp["clipping_value"], grad_mat.dtype)
            self._update_inverse(state, "A_inv", a, hp)
            self._update_inverse(state, "G_inv", g, hp)
        if "A_inv" not in state:
            return None
        direction = state["G_inv"] @ grad_mat @ state["A_inv"]
        weight_grad, bias_grad = layer.split(grad_mat)
        weight_dir, bias_dir = layer.split(direction)
        grad_norm = weight_grad.norm()
        dir_norm = weight_dir.norm()
        if bias_grad is not None:
            grad_norm = grad_norm + bias_grad.norm()
            dir_norm = dir_norm + bias_dir.norm()
        ratio = grad_norm / dir_norm
        return torch.where(torch.isfinite(ratio), direction * ratio, grad_mat)
