r"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

Paper: N. Vyas, D. Morwani, R. Zhao, M. Kwun, I. Shapira, D. Brandfonbrener, L. Janson,
S. Kakade, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321.
Authors' code: github.com/nikhilvyas/SOAP ``soap.py`` (HEAD a1e5535, with the Dec 2024
"momentum change" that keeps the first moment in the eigenbasis); we follow it exactly.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optimkit.engine import (
    MAXIMIZE,
    NON_NEGATIVE,
    Betas,
    Choice,
    Flag,
    Hyper,
    Interval,
    Optimizer,
    lr_hyper,
    weight_decay_hyper,
)
from optimkit.kernels import triton_on
from optimkit.linalg import (
    MATMUL_PRECISIONS,
    QR_METHODS,
    accumulate_gram_,
    eigenbasis_eigh,
    eigenbasis_power_qr,
    half_matmul,
    matmul,
    matmul_accumulate_,
)
from optimkit.optimizers._refresh import RefreshCounts
from optimkit.optimizers._stacked import StateViews
from optimkit.optimizers.adam import adam_moments_
from optimkit.registry import REFERENCE_SHAPES, Paper, register

__all__ = ["SOAP", "soap_merged_shape", "mode_product", "refresh_precision", "SOAP_PRECISIONS"]


def soap_merged_shape(shape: tuple[int, ...], max_precond_dim: int) -> tuple[int, ...]:
    """The authors' ``merge_dims``: merge consecutive dims while their product stays
    ``<= max_precond_dim`` (channels-first layout)."""
    merged: list[int] = []
    current = 1
    for size in shape:
        if current * size > max_precond_dim:
            if current > 1:
                merged.append(current)
                current = size
            else:
                merged.append(size)
                current = 1
        else:
            current *= size
    if current > 1 or not merged:
        merged.append(current)
    return tuple(merged)


