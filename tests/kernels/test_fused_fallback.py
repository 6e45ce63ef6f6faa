"""Groups a fused rule declines (``register_fused(..., supports=...)``) run the class's foreach
rule on the fused path: SPAM's sparse momentum (``density < 1``) and CoRe's score history.

Runs in Triton's CPU interpreter unless ``OPTIMKIT_TEST_DEVICE=cuda``.
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")  # the interpreter: see conftest.py

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import optimkit  # noqa: E402
from optimkit.kernels.registry import rule_for  # noqa: E402

CASES = [
    ("SPAM", {"density": 0.5, "reset_interval": 3, "warmup_steps": 1, "clip_delay": 1}),
    ("CoRe", {"score_history": 2, "frozen": 0.25}),
    ("TVLARS", {"weight_decay_filter": True, "weight_decay": 0.1}),
]
#: the setting of each that the kernel takes (for a second param group)
TAKEN = {"SPAM": {"density": 1.0}, "CoRe": {"score_history": 0}, "TVLARS": {"weight_decay": 0}}


def run(name, hp, impl, mixed=False):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (4, 3)]
    params = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_() for s in shapes]
    groups = [{"params": list(params)}]
    if mixed:  # a second group the kernel does take
        dense = torch.randn(7, generator=gen).to(DEVICE).requires_grad_()
        params.append(dense)
        groups.append({"params": [dense], **TAKEN[name]})
    opt = optimkit.info(name).cls(groups, impl=impl, lr=1e-2, **hp)
    for s in range(6):
        gen = torch.Generator().manual_seed(10 + s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(DEVICE)
        opt.step()
    return params


@pytest.mark.parametrize(("name", "hp"), CASES, ids=[n for n, _ in CASES])
def test_declined_groups_run_the_foreach_rule(name, hp):
    record = rule_for(optimkit.info(name).cls)
    assert (
        record is not None
        and record.supports is not None
        and not record.supports(optimkit.info(name).cls.with_defaults(hp))
    )
    fused = run(name, hp, "fused")
    foreach = run(name, hp, "foreach")
    for a, b in zip(fused, foreach):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("name", "hp"), CASES, ids=[n for n, _ in CASES])
def test_declined_and_taken_groups_together(name, hp):
    """One group declined, one fused: each path matches the reference."""
    fused = run(name, hp, "fused", mixed=True)
    reference = run(name, hp, "reference", mixed=True)
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_exact_mars_with_a_closure_takes_the_foreach_rule():
    """MARS's exact variant (step with a closure) is declined; the approximate one is fused."""
    results = []
    for impl in ("fused", "foreach"):
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(6, 5, generator=gen).to(DEVICE).requires_grad_()
        target = torch.randn(6, 5, generator=gen).to(DEVICE)
        opt = optimkit.MARS([w], impl=impl, lr=1e-2)

        def closure(opt=opt, w=w, target=target):
            opt.zero_grad()
            loss = ((w - target) ** 2).sum()
            loss.backward()
            return loss

        for _ in range(4):
            opt.step(closure)
        results.append(w.detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-7)
