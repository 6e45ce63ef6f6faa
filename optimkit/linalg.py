"""Matrix functions shared by the shape-aware optimizers (Muon, AuON, SOAP, Shampoo).

Every function takes a *stack* of matrices ``(..., n, n)`` (or ``(..., m, n)``) so that
same-shaped blocks are processed by one batched ``torch.linalg`` call, never a Python loop.
Functions that can fail numerically return, next to their result, a boolean mask ``ok`` of
shape ``(...)``: ``False`` where the factorisation raised or produced a non-finite value. The
callers keep the previous preconditioner for those matrices (a failed root never reaches the
weights) and count the failures.

* :func:`newton_schulz5`: the quintic Newton-Schulz iteration of Muon (K. Jordan et al.).
* :func:`inverse_root_eigh`: :math:`(A + \\epsilon\\lambda_{max} I)^{-1/p}` by ``eigh``.
* :func:`inverse_root_coupled_newton`: the same root by the coupled Newton iteration of
  Guo & Higham (2006), eq. 3.2, as in the Shampoo authors' code (``ComputePower``).
* :func:`eigenbasis_eigh`: eigenvectors, largest eigenvalue first (SOAP's initial basis).
* :func:`eigenbasis_power_qr`: SOAP's warm-started refresh: one power-iteration step then QR.
* :func:`matmul` / :func:`tf32_round`: matrix products at a chosen precision ("fp32" or
  "tf32": inputs rounded to TF32's 10-bit mantissa, fp32 accumulation; on CUDA by the tensor
  cores, on the CPU emulated by rounding the inputs); :func:`matmul_accumulate_`: ``out =
  beta out + alpha a @ b`` in place, one GEMM on CUDA; :func:`accumulate_gram_`: a Kronecker
  statistic :math:`\\beta S + w\\,X_{(k)}X_{(k)}^\\top` of SOAP and Shampoo, the same way.
* :func:`batched_qr`: ``torch.linalg.qr`` of a stack, on CUDA spread over a few streams (the
  solver's per-matrix kernels leave most of a large GPU idle).
* :func:`cholesky_qr2`: the same Q factor from matrix products (column-equilibrated CholeskyQR
  done twice, blocked), at the matmul rate instead of the solver's; it reports the matrices it
  cannot factor so that the caller can fall back to :func:`batched_qr`.
* :func:`block_gram_schmidt_qr`: the same Q factor by block Gram-Schmidt with
  reorthogonalisation (BCGS2), nearly all of it matrix products at the requested precision;
  SOAP's default refresh QR (``qr_method="gram_schmidt"``), with :func:`cholesky_qr2` then
  :func:`batched_qr` for the matrices it cannot factor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from optimkit.kernels import triton_on

__all__ = [
    "NS5_COEFFICIENTS",
    "newton_schulz5",
    "symmetric_eigh",
    "inverse_root_eigh",
    "inverse_root_coupled_newton",
    "eigenbasis_eigh",
    "eigenbasis_power_qr",
    "all_finite",
    "matmul",
    "matmul_accumulate_",
    "accumulate_gram_",
    "tf32_round",
    "half_matmul",
    "batched_qr",
    "cholesky_qr2",
    "block_gram_schmidt_qr",
    "QR_METHODS",
]

#: precisions of :func:`matmul`.
MATMUL_PRECISIONS = ("fp32", "tf32")
#: methods of :func:`eigenbasis_power_qr`'s QR.
QR_METHODS = ("gram_schmidt", "cholesky", "householder")
#: block size of :func:`cholesky_qr2`'s blocked Cholesky factorisation and triangular solve
#: (H200, TF32: 256 is as fast as 512 on 5504-column matrices and 18% faster on 2048).
CHOLESKY_BLOCK = 256
#: statistics of at least this many rows are accumulated by :func:`accumulate_gram_` by block
#: rows on and right of the diagonal, then mirrored; blocks of :data:`GRAM_ROW_BLOCK` rows.
GRAM_SYMMETRIC_MIN = 1024
GRAM_ROW_BLOCK = 512
#: whether :func:`accumulate_gram_` may mirror a statistic by the Triton kernel
#: :func:`optimkit.kernels.mirror.mirror_upper_` on CUDA (tests switch it off to compare).
FUSED_MIRROR = True
#: column block of :func:`block_gram_schmidt_qr`: :data:`GRAM_SCHMIDT_BLOCK`, and
#: :data:`GRAM_SCHMIDT_WIDE_BLOCK` for matrices of at least :data:`GRAM_SCHMIDT_WIDE` columns
#: (H100, TF32, the statistics of a training-like run: 128 is the fastest for 2048 columns,
#: 256 for 5504: its projections are thin products, memory-bound at 128).
GRAM_SCHMIDT_BLOCK = 128
GRAM_SCHMIDT_WIDE = 4096
GRAM_SCHMIDT_WIDE_BLOCK = 256
#: :func:`block_gram_schmidt_qr` projects a panel once more where a lower bound of the
#: smallest singular value of its second projection is below this (its columns had unit
#: norm), at most :data:`GRAM_SCHMIDT_EXTRA_PASSES` times.
GRAM_SCHMIDT_KEPT_MIN = 2**-0.5
GRAM_SCHMIDT_EXTRA_PASSES = 2
#: whether :func:`block_gram_schmidt_qr` at TF32 on CUDA runs the projections of matrices of
#: at least :data:`GRAM_SCHMIDT_WIDE` columns as fp16 products with fp32 accumulation
#: (:func:`_half_projections`; tests switch it off).
HALF_PROJECTIONS = True
#: whether :func:`_max_eigenvalue_power_iteration` runs on CUDA as the Triton kernel
#: :func:`optimkit.kernels.power_iteration.max_eigenvalue_power_iteration` (one program per
#: matrix, the matrix read once) where it takes the stack (tests switch it off to compare).
FUSED_POWER_ITERATION = True
_HALF_DTYPES = (torch.float16, torch.bfloat16)
#: whether :func:`matmul_accumulate_` with 16-bit operands and a float32 ``out`` on CUDA
#: runs one ``addmm``/``baddbmm`` with ``out_dtype=float32`` whose output is its input
#: (``out`` read and written in the GEMM's epilogue) instead of a product and an update.
HALF_ACCUMULATE_IN_PLACE = True
_QR_STREAMS = 4

#: quintic Newton-Schulz coefficients (a, b, c) of Muon (K. Jordan's reference ``muon.py``).
NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def tf32_round(x: Tensor) -> Tensor:
    """fp32 values rounded (to nearest, ties to even) to TF32's 10-bit mantissa, as fp32."""
    bits = x.float().contiguous().view(torch.int32)
    rounded = (bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x.float())