def mode_product(
    x: Tensor,
    matrix: Tensor,
    dim: int,
    precision: str = "fp32",
    out_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Contract axis ``dim`` of ``x`` with the rows of ``matrix``:
    :math:`y_{\dots a \dots} = \sum_i x_{\dots i \dots} M_{ia}`, keeping the axis order
    (a matrix product at ``precision``, see :func:`optimkit.linalg.matmul`). bfloat16 or
    float16 ``x`` and ``matrix`` (SOAP's ``matmul_precision="bf16"``) take
    :func:`optimkit.linalg.half_matmul`'s product, fp32 accumulation, the result in
    ``out_dtype`` (float32 by default, or the operands' dtype).

    ``matrix`` may be a stack ``(b, n, m)``: then ``x`` is ``(b, ...)``, ``x[j]`` is contracted
    with ``matrix[j]`` (one batched product) and ``dim`` counts the axes of ``x[j]``. The first
    and the last axis are contracted without moving ``x``'s data (:math:`M^\top X` and
    :math:`X M` on its unfoldings); a middle axis is moved last and back."""
    batch = matrix.dim() - 2
    if batch and len(matrix) == 1:  # a stack of one: the plain product (the same rounding)
        return mode_product(x[0], matrix[0], dim, precision, out_dtype).unsqueeze(0)

    def product(a: Tensor, b: Tensor) -> Tensor:
        if a.dtype in (torch.bfloat16, torch.float16):
            return half_matmul(a, b, out_dtype or torch.float32)
        return matmul(a, b, precision)

    axis = dim + batch
    head, size, out = x.shape[:batch], x.shape[axis], matrix.shape[-1]
    lead = math.prod(x.shape[batch:axis])
    trail = math.prod(x.shape[axis + 1 :])
    out_shape = (*x.shape[:axis], out, *x.shape[axis + 1 :])
    if trail == 1:
        return product(x.reshape(*head, lead, size), matrix).reshape(out_shape)
    if lead == 1:
        return product(matrix.mT, x.reshape(*head, size, trail)).reshape(out_shape)
    moved = torch.movedim(x, axis, -1)
    result = product(moved.reshape(*head, -1, size), matrix)
    return torch.movedim(result.reshape(*moved.shape[:-1], out), -1, axis)


#: SOAP's ``matmul_precision`` choices: the linalg ones and "bf16" (the statistics and the
#: rotations, the first moment's at a refresh included, with bf16 operands; the refresh's
#: power iteration and QR at TF32).
SOAP_PRECISIONS = (*MATMUL_PRECISIONS, "bf16")


def bases_dtype(precision: str, state_dtype: torch.dtype) -> torch.dtype:
    """The dtype of SOAP's eigenbases ``Q{k}`` for ``matmul_precision`` and the dtype of the
    rest of the state: bf16 for "bf16" with fp32 state (every product they enter then takes
    them as they are, bf16 operands, with no copy a step; the refresh computes the new ones
    from an fp32 copy and rounds them once), else the state's dtype."""
    if precision == "bf16" and state_dtype == torch.float32:
        return torch.bfloat16
    return state_dtype


def refresh_precision(precision: str) -> str:
    """The precision of the refresh's products (power iteration, QR) for SOAP's
    ``matmul_precision``: TF32 for "bf16" (whose products of the regular step and of the
    first moment's rotation to the new basis only are bf16), else the same."""
    return "tf32" if precision == "bf16" else precision


BUCKET_NUMEL = 1 << 26
"""Most elements of the same-shaped parameters that one step batches together (a bucket):
bounds each temporary of a bucket's step (256 MB in fp32)."""
#: whether :func:`adam_direction` may take the fused kernel (tests switch it off).
FUSED_DIRECTION = True


def _chunks(params: list[Tensor], numel: int) -> list[list[Tensor]]:
    """``params`` (each of ``numel`` elements) in the fewest buckets of at most
    :data:`BUCKET_NUMEL` elements, of balanced sizes (36 in buckets of at most 5: four of 5
    and four of 4, not seven of 5 and a lone one, whose unbatched products run slower)."""
    most = max(1, BUCKET_NUMEL // max(numel, 1))
    count = -(-len(params) // most)
    size, larger = divmod(len(params), max(count, 1))  # the first ``larger`` take one more
    bounds = [i * size + min(i, larger) for i in range(count + 1)]
    return [params[start:stop] for start, stop in zip(bounds, bounds[1:])]


def _concat(stacks: list[Tensor]) -> Tensor:
    return stacks[0] if len(stacks) == 1 else torch.cat(stacks)


def _state_keys(axes: tuple[int, ...]) -> list[str]:
    return ["exp_avg", "exp_avg_sq", *(f"{kind}{k}" for k in axes for kind in ("GG", "Q"))]


@dataclass
class _Bucket:
    """Same-shaped parameters of a group, stepped together: their state entries
    (``exp_avg``, ``exp_avg_sq``, ``GG{k}``, ``Q{k}``) stay separate per parameter (checkpoints
    are unchanged) but are views of ``(members, ...)`` stacks, so that each matrix product of a
    step is one batched product over the bucket, not a Python loop over its parameters."""

    params: tuple[Tensor, ...]
    states: tuple[dict, ...]
    shape: tuple[int, ...]  # the work (merged) shape of each member
    axes: tuple[int, ...]  # its preconditioned axes
    stacks: dict[str, Tensor]
    views: StateViews  # its entries in the members' states: to notice a replaced one

    @classmethod
    def of(cls, params, states, shape, axes, stacks: dict[str, Tensor]) -> _Bucket:
        views = StateViews((state, key, state[key]) for state in states for key in stacks)
        return cls(tuple(params), tuple(states), shape, axes, stacks, views)

    @classmethod
    def single(cls, p: Tensor, state: dict, shape, axes) -> _Bucket:
        """One parameter: stacks of one, views of its own state entries."""
        stacks = {}
        for key in _state_keys(axes):
            if not state[key].is_contiguous():  # e.g. a checkpoint saved a strided entry
                state[key] = state[key].contiguous()
            stacks[key] = state[key].unsqueeze(0)
        views = StateViews((state, key, state[key]) for key in stacks)
        return cls((p,), (state,), shape, axes, stacks, views)

    def valid(self, states: list[dict]) -> bool:
        """Whether ``states`` (the members' current state dicts) are still this bucket's."""
        return self.views.held_by(states)

    def exp_avg(self) -> Tensor:
        return self.stacks["exp_avg"].view(len(self.params), *self.shape)

    def exp_avg_sq(self) -> Tensor:
        return self.stacks["exp_avg_sq"].view(len(self.params), *self.shape)

    def update_in_last_product(self, dtype: torch.dtype) -> bool:
        """Whether :meth:`project_back_into_params` applies: a preconditioned first or last
        axis is the last to rotate back, and the members are contiguous and of ``dtype``
        (the state's; bf16/fp16 weights take :func:`_apply`)."""
        return (
            bool(self.axes)
            and self.axes[-1] in (0, len(self.shape) - 1)
            and all(p.dtype == dtype and p.is_contiguous() for p in self.params)
        )

    def bases(self) -> dict[int, Tensor]:
        """Each preconditioned axis' basis stack, in the dtype the products take
        (:func:`bases_dtype`: bf16 at ``matmul_precision="bf16"``)."""
        return {k: self.stacks[f"Q{k}"] for k in self.axes}

    def project_back_into_params(
        self,
        direction: Tensor,
        precision: str,
        step_size: float,
        decay: float,
    ) -> None:
        r"""The update :math:`N` of :meth:`project` (back) applied to the members as
        :func:`_apply` does, :math:`W \leftarrow (1-\eta\lambda)(W - sN)`, with the last
        rotation's product writing into each member's weights: :math:`W \leftarrow \beta W +
        \alpha X Q^\top` (or :math:`\alpha Q X`) with :math:`\beta = 1-\eta\lambda`,
        :math:`\alpha = -s\beta` (:func:`~optimkit.linalg.matmul_accumulate_`: on CUDA the
        GEMM's epilogue reads and writes :math:`W`, so :math:`N` is never stored and the
        weights take one pass instead of three; the same values up to rounding). One product
        per member (the weights are separate tensors)."""
        bases = self.bases()
        last = self.axes[-1]
        x = direction
        for k in self.axes[:-1]:
            x = mode_product(x, bases[k].mT, k, precision, bases[k].dtype)
        basis = bases[last]
        beta, size = 1.0 - decay, self.shape[last]
        for p, member, q in zip(self.params, x.unbind(0), basis.unbind(0)):
            if last == len(self.shape) - 1:  # X Q^T on the (rest, size) unfolding
                target, a, b = p.view(-1, size), member.reshape(-1, size), q.mT
            else:  # Q X on the (size, rest) unfolding
                target, a, b = p.view(size, -1), q, member.reshape(size, -1)
            matmul_accumulate_(target, a, b, beta, -step_size * beta, precision)

    def project(
        self,
        x: Tensor,
        back: bool,
        precision: str,
        out_dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Each member's slice of ``x`` ``(members, *shape)`` into its eigenbasis
        (:math:`Q_L^\top G Q_R`), or back (:math:`Q_L N Q_R^\top`). With bf16 bases
        (:func:`bases_dtype`) and ``x`` bf16 every product has bf16 operands and fp32
        accumulation, the intermediate results rounded to bf16 and the last one fp32, or
        ``out_dtype`` (bf16: the operand of a later product)."""
        for i, (k, q) in enumerate(self.bases().items()):
            last = i == len(self.axes) - 1
            dtype = out_dtype if last else q.dtype
            x = mode_product(x, q.mT if back else q, k, precision, dtype)
        return x


def adam_direction(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    out: Tensor | None = None,
) -> Tensor:
    r"""Adam's moments in place (:func:`~optimkit.optimizers.adam.adam_moments_`) and the
    direction :math:`N = M / (\sqrt V + \epsilon)`, written into ``out`` (may be ``grad``
    when that is a temporary; a new tensor if None; it may be bfloat16, the direction then
    rounded once). On CUDA with Triton, fp32 (``out`` fp32 or bf16) contiguous tensors: one
    fused pass (:func:`optimkit.kernels.adam_direction.adam_direction_`, the same
    roundings); else torch ops."""
    out = torch.empty_like(exp_avg) if out is None else out
    tensors = (grad, exp_avg, exp_avg_sq)
    if (
        triton_on(FUSED_DIRECTION, grad)
        and all(t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
        and out.dtype in (torch.float32, torch.bfloat16)
        and out.is_contiguous()
    ):
        from optimkit.kernels.adam_direction import adam_direction_

        return adam_direction_(grad, exp_avg, exp_avg_sq, beta1, beta2, eps, out)
    adam_moments_({"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}, grad, beta1, beta2)
    denom = exp_avg_sq.sqrt().add_(eps)
    return torch.div(exp_avg, denom, out=out)


def _apply(params: tuple[Tensor, ...], updates: Tensor, step_size: float, decay: float) -> None:
    r""":math:`W \leftarrow W - s N`, then :math:`W \leftarrow W - \eta\lambda W` (the
    authors' ``p.add_(p, alpha=-lr * wd)``), for each member and its slice of ``updates``."""
    slices = [u.reshape(p.shape) for p, u in zip(params, updates.unbind(0))]
    if all(p.dtype == updates.dtype for p in params):
        torch._foreach_add_(list(params), slices, alpha=-step_size)
        if decay > 0.0:
            torch._foreach_add_(list(params), list(params), alpha=-decay)
        return
    for p, update in zip(params, slices):  # bf16/fp16 weights, fp32 state
        work = p.to(update.dtype)
        work.add_(update, alpha=-step_size)
        if decay > 0.0:
            work.add_(work, alpha=-decay)
        p.copy_(work)


@register(
    paper=Paper(
        "SOAP: Improving and Stabilizing Shampoo using Adam",
        "2409.11321",
        2024,
        "Vyas, Morwani, Zhao, Kwun, Shapira, Brandfonbrener, Janson, Kakade",
    ),
    category="second-order",
    shape_aware=True,
    verified_against=("fp64 reference of nikhilvyas/SOAP soap.py (re-implemented in test)",),
)
class SOAP(RefreshCounts, Optimizer):
    r"""SOAP: Adam run in the slowly refreshed eigenbasis of Shampoo's preconditioner.

    For a gradient :math:`G` (a tensor; written here for a matrix) with eigenbases
    :math:`Q_L, Q_R` of the statistics :math:`L, R`, and the authors' step :math:`s = t-1`:

    .. math::
        G' = Q_L^\top G Q_R,\qquad
        M' \leftarrow \beta_1 M' + (1-\beta_1) G',\qquad
        V \leftarrow \beta_2 V + (1-\beta_2) G'^{\,2},

        N = Q_L \frac{M'}{\sqrt{V} + \epsilon} Q_R^\top,\qquad
        W \leftarrow W - \eta\frac{\sqrt{1-\beta_2^s}}{1-\beta_1^s} N,\qquad
        W \leftarrow W - \eta\lambda W,

        L \leftarrow \mathrm{lerp}(L, GG^\top, 1-\beta_s),\quad
        R \leftarrow \mathrm{lerp}(R, G^\top G, 1-\beta_s),

    and every ``precondition_frequency`` steps (:math:`s \bmod f = 0`) each basis is refreshed by
    one warm-started power-iteration step and a QR (:func:`optimkit.linalg.eigenbasis_power_qr`),
    the columns ordered by the estimated eigenvalues :math:`\mathrm{diag}(Q^\top L Q)` and
    :math:`V` permuted to match; :math:`M'` (kept in the eigenbasis) is rotated to the new basis
    (:math:`M' \leftarrow Q_{new}^\top Q_{old} M' \dots`). For a tensor of any order each axis of
    size ``<= max_precond_dim`` gets its statistic and basis; larger axes (and 1-D parameters
    unless ``precondition_1d``) use the identity. ``merge_dims`` first merges consecutive axes
    (the authors' ``merge_dims``).

    **First step** (authors' code): it only initialises the preconditioner: :math:`L, R` from
    :math:`G` and :math:`Q_L, Q_R` by ``torch.linalg.eigh`` (descending eigenvalues); the
    weights do not move (not even by weight decay), so the current gradient is never used in its
    own projection. The authors' step counter :math:`s` starts counting on the second call.

    Defaults (the authors' ``soap.py``): lr 3e-3, betas (0.95, 0.95), ``shampoo_beta`` -1 (any
    negative value: use ``betas[1]``), eps 1e-8, weight decay 0.01 (applied after the step,
    scaled by lr), ``precondition_frequency`` 10, ``max_precond_dim`` 10000, ``merge_dims``,
    ``precondition_1d``, ``normalize_grads`` False (``normalize_grads`` divides :math:`N` by
    :math:`10^{-30} + \mathrm{RMS}(N)`), ``correct_bias`` True. The paper's Algorithm 3 uses
    :math:`\beta_1 = 0.95, \beta_2 = 0.95, f = 10` as well.

    Deviations from the authors' code, none changing the numbers beyond rounding: (1) the first
    moment is rotated between bases only when a basis changes (the authors project it back and
    forth every step, an identity for orthogonal :math:`Q`); (2) statistics, bases and moments
    are kept in fp32 for bf16/fp16 parameters (fp64 for fp64; the authors' statistics are
    always fp32, their moments in the gradient's dtype); (3) same-sized eigenproblems of a group
    are solved in one batched call, and same-shaped parameters of a group (at the same step)
    are stepped together as a bucket: their state entries stay separate per parameter (the
    checkpoint format is unchanged) but are views of ``(members, ...)`` stacks, so every
    product of the step is one batched product (buckets of at most :data:`BUCKET_NUMEL`
    elements; a loaded or replaced entry is restacked on the next step); (4) a failed or
    non-finite ``eigh``/QR keeps the previous basis (identity at first), warns once and is
    counted in ``state["root_failures"]``;
    (5) ``data_format="channels_last"`` is not offered (channels-first only); (6) ties in the
    estimated eigenvalues are ordered by a stable sort; (7) by default (``qr_method=
    "gram_schmidt"``) the refresh's QR is computed from matrix products by block Gram-Schmidt
    with reorthogonalisation (:func:`optimkit.linalg.block_gram_schmidt_qr`: fp64 panel
    factorisations, the projections at ``matmul_precision``): the same Q factor as the
    authors' ``torch.linalg.qr`` up to the signs of its columns, to which the update is
    invariant (:math:`V` holds squares, and :math:`M'` and :math:`N` flip with the column); a
    matrix it cannot factor (:math:`\kappa u \gtrsim 1` for the unit roundoff of its
    products) takes CholeskyQR2 with its first pass in fp64
    (:func:`optimkit.linalg.cholesky_qr2`; ``qr_method="cholesky"`` uses it alone), and one
    that cannot factor either (a rank-deficient :math:`LQ`, e.g. a coordinate that never had
    a gradient) Householder's QR; both fallbacks are counted in ``opt.refresh_counts``
    (``cholesky_fallbacks``, ``householder_fallbacks``). ``qr_fp64`` (default True) factors
    the first pass of either in float64; False keeps it at ``matmul_precision``, for GPUs
    whose float64 products are slow (consumer cards), at the price of more fallbacks on
    ill-conditioned products.
    ``qr_method="householder"`` is the authors' QR. The product :math:`LQ` is computed once
    for both the eigenvalue estimates and the power step (the authors multiply twice).
    (8) Where ``normalize_grads`` is off and the last preconditioned axis is the first or the
    last one, the weights (contiguous, of the state's dtype) are updated inside the last
    back-rotation's product, :math:`W \leftarrow (1 - \eta\lambda) W - s(1 - \eta\lambda)
    X Q^\top` (or :math:`Q X`): the authors' decoupled decay and step in one product with
    the same rounding as a matrix product's, and :math:`N` is never stored.

    State per parameter: ``exp_avg`` and ``exp_avg_sq`` (parameter-shaped), ``GG{k}`` and
    ``Q{k}`` (:math:`n_k \times n_k`) per preconditioned axis :math:`k`. Bytes per element:
    :math:`4\,(2N + \sum_{k} 2 n_k^2)/N` for fp32; reported for the reference shapes
    [64x48, 48]: 24.41 bytes/param (8 for the moments plus 4 * 2(64^2 + 48^2)/3120).

    Precision of the matrix products (``matmul_precision``): ``"fp32"`` (default, the authors')
    or ``"tf32"``: the statistics, the rotations into and out of the eigenbasis and the
    refresh's power-iteration products take TF32 inputs with fp32 accumulation (the tensor
    cores on CUDA; emulated by rounding the inputs on the CPU, so its effect can be tested
    there); eigh, and Householder's QR where it is used, stay fp32; CholeskyQR2 runs its
    products at TF32 too (orthogonality of the new basis about 1e-3). Against the fp64
    reference of the authors' algorithm the parameters then stay within 1e-2 relative over 55
    steps (4e-3 observed; fp32: 1e-7), the tolerance the tests pin. At TF32 on CUDA the
    Gram-Schmidt projections of bases of at least 4,096 columns run as fp16 products with
    fp32 accumulation (their operands lie in [-1, 1], where fp16 keeps TF32's 10-bit
    mantissa; :data:`optimkit.linalg.HALF_PROJECTIONS`). On the GPU, Householder's QR
    factorisations run over a few CUDA streams (:func:`optimkit.linalg.batched_qr`).
    ``"bf16"``: the regular step's products (the statistics, the rotations into and out of the
    eigenbasis, the last one into the weights) take bf16 operands with fp32 accumulation (on
    CUDA cuBLAS's bf16 tensor-core products, :func:`optimkit.linalg.half_matmul`; emulated
    on the CPU): the gradient is read once into a bf16 stack, the bases are bf16 (below),
    the Adam direction is written as bf16 and the intermediate products
    are rounded to bf16 (bf16 keeps fp32's exponent range, so nothing is scaled; it keeps 8
    mantissa bits where TF32 keeps 10). The bases are kept as bf16 (:func:`bases_dtype`: the
    operands the products take, so no copy is made a step; 20.24 state bytes/param at the
    reference shapes instead of 24.33, 14.7 GB instead of 18.0 on the 0.6 B list below); the
    moments and statistics stay fp32. At a refresh the first moment's rotation from the old
    basis to the new one takes bf16 operands too (the momentum rounded to bf16 for it, as the
    gradient is each step); the power iteration and the QR run as at ``"tf32"``
    (:func:`refresh_precision`) from fp32 copies of the bases, and the new bases are rounded
    to bf16 once. The trade-off, measured on an H100 against fp32 bases in one session: the
    regular step 2.9 ms faster, the refresh 44 ms slower (the products of bf16-rounded bases
    are worse conditioned, and three QRs fell back to CholeskyQR2), 1.8 ms/step slower in
    all, for 17% less state. A group switched to another precision converts its bases at
    its next step. Parameters whose state is fp64 take fp64 products. Against the fp64 reference:
    within the same 1e-2 over 55 steps (2.7e-3 observed, TF32 4.3e-3).

    Speed (``optimkit bench speed-matrix --spectrum decaying --peers``, a 0.6 B
    transformer-shaped list, frequency 10, fresh gradients every step, a warm refresh timed;
    2026-12-07, one NVIDIA H200): bf16 75.4-75.9 ms/step (median 41.4-41.9 ms, the refresh
    step 0.38 s; 2.19-2.22x its matmul floor of 34.3 ms, 3.2-3.3% of a 0.5 M-token training
    step), pytorch_optimizer 4.1.0's SOAP 990.0 ms/step in the same run (13.0x slower); TF32
    116.6 ms/step (median 82.0 ms, 2.00x its floor of 58.3 ms, 5.0%) in a run beside bf16's
    75.4. Later that day on an H200, with the bases kept as bf16: bf16 79.4 ms/step (median
    39.9 ms, refresh step 0.43 s, 2.46x its floor of 32.2 ms, 3.4%), pytorch_optimizer's 989.3
    in the same process (12.5x slower). On an H100, in a run before bf16 existed: TF32 124.0
    ms/step against pytorch_optimizer's 1,003. fp32 (at an earlier commit): 634 ms/step.
    """

    hyperparams = {
        "lr": lr_hyper(3e-3, "authors' soap.py"),
        "betas": Hyper((0.95, 0.95), Betas(2), "authors' soap.py"),
        "shampoo_beta": Hyper(
            -1.0, Interval(-1.0, 1.0, high_open=True), "authors' soap.py (<0: betas[1])"
        ),
        "eps": Hyper(1e-8, NON_NEGATIVE, "authors' soap.py"),
        "weight_decay": weight_decay_hyper(0.01, "authors' soap.py"),
        "precondition_frequency": Hyper(10, Interval(1, integer=True), "authors' soap.py"),
        "max_precond_dim": Hyper(10000, Interval(1, integer=True), "authors' soap.py"),
        "merge_dims": Hyper(False, Flag(), "authors' soap.py"),
        "precondition_1d": Hyper(False, Flag(), "authors' soap.py"),
        "normalize_grads": Hyper(False, Flag(), "authors' soap.py"),
        "correct_bias": Hyper(True, Flag(), "authors' soap.py"),
        "matmul_precision": Hyper(
            "fp32",
            Choice(SOAP_PRECISIONS),
            "fp32: the authors'; tf32, bf16: optimkit's options",
        ),
        "qr_method": Hyper(
            "gram_schmidt",
            Choice(QR_METHODS),
            "gram_schmidt, cholesky: optimkit's (the same Q factor from matrix products); "
            "householder: the authors' torch.linalg.qr",
        ),
        "qr_fp64": Hyper(
            True,
            Flag(),
            "optimkit's: the first factorisation of the cholesky/gram_schmidt QR in float64 "
            "(False: at matmul_precision, for GPUs with slow float64)",
        ),
        "maximize": MAXIMIZE,
    }
    impls = ("reference",)
    supports_complex = False
    weight_decay_mode = None  # applied after the step, as the authors do

    # ------------------------------------------------------------------------------------
    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        r"""Bytes/element at the reference shapes [64x48, 48] (the battery's):
        :math:`(s\,(2N + \sum_k n_k^2) + q \sum_k n_k^2) / N` over the preconditioned axes
        (``s`` = 4 for fp32 and for bf16/fp16, whose state is fp32; ``q`` the bases' bytes,
        :func:`bases_dtype`: ``s``, or 2 at ``matmul_precision="bf16"``)."""
        full = cls.with_defaults(hp)
        state = torch.promote_types(dtype, torch.float32)
        itemsize = torch.empty((), dtype=state).element_size()
        basis_size = torch.empty((), dtype=bases_dtype(full["matmul_precision"], state))
        basis_size = basis_size.element_size()
        total = 0.0
        numel = 0
        for shape in REFERENCE_SHAPES:
            n = 1
            for size in shape:
                n *= size
            numel += n
            squares = sum(k * k for k in cls._preconditioned_sizes(shape, full))
            total += (2 * n + squares) * itemsize + squares * basis_size
        return total / numel

    @classmethod
    def _preconditioned_sizes(cls, shape: tuple[int, ...], hp: Mapping[str, Any]) -> list[int]:
        """Sizes of the preconditioned axes of a parameter shape (identity elsewhere)."""
        if hp["merge_dims"] and len(shape) > 1:
            shape = soap_merged_shape(shape, hp["max_precond_dim"])
        return [shape[k] for k in cls._preconditioned_axes(shape, hp)]

    @staticmethod
    def _preconditioned_axes(shape: tuple[int, ...], hp: Mapping[str, Any]) -> list[int]:
        """Axes of the work (merged) shape that get a statistic and an eigenbasis."""
        limit = hp["max_precond_dim"]
        if len(shape) == 1 and not hp["precondition_1d"]:
            return []
        return [k for k, size in enumerate(shape) if size <= limit]

    @staticmethod
    def _work_shape(param: Tensor, hp: Mapping[str, Any]) -> tuple[int, ...]:
        shape = tuple(param.shape)
        if hp["merge_dims"] and len(shape) > 1:
            return soap_merged_shape(shape, hp["max_precond_dim"])
        return shape

    @staticmethod
    def _axes(state: Mapping[str, Any], rank: int) -> list[int]:
        return [k for k in range(rank) if f"Q{k}" in state]

    def state_dtype(self, key: str, param: Tensor) -> torch.dtype:
        """Statistics, bases and moments are kept in at least fp32, also for bf16 weights; the
        bases ``Q{k}`` of a group at ``matmul_precision="bf16"`` in bf16
        (:func:`bases_dtype`)."""
        dtype = torch.promote_types(param.dtype, torch.float32)
        if key.startswith("Q") and key[1:].isdigit():
            group = self.param_group_index().get(id(param))
            if group is not None:
                return bases_dtype(group.get("matmul_precision", "fp32"), dtype)
        return dtype

    def _upgrade_state(self, state: dict[str, Any]) -> None:
        super()._upgrade_state(state)
        state.setdefault("root_failures", 0)

    # ------------------------------------------------------------------------------------
    def _record_failures(self, state: dict, count: int) -> None:
        state["root_failures"] = state.get("root_failures", 0) + count
        if not getattr(self, "_warned_root_failure", False):
            self._warned_root_failure = True
            warnings.warn(
                "SOAP: an eigendecomposition/QR of a preconditioner failed or was not finite; "
                "the previous eigenbasis is kept (counted in state['root_failures'])",
                RuntimeWarning,
                stacklevel=4,
            )

    def _step_group(self, group: dict[str, Any]) -> None:
        hp = self.group_hyperparams(group)
        shampoo_beta = hp["shampoo_beta"] if hp["shampoo_beta"] >= 0 else hp["betas"][1]
        new: dict[tuple, list[Tensor]] = {}
        keyed: dict[tuple, list[Tensor]] = {}
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("SOAP does not support sparse gradients")
            state = self.state[p]
            dtype = torch.promote_types(p.dtype, torch.float32)
            shape = self._work_shape(p, hp)
            fresh = "step" not in state
            if fresh:
                axes = tuple(self._preconditioned_axes(shape, hp))
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
            else:
                axes = tuple(self._axes(state, len(shape)))
            q_dtype = bases_dtype(hp["matmul_precision"], dtype)
            for k in () if fresh else axes:  # made at another precision (or replaced): convert
                if state[f"Q{k}"].dtype != q_dtype:
                    state[f"Q{k}"] = state[f"Q{k}"].to(q_dtype)
            state["step"] += 1
            s = int(state["step"].item()) - 1  # the authors' step counter
            # parameters stepped together: same shapes and dtypes, and at the same step
            key = (tuple(p.shape), shape, axes, dtype, p.dtype, grad.dtype, p.device)
            if fresh:
                new.setdefault(key, []).append(p)
            keyed.setdefault((*key, s), []).append(p)
        for (p_shape, shape, axes, dtype, *_, device), params in new.items():
            q_dtype = bases_dtype(hp["matmul_precision"], dtype)
            for chunk in _chunks(params, math.prod(p_shape)):
                self._new_bucket(chunk, shape, axes, dtype, device, q_dtype)
        # eigenproblems to solve in batch: (size, kind) -> [(bucket, axis)]
        requests: dict[tuple, list[tuple[_Bucket, int]]] = {}
        rotations: list[tuple[_Bucket, Tensor]] = []
        for (p_shape, shape, axes, dtype, *_, s), params in keyed.items():
            for chunk in _chunks(params, math.prod(p_shape)):
                bucket = self._bucket(chunk, shape, axes)
                self._step_bucket(bucket, dtype, s, shampoo_beta, hp, requests, rotations)
        precision = refresh_precision(hp["matmul_precision"])
        self._refresh_bases(requests, precision, hp["qr_method"], hp["qr_fp64"])
        for bucket, exp_avg_original in rotations:  # bf16 at "bf16", with the bf16 bases
            bucket.exp_avg().copy_(bucket.project(exp_avg_original, False, precision))

    def _step_bucket(
        self,
        bucket: _Bucket,
        dtype: torch.dtype,
        s: int,
        shampoo_beta: float,
        hp: Mapping[str, Any],
        requests: dict[tuple, list[tuple[_Bucket, int]]],
        rotations: list[tuple[_Bucket, Tensor]],
    ) -> None:
        """One step of the bucket's parameters (all at the authors' step ``s``), every product
        batched over the bucket."""
        precision = hp["matmul_precision"]
        beta1, beta2 = hp["betas"]
        grads = [p.grad.reshape(bucket.shape) for p in bucket.params]
        # bf16 products: the gradient, the bases and the direction as bf16 operands
        half = precision == "bf16" and bool(bucket.axes) and dtype == torch.float32
        if half:
            g = torch.empty(
                (len(grads), *bucket.shape), dtype=torch.bfloat16, device=grads[0].device
            )
            for slot, grad in zip(g.unbind(0), grads):
                slot.copy_(grad)  # one pass: read fp32 (or the gradient's dtype), write bf16
        else:  # fp64 state, or no product: nothing takes bf16 operands
            precision = refresh_precision(precision)
            g = (grads[0].unsqueeze(0) if len(grads) == 1 else torch.stack(grads)).to(dtype)
        if hp["maximize"]:
            g = -g
        if s == 0:  # first call: initialise the preconditioner only
            for k in bucket.axes:
                accumulate_gram_(
                    bucket.stacks[f"GG{k}"], g, k, shampoo_beta, 1 - shampoo_beta, precision
                )
                requests.setdefault((bucket.shape[k], "eigh"), []).append((bucket, k))
            return
        exp_avg, exp_avg_sq = bucket.exp_avg(), bucket.exp_avg_sq()
        rotated = bucket.project(g, False, precision)
        if half:
            out = torch.empty(rotated.shape, dtype=torch.bfloat16, device=rotated.device)
        else:
            out = None if rotated is g else rotated  # g may be a view of a parameter's .grad
        direction = adam_direction(rotated, exp_avg, exp_avg_sq, beta1, beta2, hp["eps"], out)
        step_size = hp["lr"]
        if hp["correct_bias"]:
            step_size = step_size * (1 - beta2**s) ** 0.5 / (1 - beta1**s)
        decay = hp["lr"] * hp["weight_decay"]
        if not hp["normalize_grads"] and bucket.update_in_last_product(dtype):
            bucket.project_back_into_params(direction, precision, step_size, decay)
        else:
            norm_grad = bucket.project(direction, True, precision)
            if hp["normalize_grads"]:
                rms = norm_grad.square().reshape(len(norm_grad), -1).mean(1).sqrt()
                norm_grad = norm_grad / (1e-30 + rms).reshape(-1, *[1] * len(bucket.shape))
            _apply(bucket.params, norm_grad, step_size, decay)
        refresh = s % hp["precondition_frequency"] == 0 and bool(bucket.axes)
        if refresh:  # the first moment back from the old eigenbasis, into the new one later
            if half:  # bf16 operands, as the regular step's rotations
                moment = exp_avg.to(torch.bfloat16)
                exp_avg_back = bucket.project(moment, True, precision, torch.bfloat16)
            else:
                exp_avg_back = bucket.project(exp_avg, True, precision)
            rotations.append((bucket, exp_avg_back))
        del direction
        # update_preconditioner: statistics, then (every f steps) a new basis
        for k in bucket.axes:
            accumulate_gram_(
                bucket.stacks[f"GG{k}"], g, k, shampoo_beta, 1 - shampoo_beta, precision
            )
        if refresh:
            for k in bucket.axes:
                requests.setdefault((bucket.shape[k], "qr"), []).append((bucket, k))

    def _new_bucket(
        self,
        params: list[Tensor],
        shape: tuple[int, ...],
        axes: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        q_dtype: torch.dtype,
    ) -> None:
        """Fresh state of same-shaped parameters, allocated as the stacks of one bucket (the
        bases in ``q_dtype``, :func:`bases_dtype`)."""
        count = len(params)
        stacks = {
            "exp_avg": torch.zeros(count, *params[0].shape, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(count, *params[0].shape, dtype=dtype, device=device),
        }
        for k in axes:
            n = shape[k]
            stacks[f"GG{k}"] = torch.zeros(count, n, n, dtype=dtype, device=device)
            eye = torch.eye(n, dtype=q_dtype, device=device)
            stacks[f"Q{k}"] = eye.expand(count, n, n).contiguous()
        for i, p in enumerate(params):
            state = self.state[p]
            state["root_failures"] = 0
            state.update({key: stack[i] for key, stack in stacks.items()})
        if count > 1:
            self._remember(_Bucket.of(params, [self.state[p] for p in params], shape, axes, stacks))

    def _bucket(
        self, params: list[Tensor], shape: tuple[int, ...], axes: tuple[int, ...]
    ) -> _Bucket:
        """The bucket of ``params``: the remembered one while every state entry is still its
        view; else built by stacking the entries (after a checkpoint was loaded, or when the
        members changed); one parameter alone is a bucket of one (views of its own state)."""
        states = [self.state[p] for p in params]
        if len(params) == 1:
            return _Bucket.single(params[0], states[0], shape, axes)
        cache: dict = self.__dict__.setdefault("_soap_buckets", {})
        bucket = cache.get(tuple(map(id, params)))
        if bucket is not None and bucket.valid(states):
            return bucket
        self._release(params)
        stacks = {}
        for key in _state_keys(axes):  # one entry at a time: the copy's temporary is one stack
            stacks[key] = torch.stack([state[key] for state in states])
            for i, state in enumerate(states):
                state[key] = stacks[key][i]
        bucket = _Bucket.of(params, states, shape, axes, stacks)
        self._remember(bucket)
        return bucket

    def _remember(self, bucket: _Bucket) -> None:
        cache: dict = self.__dict__.setdefault("_soap_buckets", {})
        cache[tuple(map(id, bucket.params))] = bucket

    def _release(self, params: list[Tensor]) -> None:
        """Forget the remembered buckets that hold any of ``params``; their other members get
        state of their own (copies), so that no stack outlives its bucket."""
        cache: dict = self.__dict__.setdefault("_soap_buckets", {})
        members = set(map(id, params))
        for key in [key for key in cache if members.intersection(key)]:
            old = cache.pop(key)
            for p, state in zip(old.params, old.states):
                if id(p) in members:
                    continue
                for name, stack in old.stacks.items():
                    entry = state.get(name)
                    if entry is not None and entry.untyped_storage().data_ptr() == (
                        stack.untyped_storage().data_ptr()
                    ):
                        state[name] = entry.clone()

    def update_blocks(
        self,
        kind: str,
        stats: Tensor,
        bases: Tensor,
        precision: str = "fp32",
        qr_method: str = "gram_schmidt",
        qr_fp64: bool = True,
    ) -> tuple[Tensor, ...]:
        """New eigenbases for a stack of same-sized statistics (one independent problem per
        matrix: the seam where the work can be spread across ranks)."""
        if kind == "eigh":
            q, ok = eigenbasis_eigh(stats)
            order = torch.arange(stats.size(-1), device=stats.device).expand(stats.shape[:-1])
            return q, order, ok
        return eigenbasis_power_qr(
            stats, bases, precision, qr_method, self.refresh_counts, factor_in_fp64=qr_fp64
        )

    def _refresh_bases(
        self,
        requests: Mapping[tuple, list[tuple[_Bucket, int]]],
        precision: str = "fp32",
        qr_method: str = "gram_schmidt",
        qr_fp64: bool = True,
    ) -> None:
        for (_, kind), entries in requests.items():
            stats = _concat([bucket.stacks[f"GG{k}"] for bucket, k in entries])
            bases = _concat([bucket.stacks[f"Q{k}"] for bucket, k in entries])
            bases = bases.to(stats.dtype)  # bf16 bases: the refresh starts from fp32 copies
            q, order, ok = self.update_blocks(kind, stats, bases, precision, qr_method, qr_fp64)
            ok_list = ok.tolist()  # one host read per size
            start = 0
            for bucket, k in entries:
                count = len(bucket.params)
                good = ok_list[start : start + count]
                target = bucket.stacks[f"Q{k}"]
                if all(good):
                    target.copy_(q[start : start + count])
                exp_avg_sq = bucket.exp_avg_sq()
                for i, state in enumerate(bucket.states):
                    if not good[i]:
                        self._record_failures(state, 1)
                        continue
                    if not all(good):
                        target[i].copy_(q[start + i])
                    if kind == "qr":  # exp_avg_sq follows the new order of the columns
                        v = exp_avg_sq[i]
                        v.copy_(v.index_select(k, order[start + i]))
                start += count
