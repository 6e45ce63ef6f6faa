r"""Mirror the upper triangle of square matrices onto their lower triangle in place,
:math:`S_{ij} \leftarrow S_{ji}` for :math:`i > j`: the last step of a symmetric statistic
computed by block rows on and right of its diagonal
(:func:`optimkit.linalg.accumulate_gram_`).

A transposed ``copy_`` of the blocks (torch's elementwise kernel) reads one side with a
stride of a whole row, so it moves memory at a fraction of the GPU's bandwidth. Here each
program loads one ``TILE x TILE`` tile of the upper triangle with coalesced reads, transposes
it in registers and writes it to its mirror position, also coalesced; a tile on the diagonal
writes only its strict lower part. Importing this module imports Triton: import it only where
:func:`optimkit.kernels.triton_available` holds.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

#: side of the square tiles a program moves.
TILE = 64


@triton.jit
def _mirror_upper_kernel(ptr, n, TILE: tl.constexpr):
    matrix = tl.program_id(0).to(tl.int64)
    tile_row = tl.program_id(1)  # the tile written: (tile_row, tile_col), tile_row >= tile_col
    tile_col = tl.program_id(2)
    if tile_row >= tile_col:
        base = ptr + matrix * n * n
        rows = tile_row * TILE + tl.arange(0, TILE)  # of the written tile
        cols = tile_col * TILE + tl.arange(0, TILE)
        # read the upper tile (cols x rows) coalesced along its rows, transpose in registers
        upper = tl.load(
            base + cols[:, None] * n + rows[None, :],
            mask=(cols[:, None] < n) & (rows[None, :] < n),
            other=0.0,
        )
        lower = tl.trans(upper)
        mask = (rows[:, None] < n) & (cols[None, :] < n) & (rows[:, None] > cols[None, :])
        tl.store(base + rows[:, None] * n + cols[None, :], lower, mask=mask)


def mirror_upper_(stack: Tensor, tile: int = TILE) -> Tensor:
    """Copies each matrix's strict upper triangle onto its strict lower triangle, in place,
    for a contiguous stack ``(..., n, n)`` on one device (any float dtype). Returns
    ``stack``."""
    n = stack.size(-1)
    if stack.dim() < 2 or stack.size(-2) != n:
        raise ValueError(f"stack must hold square matrices, got {tuple(stack.shape)}")
    if not stack.is_contiguous():
        raise ValueError("stack must be contiguous")
    count = stack.numel() // max(n * n, 1)
    tiles = triton.cdiv(n, tile)
    if count and n > 1:
        _mirror_upper_kernel[(count, tiles, tiles)](stack, n, TILE=tile)
    return stack
