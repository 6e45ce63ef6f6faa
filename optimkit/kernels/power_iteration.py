r"""The Shampoo authors' power iteration for the largest eigenvalue of many small symmetric
matrices, one matrix per program, held in registers for every round.

Per matrix exactly the rounds of :func:`optimkit.linalg._max_eigenvalue_power_iteration` (the
authors' ``PowerIter``): :math:`v \leftarrow v/\|v\|`, :math:`s_k = v^\top A v`,
:math:`v \leftarrow Av`, stopping at the first :math:`k` with :math:`|s_k - s_{k-1}| \le`
``tolerance`` (:math:`s_0 = 0`) or after ``iterations`` rounds. The batched torch iteration
reads the whole stack from memory every round (a matrix-vector product is memory-bound), and
the host looks every few rounds whether to stop; here each program loads its matrix once and
runs its own rounds until it stops, so the stack is read once. Only the summation order of
the products differs from the torch iteration (fp32 rounding). Importing this module imports
Triton: import it only where :func:`optimkit.kernels.triton_available` holds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: the largest matrix side a program holds in registers (a 128 x 128 fp32 matrix is 64 KiB,
#: 64 values a thread at 8 warps); larger matrices take the torch iteration.
MAX_SIDE = 128


@triton.jit
def _power_iteration_kernel(
    stack_ptr, start_ptr, out_ptr, n, iterations, tolerance, tiny, BLOCK: tl.constexpr
):
    matrix = tl.program_id(0).to(tl.int64)
    index = tl.arange(0, BLOCK)
    inside = index < n
    entries = stack_ptr + matrix * n * n + index[:, None] * n + index[None, :]
    a = tl.load(entries, mask=inside[:, None] & inside[None, :], other=0.0)
    v = tl.load(start_ptr + index, mask=inside, other=0.0)
    estimate = tl.sum(v * 0.0)  # s_0 = 0, a scalar tensor of the matrix's dtype
    error = estimate + 1.0
    rounds = 0
    while (rounds < iterations) & (error > tolerance):
        v = v / tl.maximum(tl.sqrt(tl.sum(v * v)), tiny)
        product = tl.sum(a * v[None, :], axis=1)  # A v (A symmetric: either axis)
        value = tl.sum(v * product)
        error = tl.abs(value - estimate)
        estimate = value
        v = product
        rounds += 1
    tl.store(out_ptr + matrix, estimate)


def takes(stack: Tensor) -> bool:
    """Whether :func:`max_eigenvalue_power_iteration` takes ``stack``: square fp32 matrices
    of at most :data:`MAX_SIDE` rows."""
    return (
        stack.dim() >= 2
        and stack.size(-1) == stack.size(-2)
        and 0 < stack.size(-1) <= MAX_SIDE
        and stack.dtype == torch.float32
    )


def max_eigenvalue_power_iteration(
    stack: Tensor, start: Tensor, iterations: int = 100, tolerance: float = 1e-6
) -> Tensor:
    """The authors' power-iteration estimate of the largest eigenvalue of each symmetric
    matrix of ``stack`` ``(..., n, n)`` (fp32, ``n <= MAX_SIDE``) from the start vector
    ``start`` ``(n,)``: a tensor of shape ``stack.shape[:-2]``."""
    if not takes(stack):
        raise ValueError(
            f"stack must hold square float32 matrices of at most {MAX_SIDE} rows, got "
            f"{tuple(stack.shape)} {stack.dtype}"
        )
    n = stack.size(-1)
    if start.shape != (n,):
        raise ValueError(f"start must have shape ({n},), got {tuple(start.shape)}")
    flat = stack.reshape(-1, n, n).contiguous()
    out = torch.empty(flat.size(0), dtype=stack.dtype, device=stack.device)
    if flat.size(0):
        block = max(triton.next_power_of_2(n), 16)
        _power_iteration_kernel[(flat.size(0),)](
            flat,
            start.to(device=stack.device, dtype=stack.dtype).contiguous(),
            out,
            n,
            iterations,
            tolerance,
            torch.finfo(stack.dtype).tiny,
            BLOCK=block,
            num_warps=8 if block >= 128 else 4,
        )
    return out.reshape(stack.shape[:-2])
