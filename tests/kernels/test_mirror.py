"""The Triton kernel that mirrors a statistic's upper triangle (optimkit.kernels.mirror)
against torch, and optimkit.linalg.accumulate_gram_ with it."""

from __future__ import annotations

import os

import pytest
import torch

from optimkit import linalg

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")

triton = pytest.importorskip("triton")


def _mirrored(stack: torch.Tensor) -> torch.Tensor:
    lower = torch.ones(stack.shape[-2:], dtype=torch.bool, device=stack.device).tril(-1)
    return torch.where(lower, stack.mT, stack)


@pytest.mark.parametrize("shape", [(1, 1), (37, 37), (3, 37, 37), (2, 2, 16, 16)])
def test_kernel_copies_the_upper_triangle_below(shape):
    """Every strict-lower entry becomes its mirror's value, nothing else moves, for sizes that
    are and are not a multiple of the tile (16 here), any batch shape."""
    from optimkit.kernels.mirror import mirror_upper_

    gen = torch.Generator().manual_seed(0)
    stack = torch.randn(*shape, generator=gen).to(DEVICE)
    expected = _mirrored(stack)
    assert mirror_upper_(stack, tile=16) is stack
    assert torch.equal(stack, expected)


def test_kernel_refuses_what_it_cannot_take():
    from optimkit.kernels.mirror import mirror_upper_

    with pytest.raises(ValueError, match="square"):
        mirror_upper_(torch.ones(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        mirror_upper_(torch.ones(4, 4, device=DEVICE).mT[:2, :2])
    empty = torch.empty(0, 5, 5, device=DEVICE)
    assert mirror_upper_(empty) is empty


@pytest.mark.parametrize("dim", [0, 1])
def test_accumulate_gram_with_the_kernel_matches_the_block_copies(monkeypatch, dim):
    """accumulate_gram_ by block rows (blocks of 3 over 7 or 5 rows) mirrored by the kernel
    gives the matrix of the per-block transposed copies: the full product to fp32 rounding,
    exactly symmetric."""
    monkeypatch.setattr(linalg, "GRAM_SYMMETRIC_MIN", 4)
    monkeypatch.setattr(linalg, "GRAM_ROW_BLOCK", 3)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 7, 5, generator=gen).to(DEVICE)
    n = x.shape[dim + 1]
    start = torch.randn(2, n, n, generator=gen).to(DEVICE)
    start = start + start.mT
    results = []
    for kernel in (True, False):
        monkeypatch.setattr(linalg, "_mirror_kernel_takes", lambda statistic, k=kernel: k)
        results.append(linalg.accumulate_gram_(start.clone(), x, dim, 0.9, 0.1))
    with_kernel, with_copies = results
    assert torch.equal(with_kernel, with_kernel.mT)
    torch.testing.assert_close(with_kernel, with_copies, rtol=1e-6, atol=1e-6)
    unfolded = torch.movedim(x, dim + 1, 1).reshape(2, n, -1)
    torch.testing.assert_close(with_kernel, 0.9 * start + 0.1 * unfolded @ unfolded.mT)


def test_the_kernel_is_taken_only_where_it_applies(monkeypatch):
    """CUDA, contiguous, the flag on; never on the CPU."""
    cpu = torch.zeros(3, 3)
    assert not linalg._mirror_kernel_takes(cpu)
    if torch.cuda.is_available():
        cuda = torch.zeros(3, 3, device="cuda")
        assert linalg._mirror_kernel_takes(cuda)
        assert not linalg._mirror_kernel_takes(torch.zeros(3, 4, device="cuda")[:, :3])
        monkeypatch.setattr(linalg, "FUSED_MIRROR", False)
        assert not linalg._mirror_kernel_takes(cuda)