def matmul(a: Tensor, b: Tensor, precision: str = "fp32") -> Tensor:
    """``a @ b`` at ``precision``: "fp32" (TF32 off) or "tf32" (TF32 inputs, fp32
    accumulation: the tensor cores on CUDA, emulated on other devices). Other dtypes (e.g.
    float64) are multiplied as they are."""
    _check_precision(precision)
    if precision == "fp32" or a.dtype != torch.float32:
        if a.is_cuda and torch.backends.cuda.matmul.allow_tf32:
            with _tf32(False):
                return a @ b
        return a @ b
    if a.is_cuda:
        with _tf32(True):
            return a @ b
    return tf32_round(a) @ tf32_round(b)


def _check_precision(precision: str) -> None:
    if precision not in MATMUL_PRECISIONS:
        raise ValueError(f"precision must be one of {MATMUL_PRECISIONS}, got {precision!r}")


def matmul_accumulate_(
    out: Tensor, a: Tensor, b: Tensor, beta: float, alpha: float, precision: str = "fp32"
) -> Tensor:
    """``out = beta * out + alpha * (a @ b)`` in place, the product at ``precision``
    (:func:`matmul`); on CUDA one GEMM that reads and writes ``out`` in its epilogue
    (``addmm_`` / ``baddbmm_``), with no temporary product. ``out`` may be a strided view;
    with ``beta == 0`` it is not read (it may hold garbage, as BLAS allows). 16-bit ``a`` and
    ``b`` (:func:`half_matmul`'s operands) with a float32 ``out`` (``precision`` is then
    ignored) take their product with fp32 accumulation: on CUDA the same one GEMM
    (``addmm``/``baddbmm`` with ``out_dtype=float32``, ``out`` as both input and output) where
    :data:`HALF_ACCUMULATE_IN_PLACE`, else the product then the update."""
    half = a.dtype in _HALF_DTYPES and out.dtype == torch.float32
    if not half:
        _check_precision(precision)
    one_gemm = a.is_cuda and out.dim() in (2, 3) and (HALF_ACCUMULATE_IN_PLACE or not half)
    if not one_gemm:  # the product, then the update
        product = half_matmul(a, b) if half else matmul(a, b, precision)
        if beta == 0:  # as BLAS: ``out`` is not read (a NaN in it is not propagated)
            return out.copy_(product if alpha == 1 else product.mul_(alpha))
        return out.mul_(beta).add_(product, alpha=alpha)
    if half:
        gemm = torch.addmm if out.dim() == 2 else torch.baddbmm
        return gemm(out, a, b, beta=beta, alpha=alpha, out_dtype=torch.float32, out=out)
    with _tf32(precision == "tf32" and a.dtype == torch.float32):
        if out.dim() == 2:
            return out.addmm_(a, b, beta=beta, alpha=alpha)
        return out.baddbmm_(a, b, beta=beta, alpha=alpha)


def accumulate_gram_(
    statistic: Tensor, x: Tensor, dim: int, beta: float, weight: float, precision: str = "fp32"
) -> Tensor:
    r""":math:`S \leftarrow \beta S + w\,X_{(k)} X_{(k)}^\top` in place, where
    :math:`X_{(k)}` is the mode-``dim`` unfolding of ``x`` (the Kronecker-factor statistic of
    Shampoo and SOAP); one GEMM on CUDA (:func:`matmul_accumulate_`). A stack of statistics
    ``(b, n, n)`` takes ``x`` of shape ``(b, ...)``, ``dim`` counting the axes of ``x[j]``: one
    batched GEMM. The unfolding is a view of ``x`` (no copy) for its first and last axis.
    From :data:`GRAM_SYMMETRIC_MIN` rows on, only the blocks of :data:`GRAM_ROW_BLOCK` rows on
    and right of the diagonal are multiplied (about half the products of the full matrix) and
    the rest is their mirror image, so :math:`S` is exactly symmetric: on CUDA the whole
    strict lower triangle is copied from the upper one by one Triton kernel
    (:func:`optimkit.kernels.mirror.mirror_upper_`), elsewhere the blocks below the diagonal
    blocks by transposed copies."""
    batch = statistic.dim() - 2
    if batch and len(statistic) == 1:  # a stack of one: the plain product (the same rounding)
        accumulate_gram_(statistic[0], x[0], dim, beta, weight, precision)
        return statistic
    axis = dim + batch
    unfolded = torch.movedim(x, axis, batch).reshape(*x.shape[:batch], x.shape[axis], -1)
    n = statistic.size(-1)
    if n < GRAM_SYMMETRIC_MIN:
        return matmul_accumulate_(statistic, unfolded, unfolded.mT, beta, weight, precision)
    kernel = _mirror_kernel_takes(statistic)
    for start in range(0, n, GRAM_ROW_BLOCK):  # block rows on and right of the diagonal
        stop = min(start + GRAM_ROW_BLOCK, n)
        rows, columns = unfolded[..., start:stop, :], unfolded[..., start:, :]
        matmul_accumulate_(
            statistic[..., start:stop, start:], rows, columns.mT, beta, weight, precision
        )
        if stop < n and not kernel:  # mirrored below the diagonal: S stays exactly symmetric
            statistic[..., stop:, start:stop].copy_(statistic[..., start:stop, stop:].mT)
    if kernel:  # the whole strict lower triangle at once, from the upper one
        from optimkit.kernels.mirror import mirror_upper_

        mirror_upper_(statistic)
    return statistic


def _mirror_kernel_takes(statistic: Tensor) -> bool:
    """Whether :func:`accumulate_gram_` mirrors ``statistic`` by the Triton kernel (CUDA, a
    contiguous stack, Triton importable)."""
    return statistic.is_contiguous() and triton_on(FUSED_MIRROR, statistic)


