"""The generic battery (tests/battery.py) applied to wrapped optimizers.

Each case is an :class:`optimkit.OptimInfo` record whose ``cls`` builds the wrapper around a
fresh inner optimizer with the battery's arguments, so every check of ``battery.CHECKS`` runs
unchanged. ``state_bytes`` counts the inner optimizer's state only: the battery measures
``opt.state``, which a wrapper shares with its inner optimizer (the wrapper's own buffers are
checked in tests/wrappers).
"""

from __future__ import annotations

import pytest
from battery import CHECKS

import optimkit
from optimkit.registry import OptimInfo, Paper
from optimkit.transforms import AutoClip, GlobalNormClip, GrokfastEMA, SpikeClip
from optimkit.wrappers import EMA, Lookahead, MomentumReset, Transformed

AdamW = optimkit.AdamW


def _wrapped(name, wrap, skip=None):
    def build(params, impl=None, **hp):
        return wrap(AdamW(params, impl=impl, **hp))

    cls = type(
        name,
        (),
        {
            "__new__": lambda _cls, params, impl=None, **hp: build(params, impl, **hp),
            "hyperparams": AdamW.hyperparams,
            "supports_sparse": False,
            "needs_closure": False,
            "_uses_engine_step": classmethod(lambda _cls: True),
        },
    )
    return OptimInfo(
        name=name,
        cls=cls,
        paper=Paper("wrapped AdamW", "", 2024),
        category="wrapper",
        defaults=optimkit.info("AdamW").defaults,
        state_bytes=optimkit.info("AdamW").state_bytes,
        impls=AdamW.impls,
        supports_complex=True,
        needs_closure=False,
        battery={"skip": skip or {}},
    )


COUPLES_GROUPS = (
    "a global gradient norm couples the parameter groups, so two groups are not two "
    "independent optimizers (by design)"
)

# GlobalNormClip(50): a threshold that bites on the battery's problem; with 1.0, Adam's
# denominator underflows to 0 in float16 (v ~ 1e-3 g^2 with |g| ~ 1e-2; eps=1e-8 is 0 there).
RECORDS = [
    _wrapped("Lookahead(AdamW)", lambda opt: Lookahead(opt, k=3, alpha=0.5)),
    _wrapped("EMA(AdamW)", lambda opt: EMA(opt, decay=0.9)),
    _wrapped("MomentumReset(AdamW)", lambda opt: MomentumReset(opt, interval=3, warmup_steps=2)),
    _wrapped(
        "Transformed(AdamW, per-tensor chain)",
        lambda opt: Transformed(opt, [SpikeClip(threshold=4.0, delay=2), GrokfastEMA()]),
    ),
    _wrapped(
        "Transformed(AdamW, global chain)",
        lambda opt: Transformed(opt, [AutoClip(50.0), GlobalNormClip(50.0)]),
        skip={"param_groups": COUPLES_GROUPS},
    ),
]

CPU_IMPLS = ("reference", "foreach")
CASES = [
    (record, impl, check)
    for record in RECORDS
    for impl in record.impls
    if impl in CPU_IMPLS
    for check in CHECKS
]


@pytest.mark.parametrize(
    ("record", "impl", "check"), CASES, ids=[f"{r.name}-{i}-{c}" for r, i, c in CASES]
)
def test_battery_wrapped(record: OptimInfo, impl: str, check: str) -> None:
    reason = record.battery.get("skip", {}).get(check)
    if reason:
        pytest.skip(reason)
    CHECKS[check](record, impl)
