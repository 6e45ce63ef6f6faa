"""Rules with per-tensor reductions (``Reduction``): the reduction pass sees the gradient as
the rule does (unscaled by GradScaler's ``grad_scale``, negated for ``maximize``), and bf16
parameters work. The options of each rule are covered by ``CASES`` in test_fused.py.

Runs in Triton's CPU interpreter unless ``OPTIMKIT_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")  # the interpreter: see conftest.py

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import optimkit  # noqa: E402
from optimkit.kernels.registry import registered  # noqa: E402

SHAPES = [(), (7,), (5, 3), (4, 3, 3, 3)]
REDUCING = sorted(cls.__name__ for cls, rule in registered().items() if rule.reduction)
# SGD-SaI's g-SNR ||g|| / (std(g) + eps) is nearly scale-free for a tiny eps: a large one
# makes a forgotten unscaling visible
HP = {"SGDSaI": {"eps": 1.0}}

pytestmark = pytest.mark.usefixtures("small_chunks")  # conftest.py


def run(name, impl, dtype=torch.float32, scale=None, steps=4):
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
        for s in SHAPES
    ]
    hp = HP.get(name, {})
    opt = optimkit.info(name).cls(params, impl=impl, lr=1e-2, maximize=True, **hp)
    if scale is not None:
        opt.grad_scale = torch.tensor(scale, device=DEVICE)
        opt.found_inf = torch.tensor(0.0, device=DEVICE)
    for s in range(steps):
        gen = torch.Generator().manual_seed(100 + s)
        for p in params:
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * (scale or 1.0)
            p.grad = g.to(DEVICE, dtype)
        opt.step()
    return params


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_the_reducing_rules_are_covered():
    assert {"LAMB", "LARS", "NovoGrad", "Gravity", "SGDSaI"} <= set(REDUCING)


@pytest.mark.parametrize("name", REDUCING)
def test_grad_scale_reaches_the_reduction(name):
    reference = run(name, "reference")
    fused = run(name, "fused", scale=1024.0)
    for a, b in zip(fused, reference):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("name", REDUCING)
def test_bf16_parameters(name):
    """bf16 parameters and state: within a few bf16 roundings of the foreach path."""
    fused = run(name, "fused", dtype=torch.bfloat16)
    foreach = run(name, "foreach", dtype=torch.bfloat16)
    for a, b in zip(fused, foreach):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, b) <= 4 * 2.0**-7


def test_roofline_bytes_count_the_reduction_pass():
    from optimkit.kernels.bench import fused_bytes_per_param

    def nbytes(name):
        return fused_bytes_per_param(optimkit.info(name).cls, optimkit.info(name).defaults)

    assert nbytes("AdamW") == 28  # p r/w, g, two moments r/w
    assert nbytes("LAMB") == 28 + 16  # + the pass reading p, g and both moments
    assert nbytes("NovoGrad") == 20 + 4  # 0-d second moment not counted; + g (p unused)
    assert nbytes("SGDSaI") == 20  # no extra pass; 0-d g-SNR not counted
