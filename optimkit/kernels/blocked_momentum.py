r"""Shampoo's elementwise tail for a matrix whose preconditioned direction is still in blocks:
momentum and the weight update in one pass, reading the direction in its block order.

For a matrix of :math:`r \times c` blocks of ``rows x cols``, the direction :math:`\tilde G`
sits in a ``(r c, rows, cols)`` buffer (the blocks of :class:`optimkit.optimizers.shampoo`'s
arena, in ``block_slices`` order). Per element, with the grafting scale :math:`s` read from
the device (no host sync):

.. math::
    d = s\,\tilde G + \lambda\theta,\qquad m \leftarrow \mu m + d,\qquad
    \theta \leftarrow \theta - \eta\,(d + \mu m)\ \text{(Nesterov) or}\ \theta - \eta m

The multi-tensor ops this replaces take five passes over the matrix (scale, momentum decay,
momentum add, the Nesterov look-ahead, the update: thirteen reads and writes of a matrix);
here the direction, the momentum and the weights are read once and the last two written
once. fp32 arithmetic; the weights may be fp32, bf16 or fp16 (rounded to nearest when
stored), the momentum and the direction fp32. Importing this module imports Triton: import it
only where :func:`optimkit.kernels.triton_available` holds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: elements a program updates.
BLOCK = 1024

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _blocked_momentum_kernel(
    direction_ptr,
    param_ptr,
    momentum_ptr,
    scale_ptr,
    numel,
    col_blocks,
    lr,
    momentum,
    weight_decay,
    ROWS: tl.constexpr,
    COLS: tl.constexpr,
    NESTEROV: tl.constexpr,
    DECAY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = index < numel
    block = index // (ROWS * COLS)  # the direction's element ``index`` is (block, row, col)
    within = index % (ROWS * COLS)
    row, col = within // COLS, within % COLS
    block_row, block_col = block // col_blocks, block % col_blocks
    at = ((block_row * ROWS + row) * col_blocks + block_col) * COLS + col  # in the matrix
    scale = tl.load(scale_ptr)
    d = tl.load(direction_ptr + index, mask=inside, other=0.0) * scale
    theta = tl.load(param_ptr + at, mask=inside, other=0.0).to(tl.float32)
    if DECAY:
        d += weight_decay * theta
    m = momentum * tl.load(momentum_ptr + at, mask=inside, other=0.0) + d
    update = d + momentum * m if NESTEROV else m
    theta -= lr * update
    tl.store(momentum_ptr + at, m, mask=inside)
    tl.store(param_ptr + at, theta.to(param_ptr.dtype.element_ty), mask=inside)


def takes(direction: Tensor, param: Tensor, momentum: Tensor) -> bool:
    """Whether :func:`blocked_momentum_update_` takes these tensors: one device, contiguous,
    an fp32 direction and momentum, fp32/bf16/fp16 weights."""
    return (
        direction.dtype == momentum.dtype == torch.float32
        and param.dtype in _DTYPES
        and direction.device == param.device == momentum.device
        and direction.is_contiguous()
        and param.is_contiguous()
        and momentum.is_contiguous()
    )


def blocked_momentum_update_(
    direction: Tensor,
    param: Tensor,
    momentum: Tensor,
    scale: Tensor,
    grid: tuple[int, int],
    lr: float,
    momentum_coefficient: float,
    weight_decay: float = 0.0,
    nesterov: bool = True,
) -> None:
    """The update above, in place in ``param`` and ``momentum`` (the matrix's size, any
    shape of that many elements, contiguous), from ``direction`` (``(r c, rows, cols)`` for
    ``grid = (r, c)``) and ``scale`` (a one-element tensor on the device)."""
    if not takes(direction, param, momentum):
        raise ValueError(
            "blocked_momentum_update_ takes contiguous tensors on one device: an fp32 direction "
            f"and momentum, fp32/bf16/fp16 weights; got {direction.dtype}, {momentum.dtype}, "
            f"{param.dtype}"
        )
    blocks, rows, cols = direction.shape
    if blocks != grid[0] * grid[1] or not param.numel() == direction.numel() == momentum.numel():
        raise ValueError(
            f"direction {tuple(direction.shape)} is not a {grid} grid of the parameter's "
            f"{param.numel()} elements"
        )
    if scale.numel() != 1:
        raise ValueError(f"scale must hold one element, got {scale.numel()}")
    numel = direction.numel()
    if numel:
        _blocked_momentum_kernel[(triton.cdiv(numel, BLOCK),)](
            direction,
            param,
            momentum,
            scale,
            numel,
            grid[1],
            lr,
            momentum_coefficient,
            weight_decay,
            ROWS=rows,
            COLS=cols,
            NESTEROV=nesterov,
            DECAY=weight_decay != 0.0,
            BLOCK=BLOCK,
        )
