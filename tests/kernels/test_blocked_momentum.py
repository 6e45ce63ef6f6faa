"""The Triton kernel of Shampoo's tail for a matrix whose direction is in blocks
(optimkit.kernels.blocked_momentum) against the multi-tensor ops it replaces, alone and inside
Shampoo."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")

triton = pytest.importorskip("triton")


def _blocks(matrix: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    (r, c), (m, n) = grid, matrix.shape
    return matrix.reshape(r, m // r, c, n // c).transpose(1, 2).reshape(r * c, m // r, n // c)


@pytest.mark.parametrize(
    ("shape", "grid", "dtype", "nesterov", "decay"),
    [
        ((8, 12), (2, 3), torch.float32, True, 0.0),
        ((6, 20), (3, 4), torch.float32, False, 0.1),  # blocks of 2 x 5, several programs
        ((8, 8), (1, 1), torch.bfloat16, True, 0.05),
        ((4, 6, 2), (2, 2), torch.float16, False, 0.0),  # a 3-D parameter of a 4 x 12 work
    ],
)
def test_kernel_matches_the_multi_tensor_tail(monkeypatch, shape, grid, dtype, nesterov, decay):
    """d = s G~ + wd theta, m = mu m + d, theta -= lr (d + mu m | m): the same weights and
    momentum as the torch ops on the matrix (fp32 rounding only), the direction read in block
    order, for grids with several blocks, a masked tail and 16-bit weights."""
    from optimkit.kernels import blocked_momentum

    monkeypatch.setattr(blocked_momentum, "BLOCK", 16)
    gen = torch.Generator().manual_seed(1)
    numel = torch.Size(shape).numel()
    rows = numel // shape[-1] if len(shape) == 2 else 4
    work = (rows, numel // rows)
    direction = torch.randn(work, generator=gen)
    theta = torch.randn(shape, generator=gen).to(dtype)
    momentum = torch.randn(shape, generator=gen)
    scale = torch.tensor([0.7])
    expected_m = 0.9 * momentum + (0.7 * direction + decay * theta.float().reshape(work)).reshape(
        shape
    )
    d = (0.7 * direction + decay * theta.float().reshape(work)).reshape(shape)
    update = d + 0.9 * expected_m if nesterov else expected_m
    expected_theta = (theta.float() - 0.05 * update).to(dtype)

    blocks = _blocks(direction, grid).contiguous().to(DEVICE)
    theta, momentum = theta.to(DEVICE), momentum.to(DEVICE)
    blocked_momentum.blocked_momentum_update_(
        blocks, theta, momentum, scale.to(DEVICE), grid, 0.05, 0.9, decay, nesterov
    )
    torch.testing.assert_close(momentum.cpu(), expected_m, rtol=1e-6, atol=1e-6)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(theta.cpu().float(), expected_theta.float(), rtol=tol, atol=tol)


def test_kernel_refuses_what_it_cannot_take():
    from optimkit.kernels.blocked_momentum import blocked_momentum_update_

    blocks, one = torch.zeros(4, 2, 2, device=DEVICE), torch.ones(1, device=DEVICE)
    with pytest.raises(ValueError, match="fp32 direction"):
        blocked_momentum_update_(
            blocks.double(), torch.zeros(16), torch.zeros(16), one, (2, 2), 1, 0
        )
    with pytest.raises(ValueError, match="grid"):
        blocked_momentum_update_(
            blocks,
            torch.zeros(16, device=DEVICE),
            torch.zeros(16, device=DEVICE),
            one,
            (1, 2),
            1,
            0,
        )
    with pytest.raises(ValueError, match="one element"):
        blocked_momentum_update_(
            blocks,
            torch.zeros(16, device=DEVICE),
            torch.zeros(16, device=DEVICE),
            torch.ones(2, device=DEVICE),
            (2, 2),
            1,
            0,
        )


@pytest.mark.parametrize("graft", ["sgd", "none"])
def test_shampoo_with_the_kernel_follows_the_multi_tensor_ops(monkeypatch, graft):
    """Shampoo's arena members updated by the kernel (forced on for the interpreter on a
    CPU) follow the multi-tensor path, bf16 weights and weight decay included."""
    from optimkit import Shampoo
    from optimkit.kernels.blocked_momentum import takes
    from optimkit.optimizers import shampoo

    if DEVICE == "cpu":
        monkeypatch.setattr(shampoo, "_fused_tail_takes", takes)
    shapes = [(8, 12), (12, 8), (8, 8), (5,)]
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen) for s in shapes]
    init[2] = init[2].to(torch.bfloat16)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(shampoo, "FUSED_TAIL", fused)
        if not fused:
            monkeypatch.setattr(shampoo, "_fused_tail_takes", lambda *args: False)
        ps = [x.to(DEVICE, copy=True).requires_grad_() for x in init]
        hp = dict(lr=0.05, block_size=4, weight_decay=0.01, graft=graft)
        opt = Shampoo(ps, preconditioning_compute_steps=2, **hp)
        for t in range(4):
            g = torch.Generator().manual_seed(10 + t)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g).to(DEVICE, p.dtype)
            opt.step()
        runs.append([p.detach().float().cpu() for p in ps])
    for a, b in zip(*runs):
        tol = 0.05 if a.numel() == 64 else 1e-5  # bf16 weights: a few ulps (1/64) apart
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
