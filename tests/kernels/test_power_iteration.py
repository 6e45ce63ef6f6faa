"""The Triton power iteration (optimkit.kernels.power_iteration) against the authors'
single-matrix PowerIter and the batched torch iteration of optimkit.linalg."""

from __future__ import annotations

import os

import pytest
import torch
from test_linalg import authors_power_iter as _authors_power_iter

from optimkit import linalg

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")

triton = pytest.importorskip("triton")


def _stack(n: int, count: int, seed: int = 0) -> torch.Tensor:
    """Symmetric PSD matrices with a top eigenvalue of 30 and second-to-top gaps from fast
    (0.1) to none (1.0), plus a zero matrix: every stopping case of the iteration."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(count, n, n, generator=gen, dtype=torch.float64))[0]
    values = torch.rand(count, n, generator=gen, dtype=torch.float64)
    gaps = torch.linspace(0.1, 1.0, count, dtype=torch.float64)
    values[:, -1] = 30.0
    if n > 1:
        values[:, -2] = 30.0 * gaps
    stack = (q * values.unsqueeze(-2)) @ q.mT
    stack = (stack + stack.mT) / 2
    return torch.cat([stack, torch.zeros(1, n, n, dtype=torch.float64)])


@pytest.mark.parametrize("n", [1, 8, 37, 128])
def test_kernel_is_the_authors_iteration(n):
    """Each matrix's estimate is the authors' PowerIter's (run in fp64 on the fp32 matrix) to
    fp32 rounding, for sides below, at and between powers of two, and 1 x 1."""
    from optimkit.kernels.power_iteration import max_eigenvalue_power_iteration

    stack64 = _stack(n, 6).to(torch.float32).double()
    start = torch.linspace(1.0, 2.0, n, dtype=torch.float32)
    got = max_eigenvalue_power_iteration(stack64.float().to(DEVICE), start.to(DEVICE))
    expected = torch.stack([_authors_power_iter(m, start.double()) for m in stack64])
    assert got.shape == (7,) and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu().double(), expected, rtol=2e-6, atol=2e-5)
    assert got[-1].item() == 0.0


def test_kernel_matches_the_torch_iteration_and_keeps_the_batch_shape(monkeypatch):
    """Through ``linalg._max_eigenvalue_power_iteration`` (kernel on, kernel off): the same
    estimates to fp32 rounding, in the stack's batch shape, and a NaN matrix gives NaN."""
    from optimkit.kernels.power_iteration import max_eigenvalue_power_iteration

    stack = _stack(16, 11, seed=1).float().reshape(3, 4, 16, 16).to(DEVICE)
    stack[2, 3, 0, 0] = float("nan")
    start = torch.linspace(1.0, 2.0, 16, device=DEVICE)
    monkeypatch.setattr(linalg, "FUSED_POWER_ITERATION", False)
    expected = linalg._max_eigenvalue_power_iteration(stack)
    got = max_eigenvalue_power_iteration(stack, start)
    assert got.shape == (3, 4)
    assert torch.isnan(got[2, 3]) and torch.isnan(expected[2, 3])
    torch.testing.assert_close(got[:2], expected[:2], rtol=2e-6, atol=2e-5)
    if DEVICE == "cuda":  # the linalg entry point takes the kernel on CUDA
        monkeypatch.setattr(linalg, "FUSED_POWER_ITERATION", True)
        assert linalg._power_iteration_kernel_takes(stack)
        fused = linalg._max_eigenvalue_power_iteration(stack)
        torch.testing.assert_close(fused, got, equal_nan=True)


def test_kernel_stops_after_the_round_limit():
    """With ``iterations=k`` the estimate is the authors' after k rounds, for k below the
    rounds the matrix needs (its third eigenvector's share shrinks by 3 a round: about 7)."""
    from optimkit.kernels.power_iteration import max_eigenvalue_power_iteration

    stack = torch.diag(torch.tensor([3.0, -3.0, 1.0]))[None]
    start = torch.linspace(1.0, 2.0, 3)
    for rounds in (1, 2, 5):
        got = max_eigenvalue_power_iteration(stack.to(DEVICE), start.to(DEVICE), rounds)
        expected = _authors_power_iter(stack[0].double(), start.double(), iterations=rounds)
        torch.testing.assert_close(got.cpu().double()[0], expected, rtol=1e-6, atol=1e-6)


def test_kernel_refuses_what_it_cannot_take():
    from optimkit.kernels.power_iteration import max_eigenvalue_power_iteration, takes

    assert not takes(torch.ones(2, 129, 129)) and not takes(torch.ones(2, 4, 4).double())
    assert not takes(torch.ones(2, 3, 4)) and takes(torch.ones(5, 4, 4))
    with pytest.raises(ValueError, match="float32"):
        max_eigenvalue_power_iteration(torch.ones(2, 3, 4), torch.ones(4))
    with pytest.raises(ValueError, match="start"):
        max_eigenvalue_power_iteration(torch.ones(2, 4, 4), torch.ones(3))
