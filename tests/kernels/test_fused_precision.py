"""``state_precision`` on the fused path: the kernels take each column in its own dtype, so
bf16 parameters with fp32 state (and fp32 parameters with bf16 state) run in one launch, and
give what the foreach path gives with the same ``state_precision`` (which computes in fp32 on
widened copies and rounds once).

Runs in Triton's CPU interpreter unless ``OPTIMKIT_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")  # the interpreter: see conftest.py

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import optimkit  # noqa: E402

SHAPES = [(), (7,), (5, 3), (4, 3, 3, 3)]
STEPS = 6
BF16_ULP = 2.0**-7
NAMES = ["AdamW", "Adan", "Lion", "SGD", "RAdam", "AdaBelief"]
HP = {"SGD": {"momentum": 0.9}}

pytestmark = pytest.mark.usefixtures("small_chunks")  # conftest.py


def run(name, impl, param_dtype, state_precision):
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE, param_dtype).requires_grad_()
        for s in SHAPES
    ]
    opt = optimkit.info(name).cls(
        params, impl=impl, lr=1e-2, state_precision=state_precision, **HP.get(name, {})
    )
    for s in range(STEPS):
        gen = torch.Generator().manual_seed(100 + s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64).to(DEVICE, p.dtype)
        opt.step()
    state = [(k, v) for p in params for k, v in sorted(opt.state[p].items()) if k != "step"]
    return params, state


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("param_dtype", "state_precision"),
    [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)],
    ids=["bf16-params-fp32-state", "fp32-params-bf16-state"],
)
def test_fused_state_precision_matches_foreach(name, param_dtype, state_precision):
    fused, fused_state = run(name, "fused", param_dtype, state_precision)
    ref, ref_state = run(name, "foreach", param_dtype, state_precision)
    for a, b in zip(fused, ref):
        assert a.dtype == param_dtype
        tol = 2 * BF16_ULP if param_dtype == torch.bfloat16 else 1e-5
        assert rel_err(a.detach(), b.detach()) <= tol
    assert [k for k, _ in fused_state] == [k for k, _ in ref_state]
    for (key, a), (_, b) in zip(fused_state, ref_state):
        assert a.dtype == b.dtype == state_precision, key
        tol = 2 * BF16_ULP if state_precision == torch.bfloat16 else 1e-5
        # bf16 parameters: the fp32 state follows gradients of parameters that differ by
        # rounding, so allow one bf16 ulp there too
        tol = max(tol, 2 * BF16_ULP if param_dtype == torch.bfloat16 else 0.0)
        assert rel_err(a, b) <= tol, key


def test_kahan_on_a_fused_bucket_runs_the_compensated_foreach_path():
    """The kernels have no compensated variant: ``kahan=True`` makes a fused bucket of bf16
    parameters take the foreach path, so results equal foreach's exactly."""
    results = []
    for impl in ("fused", "foreach"):
        p = torch.ones(40, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        opt = optimkit.AdamW([p], impl=impl, lr=1e-4, kahan=True)
        for s in range(STEPS):
            gen = torch.Generator().manual_seed(s)
            p.grad = torch.randn(40, generator=gen).to(DEVICE, torch.bfloat16)
            opt.step()
        results.append((p.detach().clone(), opt.state[p]["kahan_comp"].clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
