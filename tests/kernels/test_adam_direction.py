"""The fused pass of SOAP's elementwise step (optimkit.kernels.adam_direction) against the
torch ops it replaces (optimkit.optimizers.soap.adam_direction with the kernel off)."""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")

triton = pytest.importorskip("triton")


def _tensors(numel: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(numel, generator=gen)
    exp_avg = torch.randn(numel, generator=gen)
    exp_avg_sq = torch.rand(numel, generator=gen)
    exp_avg_sq[:3] = 0.0  # sqrt(0) + eps
    return [t.to(DEVICE) for t in (grad, exp_avg, exp_avg_sq)]


@pytest.mark.parametrize("numel", [1, 37, 64, 1000])
@pytest.mark.parametrize("in_place", [False, True])
def test_kernel_matches_the_torch_ops(monkeypatch, numel, in_place):
    """Moments and direction as the six torch ops give them (a masked tail when numel is not
    a multiple of the block; ``out`` may be ``grad``)."""
    from optimkit.kernels.adam_direction import adam_direction_
    from optimkit.optimizers import soap

    monkeypatch.setattr(soap, "FUSED_DIRECTION", False)
    grad, exp_avg, exp_avg_sq = _tensors(numel)
    expected_m, expected_v = exp_avg.clone(), exp_avg_sq.clone()
    expected = soap.adam_direction(grad.clone(), expected_m, expected_v, 0.9, 0.95, 1e-8)
    out = grad if in_place else torch.empty_like(grad)
    block = 16 if DEVICE == "cpu" else 4096
    result = adam_direction_(grad, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-8, out, block=block)
    assert result is out
    torch.testing.assert_close(exp_avg, expected_m, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, expected_v, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(out).all()


def test_kernel_writes_a_bf16_direction_rounded_to_nearest(monkeypatch):
    """A bfloat16 ``out`` (SOAP's bf16 products): the fp32 direction rounded to nearest even
    (torch's ``.to(torch.bfloat16)``), the moments as in fp32."""
    from optimkit.kernels.adam_direction import adam_direction_
    from optimkit.optimizers import soap

    monkeypatch.setattr(soap, "FUSED_DIRECTION", False)
    grad, exp_avg, exp_avg_sq = _tensors(1000, seed=3)
    expected_m, expected_v = exp_avg.clone(), exp_avg_sq.clone()
    expected = soap.adam_direction(grad.clone(), expected_m, expected_v, 0.9, 0.95, 1e-8)
    out = torch.empty_like(grad, dtype=torch.bfloat16)
    block = 16 if DEVICE == "cpu" else 4096
    adam_direction_(grad, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-8, out, block=block)
    torch.testing.assert_close(exp_avg, expected_m, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(exp_avg_sq, expected_v, rtol=1e-6, atol=1e-7)
    # equal to torch's rounding of the same fp32 direction, but for a tie-breaking neighbour
    # where the fp32 directions differ in their last bit
    mismatch = (out.float() != expected.to(torch.bfloat16).float()).float().mean()
    assert mismatch < 1e-2, float(mismatch)
    torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=1e-6)
    torch_ops = torch.empty_like(out)  # the torch ops also write a bf16 direction
    soap.adam_direction(
        grad.clone(), exp_avg.clone(), exp_avg_sq.clone(), 0.9, 0.95, 1e-8, torch_ops
    )
    assert torch_ops.dtype == torch.bfloat16


def test_kernel_refuses_what_it_cannot_take():
    """A tensor of another shape, a strided one, or one not fp32 is refused by name; an empty
    tensor is a no-op."""
    from optimkit.kernels.adam_direction import adam_direction_

    grad, exp_avg, exp_avg_sq = _tensors(8)
    with pytest.raises(ValueError, match="exp_avg_sq must be contiguous"):
        adam_direction_(grad, exp_avg, exp_avg_sq[:4], 0.9, 0.95, 1e-8, grad)
    with pytest.raises(ValueError, match="out must be contiguous"):
        adam_direction_(grad, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-8, torch.empty(16)[::2])
    with pytest.raises(ValueError, match="exp_avg must be torch.float32"):
        adam_direction_(grad, exp_avg.double(), exp_avg_sq, 0.9, 0.95, 1e-8, grad)
    with pytest.raises(ValueError, match="out must be torch.float32 or torch.bfloat16"):
        adam_direction_(grad, exp_avg, exp_avg_sq, 0.9, 0.95, 1e-8, grad.half())
    empty = torch.empty(0, device=DEVICE)
    assert adam_direction_(empty, empty, empty, 0.9, 0.95, 1e-8, empty) is empty


@pytest.mark.skipif(DEVICE != "cuda", reason="SOAP takes the kernel on CUDA only")
def test_soap_takes_the_kernel_on_cuda(monkeypatch):
    """On CUDA, SOAP's step launches the kernel and follows the torch ops' trajectory."""
    import optimkit.kernels.adam_direction as module
    from optimkit.optimizers import soap

    launches = []
    kernel = module.adam_direction_

    def counted(*args, **kwargs):
        launches.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(module, "adam_direction_", counted)
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(soap, "FUSED_DIRECTION", fused)
        gen = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.randn(s, device="cuda", generator=gen) for s in ((32, 16), (32, 16), (7,))]
        params = [p.requires_grad_() for p in params]
        opt = soap.SOAP(params, precondition_frequency=3)
        for _ in range(8):
            for p in params:
                p.grad = torch.randn(p.shape, device="cuda", generator=gen)
            opt.step()
        runs.append([p.detach() for p in params])
    assert launches
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