class _tf32:
    """Set ``torch.backends.cuda.matmul.allow_tf32`` inside the block, restore it after."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc: object) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self.saved


class _half_reductions:
    """Set ``torch.backends.cuda.matmul.allow_{fp16,bf16}_reduced_precision_reduction``
    inside the block (False: a 16-bit product's split-K partial sums stay fp32), restore
    them after."""

    _FLAGS = ("allow_fp16_reduced_precision_reduction", "allow_bf16_reduced_precision_reduction")

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        settings = torch.backends.cuda.matmul
        self.saved = [getattr(settings, flag) for flag in self._FLAGS]
        for flag in self._FLAGS:
            setattr(settings, flag, self.enabled)

    def __exit__(self, *exc: object) -> None:
        for flag, value in zip(self._FLAGS, self.saved):
            setattr(torch.backends.cuda.matmul, flag, value)


def batched_qr(stack: Tensor) -> Tensor:
    """The Q factor of each matrix of a stack ``(k, m, n)``: ``torch.linalg.qr`` per matrix,
    on CUDA over a few streams at once (one matrix's factorisation uses a fraction of the GPU;
    measured on an H100: 2.1x faster for 2048 x 2048 matrices, 1.4x for 5504 x 5504). The
    same results as one batched call."""
    if not stack.is_cuda or stack.dim() != 3 or stack.shape[0] < 2:
        return torch.linalg.qr(stack)[0]
    current = torch.cuda.current_stream(stack.device)
    streams = [torch.cuda.Stream(stack.device) for _ in range(min(_QR_STREAMS, len(stack)))]
    out = torch.empty_like(stack)
    for stream in streams:
        stream.wait_stream(current)
    for i in range(len(stack)):
        stream = streams[i % len(streams)]
        with torch.cuda.stream(stream):
            q, _ = torch.linalg.qr(stack[i])
            out[i].copy_(q)
            stack.record_stream(stream)
            out.record_stream(stream)
    for stream in streams:
        current.wait_stream(stream)
    return out


def _orthogonality_tolerance(dtype: torch.dtype, precision: str) -> float:
    """Largest accepted probe error of :func:`cholesky_qr2`'s result (see there)."""
    if dtype == torch.float64:
        return 1e-10
    return 2e-2 if precision == "tf32" else 1e-4


def _gram_upper(y: Tensor, precision: str, block: int) -> Tensor:
    r""":math:`Y^\top Y` on and above its diagonal blocks of ``block`` columns, by block rows
    (half the products of the full matrix); the blocks below are left unset."""
    n = y.size(-1)
    gram = y.new_empty(*y.shape[:-2], n, n)
    for start in range(0, n, block):
        stop = min(start + block, n)
        row = gram[..., start:stop, start:]
        matmul_accumulate_(row, y[..., start:stop].mT, y[..., start:], 0.0, 1.0, precision)
    return gram


def _blocked_cholesky_(
    gram: Tensor, precision: str, block: int
) -> tuple[list[Tensor], list[Tensor], Tensor]:
    r"""Upper Cholesky factor :math:`C = R^\top R` of a stack, right-looking by blocks of
    ``block`` columns: the diagonal blocks by :func:`_inverse_upper_cholesky`, the panels and the
    trailing updates by matrix products at ``precision``. Only the diagonal blocks and those
    above them are read and updated (:func:`_gram_upper`'s part). ``gram`` is overwritten (it
    holds the trailing matrices). Returns ``(panels, inverses, ok)``: the off-diagonal block
    rows :math:`R_{j, j+1:}`, the inverses of the diagonal blocks :math:`R_{jj}^{-1}`, and
    ``ok``, False where a diagonal block was not positive definite."""
    n = gram.size(-1)
    ok = torch.ones(gram.shape[:-2], dtype=torch.bool, device=gram.device)
    panels, inverses = [], []
    for start in range(0, n, block):
        stop = min(start + block, n)
        inverse, factored = _inverse_upper_cholesky(gram[..., start:stop, start:stop])
        ok &= factored
        inverses.append(inverse)
        if stop < n:
            panel = matmul(inverse.mT, gram[..., start:stop, stop:], precision)
            panels.append(panel)
            for row in range(stop, n, block):  # trailing -= panel^T panel, upper blocks
                end, offset = min(row + block, n), row - stop
                matmul_accumulate_(
                    gram[..., row:end, row:],
                    panel[..., offset : offset + end - row].mT,
                    panel[..., offset:],
                    1.0,
                    -1.0,
                    precision,
                )
    return panels, inverses, ok


def _solve_upper_right_(
    x: Tensor, panels: list[Tensor], inverses: list[Tensor], precision: str, block: int
) -> Tensor:
    r""":math:`X \leftarrow X R^{-1}` in place for the upper-triangular :math:`R` of
    :func:`_blocked_cholesky_` (its panels and inverted diagonal blocks), by column blocks,
    every piece a matrix product."""
    n = x.size(-1)
    for index, start in enumerate(range(0, n, block)):
        stop = min(start + block, n)
        solved = matmul(x[..., start:stop], inverses[index], precision)
        x[..., start:stop] = solved
        if stop < n:
            matmul_accumulate_(x[..., stop:], solved, panels[index], 1.0, -1.0, precision)
    return x


def _cholesky_qr_pass_(
    y: Tensor, precision: str, block: int, factor_in_fp64: bool = False
) -> tuple[Tensor, Tensor]:
    """One CholeskyQR pass, overwriting ``y`` with :math:`Y R^{-1}`, :math:`R^\top R = Y^\top
    Y`. ``factor_in_fp64``: the Gram matrix and its Cholesky factorisation in float64 (the
    factor's blocks are then rounded to ``y``'s dtype for the solve at ``precision``).
    Returns ``(y, ok)``."""
    if factor_in_fp64 and y.dtype != torch.float64:
        gram = _gram_upper(y.double(), precision, block)
        panels, inverses, ok = _blocked_cholesky_(gram, precision, block)
        panels = [panel.to(y.dtype) for panel in panels]
        inverses = [inverse.to(y.dtype) for inverse in inverses]
        precision = "fp32"  # the solve: its error grows as kappa(Y) u, TF32's u is too coarse
    else:
        gram = _gram_upper(y, precision, block)
        panels, inverses, ok = _blocked_cholesky_(gram, precision, block)
    return _solve_upper_right_(y, panels, inverses, precision, block), ok


def cholesky_qr2(
    stack: Tensor,
    precision: str = "fp32",
    block: int | None = None,
    factor_in_fp64: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""The Q factor of the QR decomposition of each square matrix of a stack, from matrix
    products: CholeskyQR2 (Fukaya et al. 2014) on the column-equilibrated matrix.

    .. math::
        \hat Y = Y D^{-1},\ D = \mathrm{diag}(\|y_j\|),\qquad
        \hat Y^\top \hat Y = R_1^\top R_1,\ Q_1 = \hat Y R_1^{-1},\qquad
        Q_1^\top Q_1 = R_2^\top R_2,\ Q = Q_1 R_2^{-1}

    :math:`Y = Q (R_2 R_1 D)` with an upper-triangular factor of positive diagonal, so
    :math:`Q` is :math:`Y`'s Q factor exactly, up to the signs of its columns (Householder's
    ``torch.linalg.qr`` may flip some; an eigenbasis does not care). Scaling the columns is
    exact and makes a warm-started power-iteration product (:math:`A Q`, nearly :math:`Q
    \Lambda`) well conditioned; the second pass restores orthogonality lost to the first. The
    Cholesky factorisations and the triangular solves are blocked (``block`` columns), so
    nearly all of the work is matrix products at ``precision`` (:func:`matmul`), at the GPU's
    matmul rate rather than a QR solver's.

    Returns ``(Q, ok)``. ``ok`` is False where a factorisation was not positive definite (a
    rank-deficient or too ill-conditioned :math:`Y`), the result is not finite, or a probe
    :math:`\|Q^\top Q z - z\|_\infty / \|z\|_\infty` with four fixed random vectors
    :math:`z` exceeds 1e-4 (fp32; 2e-2 at TF32, 1e-10 in fp64): the caller should take
    Householder's QR for those matrices. ``block``: default :data:`CHOLESKY_BLOCK`.

    ``factor_in_fp64`` (default True): the first pass's Gram matrix and Cholesky factorisation
    in float64 (a float64 copy of the stack), its solve in fp32 even at TF32 (its error
    grows as :math:`\kappa u`); the second pass, whose input is nearly orthogonal, stays at
    ``precision``. CholeskyQR fails once :math:`\kappa(\hat Y)^2 u \gtrsim 1` for the unit
    roundoff :math:`u` of its Gram matrix: about :math:`\kappa \gtrsim 10^3` at TF32,
    which the power-iteration products of stale bases reach in training, so without it most
    TF32 refreshes fell back to Householder (``optimkit bench speed-matrix --spectrum
    decaying`` counts the fallbacks). Float64 products run at the fp32 rate on data-centre
    GPUs (H100's fp64 tensor cores) but far slower on consumer GPUs: pass False there."""
    block = CHOLESKY_BLOCK if block is None else block
    y, ok = _equilibrate_columns(stack)
    q, ok1 = _cholesky_qr_pass_(y, precision, block, factor_in_fp64)
    q, ok2 = _cholesky_qr_pass_(q, precision, block)
    return q, ok & ok1 & ok2 & _orthogonal(q, precision)


def _equilibrate_columns(stack: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`\hat Y = Y D^{-1}`, :math:`D = \mathrm{diag}(\|y_j\|)`, a new tensor (a zero
    column stays zero), and ``ok``: False for a matrix with a zero or non-finite column (a
    non-finite entry makes its column's norm non-finite: no separate pass over the stack)."""
    norms = torch.linalg.vector_norm(stack, dim=-2, keepdim=True)
    ok = ((norms > 0) & torch.isfinite(norms)).flatten(-2).all(-1)
    return stack / torch.where(norms > 0, norms, torch.ones_like(norms)), ok


def _panel_cholesky_qr_(panel: Tensor, precision: str) -> tuple[Tensor, Tensor]:
    r"""One CholeskyQR pass on a tall panel ``(..., n, b)`` in place, :math:`W \leftarrow W
    R^{-1}` with :math:`R^\top R = W^\top W`: at ``precision``, or, for ``"fp64"``, its Gram
    matrix, Cholesky factor and product in float64 (:math:`4 n b^2` FLOPs). Returns ``(ok,
    inverse)``: ``ok`` False where the Cholesky factorisation failed, and :math:`R^{-1}`."""
    work = panel.double() if precision == "fp64" else panel
    product = "fp32" if precision == "fp64" else precision
    inverse, ok = _inverse_upper_cholesky(matmul(work.mT, work, product))
    panel.copy_(matmul(work, inverse, product))
    return ok, inverse


def _smallest_singular_value_bound(inverse: Tensor) -> Tensor:
    r"""A lower bound of :math:`\sigma_{min}(W)` from the inverse factor :math:`R^{-1}` of
    :math:`W = QR`: :math:`1/\sqrt{\|R^{-1}\|_1 \|R^{-1}\|_\infty}`, since
    :math:`\|R^{-1}\|_2 \le \sqrt{\|R^{-1}\|_1 \|R^{-1}\|_\infty}` (by how much the
    normalisation :math:`W R^{-1}` can amplify an error of :math:`W`); 0 where not finite."""
    magnitude = inverse.abs()
    gain = (magnitude.sum(-2).amax(-1) * magnitude.sum(-1).amax(-1)).sqrt()
    return torch.nan_to_num(1 / gain, nan=0.0).to(torch.float32)


def _inverse_upper_cholesky(gram: Tensor) -> tuple[Tensor, Tensor]:
    r""":math:`R^{-1}` for the upper Cholesky factor :math:`R^\top R = G` of each matrix of a
    stack (only the upper triangle of :math:`G` is read), and ``ok``: False where :math:`G` is
    not numerically positive definite (``cholesky_ex``'s ``info``)."""
    factor, info = torch.linalg.cholesky_ex(gram, upper=True)
    eye = torch.eye(gram.size(-1), dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve_triangular(factor, eye, upper=True), info == 0


def block_gram_schmidt_qr(
    stack: Tensor,
    precision: str = "fp32",
    block: int | None = None,
    factor_in_fp64: bool = True,
) -> tuple[Tensor, Tensor]:
    r"""The Q factor of the QR decomposition of each square matrix of a stack by block
    classical Gram-Schmidt with reorthogonalisation (BCGS2; Barlow & Smoktunowicz 2013) on the
    column-equilibrated matrix :math:`\hat Y = Y D^{-1}`, for column blocks
    :math:`\hat Y_j` of ``block`` columns:

    .. math::
        W = \mathrm{qr}\big(\hat Y_j - Q_{<j} (Q_{<j}^\top \hat Y_j)\big).Q,\qquad
        Q_j = \mathrm{qr}\big(W - Q_{<j} (Q_{<j}^\top W)\big).Q

    The projections (:math:`4 n^3` FLOPs in all) are matrix products at ``precision``; the
    first panel factorisation, of a possibly ill-conditioned panel, is a CholeskyQR pass in
    float64, the second, of a nearly orthonormal one, a pass at ``precision``
    (:func:`_panel_cholesky_qr_`); ``factor_in_fp64=False`` runs that first pass at
    ``precision`` too (for GPUs whose float64 products are slow).

    "Twice is enough" fails where the first projection keeps less than about the products'
    unit roundoff :math:`u` of a column (a stale basis's tail at TF32, :math:`u = 2^{-11}`):
    the second projection then removes most of what is left, and the normalisation
    :math:`W R^{-1}` amplifies its rounding error along :math:`Q_{<j}` by
    :math:`\|R^{-1}\|_2 = 1/\sigma_{min}(W)`. So where the bound
    :math:`1/\sqrt{\|R^{-1}\|_1 \|R^{-1}\|_\infty} \le \sigma_{min}(W)` of the second
    projection is below :data:`GRAM_SCHMIDT_KEPT_MIN` (:math:`1/\sqrt 2`, the criterion of
    Daniel, Gragg, Kaufman & Stewart 1976, here for the panel, whose columns had unit norm),
    that matrix's panel is projected and factored once more, up to
    :data:`GRAM_SCHMIDT_EXTRA_PASSES` times (one host read a pass; only the matrices that
    need it). Every column block is one batched product over the stack. Returns ``(Q, ok)``
    with ``ok`` as :func:`cholesky_qr2`'s (a failed panel factorisation, a non-finite or zero
    column, or the orthogonality probe)."""
    q, ok = _equilibrate_columns(stack)
    n = q.size(-1)
    if block is None:
        block = GRAM_SCHMIDT_WIDE_BLOCK if n >= GRAM_SCHMIDT_WIDE else GRAM_SCHMIDT_BLOCK
    first = "fp64" if factor_in_fp64 else precision
    # TF32 projections on CUDA as fp16 products: a half-precision copy of the finished columns
    half = q.new_empty(q.shape, dtype=torch.float16) if _half_projections(q, precision) else None
    for start in range(0, n, block):
        stop = min(start + block, n)
        panel = q[..., start:stop]
        if not start:
            ok &= _panel_cholesky_qr_(panel, first)[0]
            ok &= _panel_cholesky_qr_(panel, precision)[0]
            if half is not None:
                half[..., start:stop] = panel
            continue
        basis = q[..., :start] if half is None else half[..., :start]
        _project_out_(panel, basis, precision)
        ok &= _panel_cholesky_qr_(panel, first)[0]
        _project_out_(panel, basis, precision)
        factored, inverse = _panel_cholesky_qr_(panel, precision)
        ok &= factored
        kept = _smallest_singular_value_bound(inverse)
        for _ in range(GRAM_SCHMIDT_EXTRA_PASSES):
            lost = kept < GRAM_SCHMIDT_KEPT_MIN
            where = lost.nonzero()  # one host read a pass
            if not len(where):
                break
            if len(where) == lost.numel():  # every matrix: the whole stack, no copies
                _project_out_(panel, basis, precision)
                factored, inverse = _panel_cholesky_qr_(panel, precision)
                ok &= factored
                kept = _smallest_singular_value_bound(inverse)
                continue
            index = (*where.T, slice(None), slice(None, stop))
            matrices = q[index]  # the matrices that lost orthogonality, up to this panel
            redo = matrices[..., start:]
            earlier = matrices[..., :start] if half is None else half[index][..., :start]
            _project_out_(redo, earlier, precision)
            factored, inverse = _panel_cholesky_qr_(redo, precision)
            ok[index[:-2]] &= factored
            kept = torch.ones_like(kept)
            kept[index[:-2]] = _smallest_singular_value_bound(inverse)
            q[index] = matrices
        if half is not None:
            half[..., start:stop] = panel
    return q, ok & _orthogonal(q, precision)


def _project_out_(panel: Tensor, basis: Tensor, precision: str) -> Tensor:
    r""":math:`W \leftarrow W - B (B^\top W)` in place (two matrix products at ``precision``)
    for orthonormal columns :math:`B`. A float16 ``basis`` (:func:`_half_projections`) takes
    fp16 products with fp32 accumulation: the panel is rounded to fp16 for the first, whose
    coefficients come out as fp16 (:func:`half_matmul`), and the second is subtracted from
    the fp32 panel by :func:`matmul_accumulate_` (on CUDA one GEMM, no temporary). Returns
    ``panel``."""
    if basis.dtype == torch.float16:
        coefficients = half_matmul(basis.mT, panel.to(torch.float16), torch.float16)
    else:
        coefficients = matmul(basis.mT, panel, precision)
    return matmul_accumulate_(panel, basis, coefficients, 1.0, -1.0, precision)


def _half_projections(q: Tensor, precision: str) -> bool:
    """Whether :func:`block_gram_schmidt_qr` runs the projections of ``q`` as fp16 products
    (:func:`half_projections_at` for its columns, device and dtype)."""
    return half_projections_at(q.size(-1), q.device, precision, q.dtype)


def half_projections_at(
    columns: int, device: torch.device, precision: str, dtype: torch.dtype = torch.float32
) -> bool:
    r"""Whether :func:`block_gram_schmidt_qr` runs the projections of a matrix of ``columns``
    columns as fp16 products: TF32 on CUDA, fp32 columns, at least
    :data:`GRAM_SCHMIDT_WIDE` of them (H100, the statistics of
    a training-like run: 5504 columns 192 -> 145 ms; 2048 columns 72 -> 67-70 ms but 2 of 132
    matrices then failed and fell back), and :data:`HALF_PROJECTIONS`. An fp16 operand keeps
    TF32's 10-bit mantissa; the operands here (orthonormal columns, unit-norm columns and their
    coefficients, all entries in [-1, 1]) cannot overflow, and below fp16's smallest normal
    number (6.1e-5) an entry is rounded to an absolute 3e-8 of its unit-norm column instead
    of a relative 2^-11: the rounding of the products' inputs is TF32's or finer, at twice
    TF32's tensor-core rate and half its memory traffic (the projections are
    memory-bound)."""
    return (
        HALF_PROJECTIONS
        and precision == "tf32"
        and torch.device(device).type == "cuda"
        and dtype == torch.float32
        and columns >= GRAM_SCHMIDT_WIDE
    )


def half_matmul(a: Tensor, b: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``a @ b`` of 16-bit float operands (both float16 or both bfloat16; matrices or stacks
    ``(..., m, k) @ (..., k, n)``) with fp32 accumulation, the result in ``out_dtype``:
    float32, or the operands' dtype (the fp32 sum rounded once, as a following product's
    rounding of its input would). On CUDA one cuBLAS product (``mm``/``bmm`` with
    ``out_dtype=float32``; 16-bit results with reduced-precision reductions off, so split-K
    partial sums stay fp32); elsewhere the values multiplied in fp32 (the same rounding of
    the inputs). float16 operands must be kept in its range by the caller."""
    if a.dtype not in _HALF_DTYPES or b.dtype != a.dtype:
        raise ValueError(
            f"half_matmul takes two float16 or two bfloat16 operands, got {a.dtype} and {b.dtype}"
        )
    if out_dtype not in (torch.float32, a.dtype):
        raise ValueError(f"out_dtype must be torch.float32 or {a.dtype}, got {out_dtype}")
    if not a.is_cuda:
        return (a.float() @ b.float()).to(out_dtype)
    if out_dtype != torch.float32:
        with _half_reductions(False):
            return a @ b
    if a.dim() == 2 and b.dim() == 2:
        return torch.mm(a, b, out_dtype=torch.float32)
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    b = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    return torch.bmm(a, b, out_dtype=torch.float32).reshape(*batch, a.size(-2), b.size(-1))


def _orthogonal(q: Tensor, precision: str) -> Tensor:
    r"""Whether each matrix of a stack passes the probe :math:`\|Q^\top Q z - z\|_\infty /
    \|z\|_\infty \le` :func:`_orthogonality_tolerance` for four fixed random vectors
    :math:`z`; a non-finite :math:`Q` fails it (its error is NaN or inf)."""
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(q.size(-1), 4, generator=generator, dtype=torch.float64)
    probe = probe.to(dtype=q.dtype, device=q.device)
    error = (matmul(q.mT, matmul(q, probe)) - probe).abs().flatten(-2).amax(-1)
    error = torch.nan_to_num(error, nan=float("inf"))
    tolerance = _orthogonality_tolerance(q.dtype, precision) * float(probe.abs().amax())
    return error <= tolerance


def all_finite(stack: Tensor) -> Tensor:
    """``(...)`` mask: every entry of the trailing matrix is finite. One reading pass: the
    largest magnitude of each matrix (a NaN propagates through the max, an infinity is its
    own) is finite, instead of a boolean copy of the stack reduced again."""
    if stack.numel() == 0:
        return torch.ones(stack.shape[:-2], dtype=torch.bool, device=stack.device)
    return torch.isfinite(torch.linalg.vector_norm(stack, ord=float("inf"), dim=(-2, -1)))


def newton_schulz5(
    matrix: Tensor,
    steps: int = 5,
    coefficients: tuple[float, float, float] = NS5_COEFFICIENTS,
    eps: float = 1e-7,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    r"""Approximate orthogonalisation :math:`UV^\top` of a stack ``(..., m, n)`` of matrices.

    .. math::
        X_0 = G / (\|G\|_F + \epsilon),\qquad
        A = X_k X_k^\top,\quad X_{k+1} = a X_k + (bA + cA^2) X_k

    run on the wide orientation (transposed when ``m > n``, so that :math:`A` is the smaller
    Gram matrix). With the default coefficients the singular values converge to roughly
    ``[0.7, 1.2]`` rather than exactly 1 (by design, K. Jordan's reference). ``compute_dtype``
    (default: the input's) is the precision of the iteration; the result has that dtype.
    """
    a, b, c = coefficients
    x = matrix if compute_dtype is None else matrix.to(compute_dtype)
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return x.mT if transposed else x


def symmetric_eigh(stack: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Batched ``torch.linalg.eigh`` that never raises: returns ``(eigvals, eigvecs, ok)``.

    Non-finite matrices are replaced by the identity before the call (and marked failed), so
    one bad block never spoils the others. On a failure of the batched call in the input
    precision, retries in float64 (as the SOAP authors do), then matrix by matrix. Eigenvalues
    are ascending (torch's convention)."""
    finite = all_finite(stack)
    eye = torch.eye(stack.size(-1), dtype=stack.dtype, device=stack.device)
    clean = torch.where(finite[..., None, None], stack, eye)  # one bad matrix spoils no other
    values, vectors = _eigh_with_fallback(clean)
    if values is None:  # the batched call failed: solve one by one (failure path only)
        flat = clean.reshape(-1, *clean.shape[-2:])
        pairs = [_eigh_with_fallback(m) for m in flat]
        nan = torch.full_like(flat[0], float("nan"))
        values = torch.stack([v if v is not None else nan[0] for v, _ in pairs])
        vectors = torch.stack([q if q is not None else nan for _, q in pairs])
        values = values.reshape(clean.shape[:-1])
        vectors = vectors.reshape(clean.shape)
    ok = finite & torch.isfinite(values).all(-1) & all_finite(vectors)
    return values, vectors, ok


def _eigh_with_fallback(stack: Tensor) -> tuple[Tensor | None, Tensor | None]:
    for dtype in (stack.dtype, torch.float64):
        try:
            values, vectors = torch.linalg.eigh(stack.to(dtype))
        except RuntimeError:
            continue
        return values.to(stack.dtype), vectors.to(stack.dtype)
    return None, None


def inverse_root_eigh(stack: Tensor, root: int, ridge_epsilon: float) -> tuple[Tensor, Tensor]:
    r""":math:`(A + \epsilon\,\lambda_{max}(A)\,I)^{-1/p}` for a stack of symmetric PSD matrices.

    :math:`A = Q\Lambda Q^\top` (``torch.linalg.eigh``); the eigenvalues are clamped at 0 (the
    statistics are PSD in exact arithmetic, so a negative eigenvalue is rounding error) and the
    ridge is relative to the largest eigenvalue, as in the Shampoo authors' ``ComputePower``.
    Returns ``(roots, ok)``; a zero matrix has no finite root and is reported as failed."""
    values, vectors, ok = symmetric_eigh(stack)
    values = values.clamp_min(0.0)
    ridge = ridge_epsilon * values.amax(-1, keepdim=True)
    powered = (values + ridge).pow(-1.0 / root)
    roots = (vectors * powered.unsqueeze(-2)) @ vectors.mT
    return roots, ok & all_finite(roots)


def _max_eigenvalue_power_iteration(
    stack: Tensor, iterations: int = 100, tolerance: float = 1e-6, check_every: int = 10
) -> Tensor:
    r"""Largest eigenvalue of each PSD matrix by power iteration, batched.

    Per matrix exactly the authors' ``PowerIter``: :math:`v \leftarrow v/\|v\|`,
    :math:`s_k = v^\top A v`, :math:`v \leftarrow Av`, stopping at the first :math:`k` with
    :math:`|s_k - s_{k-1}| \le` ``tolerance`` (:math:`s_0 = 0`) or after ``iterations`` rounds,
    and returning that :math:`s_k` (deviation: a deterministic start vector instead of their
    random one). Each matrix stops on its own; the host looks every ``check_every`` rounds (one
    sync per look, not per round) and, once at most half still run, iterates on those alone.
    On CUDA, fp32 matrices of at most 128 rows take the Triton kernel
    :func:`optimkit.kernels.power_iteration.max_eigenvalue_power_iteration` (the same rounds
    per matrix, each matrix read once instead of once a round; no host looks)."""
    batch_shape, n = stack.shape[:-2], stack.size(-1)
    start = torch.linspace(1.0, 2.0, n, dtype=stack.dtype, device=stack.device)
    if _power_iteration_kernel_takes(stack):
        from optimkit.kernels.power_iteration import max_eigenvalue_power_iteration

        return max_eigenvalue_power_iteration(stack, start, iterations, tolerance)
    flat = stack.reshape(-1, n, n)
    v = start.expand(flat.size(0), n).unsqueeze(-1)
    estimate = torch.zeros(flat.size(0), dtype=stack.dtype, device=stack.device)
    result = estimate.clone()
    running = None  # indices into flat of the matrices still iterating (None: all)
    matrices, rounds = flat, 0
    tiny = torch.finfo(stack.dtype).tiny
    finished = torch.zeros_like(estimate, dtype=torch.bool)
    while rounds < iterations:
        for _ in range(min(check_every, iterations - rounds)):
            v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp_min(tiny)
            mv = matrices @ v
            new = (v * mv).sum((-2, -1))
            converged = (new - estimate).abs() <= tolerance
            estimate = torch.where(finished, estimate, new)
            finished |= converged
            v, rounds = mv, rounds + 1
        if running is None:
            result.copy_(estimate)
        else:
            result.index_copy_(0, running, estimate)
        still = (~finished).nonzero().squeeze(-1)
        if still.numel() == 0:
            break
        if 2 * still.numel() <= finished.numel():  # compact: copy at most half the stack
            running = still if running is None else running[still]
            matrices, v, estimate = flat[running], v[still], estimate[still]
            finished = finished[still]
    return result.reshape(batch_shape)


def _power_iteration_kernel_takes(stack: Tensor) -> bool:
    """Whether :func:`_max_eigenvalue_power_iteration` runs as the Triton kernel (CUDA,
    :data:`FUSED_POWER_ITERATION`, Triton importable, fp32 matrices of at most 128 rows)."""
    if not triton_on(FUSED_POWER_ITERATION, stack):
        return False
    from optimkit.kernels.power_iteration import takes

    return takes(stack)


def inverse_root_coupled_newton(
    stack: Tensor,
    root: int,
    ridge_epsilon: float,
    iterations: int = 100,
    tolerance: float = 1e-6,
    counts: dict[str, float] | None = None,
) -> tuple[Tensor, Tensor]:
    r""":math:`(A + \epsilon\lambda_{max} I)^{-1/p}` by the coupled Newton iteration (Guo & Higham
    2006, eq. 3.2), batched; the Shampoo authors' ``ComputePower``.

    .. math::
        z = \frac{1+p}{2\|A\|_F},\quad X_0 = z^{1/p} I,\quad M_0 = zA,\qquad
        T_k = \tfrac{p+1}{p} I - \tfrac{1}{p} M_k,\quad X_{k+1} = X_k T_k,\quad
        M_{k+1} = T_k^p M_k

    iterated while :math:`\max|M_k - I| >` ``tolerance`` (at most ``iterations`` rounds) and
    stopped for a matrix whose error grows by more than 20% (its last good iterate is kept),
    as in the authors' code. :math:`\lambda_{max}` comes from a power iteration (deviation: a
    deterministic start vector instead of the authors' random one). Each matrix stops on its
    own, as the authors' loop over matrices does: once at most half of those still iterating
    need another round, the rest are set aside and the rounds run on those alone (the host
    reads one flag per round anyway). Returns ``(roots, ok)``. With a ``counts`` dict,
    ``counts["root_matmul_flops"]`` grows by the FLOPs of the matrix products run (every
    matrix still in the batch takes part in each of its rounds)."""
    batch_shape, n = stack.shape[:-2], stack.size(-1)
    stack = stack.reshape(-1, n, n)
    identity = torch.eye(n, dtype=stack.dtype, device=stack.device)
    max_ev = _max_eigenvalue_power_iteration(stack)
    # A + ridge I is not formed: its Frobenius norm (||A||^2 + 2 ridge tr A + n ridge^2) and
    # z (A + ridge I) come from A (one pass each, no temporary of the stack's size)
    ridge = ridge_epsilon * max_ev
    trace = stack.diagonal(dim1=-2, dim2=-1).sum(-1)
    norm = (torch.linalg.matrix_norm(stack).square() + ridge * (2 * trace + n * ridge)).sqrt()
    z = (1 + root) / (2 * norm)
    x = identity * z.pow(1.0 / root)[:, None, None]
    m = stack * z[:, None, None]
    m.diagonal(dim1=-2, dim2=-1).add_((z * ridge)[:, None])
    error = _distance_to_identity(m)
    active = error > tolerance
    alpha = -1.0 / root
    rounds = iterated = 0  # rounds, and matrices iterated summed over them
    roots, running_at = x, None  # the full result; indices of the batch's matrices in it

    def settle(x: Tensor) -> Tensor:
        """The full result with the batch's iterates ``x`` written in at their places."""
        return x if running_at is None else roots.index_copy_(0, running_at, x)

    running = bool(active.any())
    while running and rounds < iterations:
        rounds, iterated = rounds + 1, iterated + x.size(0)
        t = m * alpha  # (1 - alpha) I + alpha M: a contiguous pass, then the diagonal
        t.diagonal(dim1=-2, dim2=-1).add_(1 - alpha)
        new_x = x @ t
        new_m = torch.linalg.matrix_power(t, root) @ m
        del t
        new_error = _distance_to_identity(new_m)
        accept = active & ~(new_error > error * 1.2)
        error = torch.where(accept, new_error, error)
        active = accept & (error > tolerance)
        everyone, still = torch.stack((accept.all(), active.sum())).tolist()  # one read
        running = still > 0
        if everyone:  # the usual round: no selection pass over the stack
            x, m = new_x, new_m
        else:
            keep = accept[:, None, None]
            x = torch.where(keep, new_x, x)
            m = torch.where(keep, new_m, m)
        if running and 2 * still <= x.size(0):  # set the finished ones aside
            roots = settle(x)
            left = active.nonzero().squeeze(-1)
            running_at = left if running_at is None else running_at[left]
            x, m, error, active = x[left], m[left], error[left], active[left]
    roots = settle(x)
    ok = torch.isfinite(z) & (z > 0) & all_finite(roots)
    if counts is not None:
        # per round: x @ t, matrix_power(t, root) (binary powering), and its product with m
        products = 2 + _matrix_power_products(root)
        flops = 2.0 * n**3 * iterated * products
        counts["root_matmul_flops"] = counts.get("root_matmul_flops", 0.0) + flops
    return roots.reshape(*batch_shape, n, n), ok.reshape(batch_shape)


def _distance_to_identity(stack: Tensor) -> Tensor:
    r""":math:`\max_{ij} |M_{ij} - \delta_{ij}|` of each matrix of a stack, with one reading
    pass over the stack and no temporary of its size: the diagonal is set aside, zeroed for a
    max-abs reduction of the rest, and restored (the stack is unchanged on return)."""
    diagonal = stack.diagonal(dim1=-2, dim2=-1)
    saved = diagonal.clone()
    diagonal.zero_()
    off_diagonal = torch.linalg.vector_norm(stack, ord=float("inf"), dim=(-2, -1))
    diagonal.copy_(saved)
    return torch.maximum(off_diagonal, (saved - 1).abs().amax(-1))


def _matrix_power_products(exponent: int) -> int:
    """Matrix products ``torch.linalg.matrix_power`` makes (binary powering)."""
    return max(exponent.bit_length() - 1 + bin(exponent).count("1") - 1, 0)


def eigenbasis_eigh(stack: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvectors of symmetric matrices, columns ordered by descending eigenvalue (as SOAP's
    ``get_orthogonal_matrix``: ``eigh`` then ``flip``). Returns ``(Q, ok)``."""
    _, vectors, ok = symmetric_eigh(stack)
    return vectors.flip(-1), ok


def eigenbasis_power_qr(
    stack: Tensor,
    basis: Tensor,
    precision: str = "fp32",
    method: str = "householder",
    counts: dict[str, int] | None = None,
    factor_in_fp64: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""SOAP's warm-started eigenbasis refresh (``get_orthogonal_matrix_QR``), batched.

    .. math::
        \hat\lambda = \mathrm{diag}(Q^\top A Q),\quad \pi = \mathrm{argsort}(-\hat\lambda),\quad
        Q' = \mathrm{qr}(A\,Q_{:,\pi}).Q

    Returns ``(Q', order, ok)``; ``order`` (``(..., n)``, descending estimated eigenvalue) is
    the permutation the caller applies to the second-moment axis. :math:`AQ` is computed once:
    its diagonal products give :math:`\hat\lambda` and its permuted columns are
    :math:`A\,Q_{:,\pi}`. ``precision``: that of the matrix products (:func:`matmul`).
    ``method``: ``"householder"`` (``torch.linalg.qr`` in fp32, as the authors),
    ``"cholesky"`` (:func:`cholesky_qr2` at ``precision``; the matrices it cannot factor take
    Householder's QR, counted in ``counts["householder_fallbacks"]`` when a dict is given) or
    ``"gram_schmidt"`` (:func:`block_gram_schmidt_qr` at ``precision``; the matrices it
    cannot factor take :func:`cholesky_qr2`, counted in ``counts["cholesky_fallbacks"]``, and
    those that one cannot factor Householder's QR, as for ``"cholesky"``). ``factor_in_fp64``
    goes to both matrix-product QRs (their first factorisation in float64)."""
    if method not in QR_METHODS:
        raise ValueError(f"method must be one of {QR_METHODS}, got {method!r}")
    product = matmul(stack, basis, precision)  # A Q, once: (A Q)[:, pi] = A Q[:, pi]
    estimates = _column_dots(basis, product)
    order = torch.argsort(estimates, dim=-1, descending=True, stable=True)
    product = torch.gather(product, -1, order.unsqueeze(-2).expand_as(product))
    if method == "householder":
        q = batched_qr(product)
        return q, order, all_finite(q)
    counts = {} if counts is None else counts

    def cholesky(y: Tensor) -> tuple[Tensor, Tensor]:
        return cholesky_qr2(y, precision, factor_in_fp64=factor_in_fp64)

    if method == "gram_schmidt":
        q, ok = block_gram_schmidt_qr(product, precision, factor_in_fp64=factor_in_fp64)
        _refactor_failed_(q, ok, product, cholesky, "cholesky_fallbacks", counts)
    else:
        q, ok = cholesky(product)
    _refactor_failed_(q, ok, product, _householder, "householder_fallbacks", counts)
    return q, order, ok


def _householder(stack: Tensor) -> tuple[Tensor, Tensor]:
    q = batched_qr(stack)
    return q, all_finite(q)


def _refactor_failed_(
    q: Tensor,
    ok: Tensor,
    stack: Tensor,
    factor: Callable[[Tensor], tuple[Tensor, Tensor]],
    key: str,
    counts: dict[str, int],
) -> None:
    """Recompute by ``factor`` the matrices of ``stack`` whose ``ok`` is False, in place in
    ``q`` and ``ok`` (one host read), and count them in ``counts[key]``."""
    failed = (~ok).nonzero()
    if not len(failed):
        return
    index = tuple(failed.T)
    q[index], ok[index] = factor(stack[index].reshape(-1, *stack.shape[-2:]))
    counts[key] = counts.get(key, 0) + len(failed)


def _column_dots(a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\sum_i a_{ij} b_{ij}` for each matrix of two stacks, ``(..., n)``: the diagonal
    of :math:`A^\top B` without forming it, one matrix at a time (a temporary of one matrix,
    not of the stack)."""
    flat_a = a.reshape(-1, *a.shape[-2:])
    flat_b = b.reshape(-1, *b.shape[-2:])
    dots = [torch.linalg.vecdot(x, y, dim=0) for x, y in zip(flat_a, flat_b)]
    if not dots:
        return a.new_zeros((*a.shape[:-2], a.size(-1)))
    return torch.stack(dots).reshape(*a.shape[:-2], a.size(-1))
