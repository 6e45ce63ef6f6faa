"""Adam's moments and its normalised direction in one pass over a (rotated) gradient: the
elementwise part of SOAP's step, :math:`m \\leftarrow \\beta_1 m + (1-\\beta_1) g`,
:math:`v \\leftarrow \\beta_2 v + (1-\\beta_2) g^2`, :math:`n = m / (\\sqrt v + \\epsilon)`.

SOAP's torch ops (:func:`optimkit.optimizers.soap.adam_direction`) read and write these
tensors in six passes (``lerp_``, ``mul_``, ``addcmul_``, ``sqrt``, ``add_``, ``div``); the
Triton kernel of
:func:`adam_direction_` reads ``g``, ``m`` and ``v`` once and writes ``m``, ``v`` and ``n``
once, with the same roundings (``sqrt`` and the division correctly rounded, as torch's).
The direction may be written as bfloat16 (SOAP's ``matmul_precision="bf16"``: it is the
input of bf16 products), rounded to nearest even as torch's ``.to(torch.bfloat16)``.
Importing this module imports Triton: import it only where :func:`triton_available` holds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from optimkit.kernels.multi_tensor import _to_dtype
from optimkit.kernels.rules._moments import adam_moments

#: elements per program.
BLOCK = 4096


@triton.jit
def _adam_direction_kernel(
    grad_ptr,
    exp_avg_ptr,
    exp_avg_sq_ptr,
    out_ptr,
    numel,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    OUT_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < numel
    grad = tl.load(grad_ptr + offsets, mask=mask)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)
    exp_avg, exp_avg_sq = adam_moments(
        grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2
    )
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    direction = tl.div_rn(exp_avg, tl.sqrt_rn(exp_avg_sq) + eps)
    tl.store(out_ptr + offsets, _to_dtype(direction, OUT_DTYPE), mask=mask)


def adam_direction_(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    out: Tensor,
    block: int = BLOCK,
) -> Tensor:
    """Updates ``exp_avg`` and ``exp_avg_sq`` in place and writes the direction into ``out``
    (which may be ``grad``), one kernel launch. All four tensors: contiguous, the same shape
    and device; ``grad``, ``exp_avg`` and ``exp_avg_sq`` float32, ``out`` float32 or
    bfloat16. Returns ``out``."""
    tensors = {"grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "out": out}
    for name, tensor in tensors.items():
        if tensor.shape != grad.shape or not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous with grad's shape {tuple(grad.shape)}")
        allowed = (torch.float32, torch.bfloat16) if name == "out" else (torch.float32,)
        if tensor.dtype not in allowed:
            names = " or ".join(str(dtype) for dtype in allowed)
            raise ValueError(f"{name} must be {names}, got {tensor.dtype}")
    numel = grad.numel()
    if numel:
        grid = (triton.cdiv(numel, block),)
        _adam_direction_kernel[grid](
            grad,
            exp_avg,
            exp_avg_sq,
            out,
            numel,
            1 - beta1,
            beta2,
            1 - beta2,
            eps,
            OUT_DTYPE=tl.bfloat16 if out.dtype == torch.bfloat16 else tl.float32,
            BLOCK=block,
        )
    return out
