"""The generic battery: properties every registered optimizer must have.

Each check takes an :class:`optimkit.OptimInfo` and an impl and asserts; ``tests/test_battery.py``
applies them to every registered optimizer. A new optimizer gets all of them by being registered.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import pytest
import torch

import optimkit
from optimkit.engine import Betas, Choice, Flag, Interval
from optimkit.registry import REFERENCE_LAYER, REFERENCE_SHAPES

SHAPES = [(), (7,), (5, 3), (4, 3, 3, 3)]  # a scalar, a vector, a matrix, a conv kernel


def make_params(dtype=torch.float64, seed=0, shapes=SHAPES, complex_=False):
    gen = torch.Generator().manual_seed(seed)
    if complex_:
        dtype = {torch.float32: torch.complex64, torch.float64: torch.complex128}[dtype]
    params = []
    for shape in shapes:
        p = torch.randn(shape, generator=gen, dtype=torch.float64)
        if complex_:
            p = torch.complex(p, torch.randn(shape, generator=gen, dtype=torch.float64))
        params.append(p.to(dtype).requires_grad_())
    return params


def quadratic_loss(params, step: int, noise: float = 0.1):
    """A convex quadratic with per-step deterministic noise (a noisy least-squares problem)."""
    gen = torch.Generator().manual_seed(1000 + step)
    loss = 0.0
    for i, p in enumerate(params):
        real = torch.view_as_real(p) if p.is_complex() else p
        target = torch.linspace(-1, 1, real.numel(), dtype=torch.float64).reshape(real.shape)
        curvature = 1.0 + i
        shift = noise * torch.randn(real.shape, generator=gen, dtype=torch.float64)
        diff = real.double() - target - shift
        loss = loss + 0.5 * curvature * (diff * diff).sum()
    return loss


def hp_for(record: optimkit.OptimInfo, **overrides):
    hp = dict(record.battery.get("hp", {}))
    hp.update(overrides)
    return hp


def build(record, params, impl=None, **overrides):
    return record.cls(params, impl=impl, **hp_for(record, **overrides))


def drive(opt, params, steps: int, start: int = 0, loss_fn: Callable = quadratic_loss):
    losses = []
    for s in range(start, start + steps):

        def closure(s=s):
            opt.zero_grad()
            loss = loss_fn(params, s)
            loss.backward()
            return loss

        loss = opt.step(closure)
        losses.append(loss.item())
    return losses


def state_tensors(opt):
    """Every tensor in the optimizer state, in parameter order."""
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            for key in sorted(opt.state[p]):
                value = opt.state[p][key]
                if isinstance(value, torch.Tensor):
                    out.append((key, value))
    return out


def assert_same(a, b, rtol=0.0, atol=0.0, what=""):
    assert len(a) == len(b), what
    for x, y in zip(a, b):
        if isinstance(x, tuple):
            assert x[0] == y[0], what
            x, y = x[1], y[1]
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def bad_values(spec):
    """Values that a spec must reject."""
    if isinstance(spec, Interval):
        out = []
        if spec.low != -math.inf:
            out.append(spec.low - 1.0 if not spec.low_open else spec.low)
        if spec.high != math.inf:
            out.append(spec.high + 1.0 if not spec.high_open else spec.high)
        out.append(float("nan"))
        return out
    if isinstance(spec, Betas):
        return [(1.5,) * spec.count, (0.5,) * (spec.count + 1)]
    if isinstance(spec, Flag):
        return ["yes"]
    if isinstance(spec, Choice):
        return ["__not_an_option__"]
    return []


# ----------------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------------
def check_defaults_construct(record, impl):
    params = make_params()
    opt = record.cls(params, impl=impl)
    assert isinstance(opt, torch.optim.Optimizer)
    for key, value in record.defaults.items():
        assert opt.param_groups[0][key] == value


def check_rejects_bad_input(record, impl):
    params = make_params()
    try:
        record.cls(params, impl=impl, not_a_hyperparameter=1.0)
    except TypeError as error:
        assert "not_a_hyperparameter" in str(error)
    else:
        raise AssertionError("unknown keyword accepted")
    for name, hyper in record.cls.hyperparams.items():
        for value in bad_values(hyper.spec):
            try:
                record.cls(make_params(), impl=impl, **{name: value})
            except ValueError as error:
                assert name in str(error), f"error for {name}={value!r} does not name it: {error}"
            else:
                raise AssertionError(f"{name}={value!r} accepted")
    try:
        record.cls(make_params(), impl="no-such-path")
    except ValueError as error:
        assert "impl" in str(error)
    else:
        raise AssertionError("unknown impl accepted")


def check_lowers_loss(record, impl):
    params = make_params()
    opt = build(record, params, impl)
    first = quadratic_loss(params, 0, noise=0.0).item()
    drive(opt, params, 60, loss_fn=lambda ps, s: quadratic_loss(ps, s, noise=0.0))
    last = quadratic_loss(params, 0, noise=0.0).item()
    assert last < first, f"loss went from {first} to {last}"


def check_impl_matches_reference(record, impl):
    if impl == "reference":
        return
    results = []
    for path in ("reference", impl):
        params = make_params()
        opt = build(record, params, path)
        drive(opt, params, 12)
        results.append(([p.detach() for p in params], state_tensors(opt)))
    assert_same(results[0][0], results[1][0], rtol=1e-12, atol=1e-12, what="params")
    assert_same(results[0][1], results[1][1], rtol=1e-12, atol=1e-12, what="state")


def check_cpu_chunks_match_reference(record, impl):
    """With tiny CPU chunks (tensors cut or packed as the class's elementwise/tensorwise flags
    allow), the foreach path still equals the reference path."""
    import optimkit.engine as engine

    if impl == "reference":
        return
    saved = engine.CPU_CHUNK_NUMEL
    engine.CPU_CHUNK_NUMEL = 5
    try:
        check_impl_matches_reference(record, impl)
    finally:
        engine.CPU_CHUNK_NUMEL = saved


def check_state_dict_round_trip(record, impl):
    params = make_params()
    opt = build(record, params, impl)
    drive(opt, params, 5)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved_params = [p.detach().clone() for p in params]
    drive(opt, params, 5, start=5)

    resumed = [p.clone().detach().requires_grad_() for p in saved_params]
    opt2 = build(record, resumed, impl)
    buffer.seek(0)
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    drive(opt2, resumed, 5, start=5)
    assert_same([p.detach() for p in params], [p.detach() for p in resumed], what="params")
    assert_same(state_tensors(opt), state_tensors(opt2), what="state")
    assert opt.state_dict()["param_groups"] == opt2.state_dict()["param_groups"]


def check_load_casts_state(record, impl):
    params = make_params(torch.float64)
    opt = build(record, params, impl)
    drive(opt, params, 3)
    target = make_params(torch.float32)
    opt32 = build(record, target, impl)
    opt32.load_state_dict(opt.state_dict())
    for p in target:
        for key, value in opt32.state[p].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and key != "step":
                assert value.dtype == torch.float32, key
    drive(opt32, target, 2, start=3)
    assert all(torch.isfinite(p).all() for p in target)


def check_bf16_checkpoint_loads_exactly(record, impl):
    """A checkpoint of bf16 parameters loads back with every state tensor's dtype and bits."""
    params = make_params(torch.bfloat16)
    opt = build(record, params, impl)
    drive(opt, params, 3)
    saved = copy.deepcopy(opt.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in params]
    loaded = build(record, twin, impl)
    loaded.load_state_dict(saved)
    before, after = state_tensors(opt), state_tensors(loaded)
    assert [k for k, _ in before] == [k for k, _ in after]
    for (key, x), (_, y) in zip(before, after):
        assert x.dtype == y.dtype, key
        assert torch.equal(x, y), key


def check_param_groups(record, impl):
    """Two groups with different hyperparameters == two optimizers, one per group."""
    base = hp_for(record)
    lr = base.get("lr", record.defaults["lr"])
    lr = float(lr)
    params = make_params()
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": lr * 0.5}]
    opt = record.cls(groups, impl=impl, **base)
    drive(opt, params, 6)

    split = make_params()
    opt_a = record.cls(split[:2], impl=impl, **base)
    opt_b = record.cls(split[2:], impl=impl, **{**base, "lr": lr * 0.5})
    for s in range(6):

        def closure(s=s):
            opt_a.zero_grad()
            opt_b.zero_grad()
            loss = quadratic_loss(split, s)  # separable: each group sees only its own terms
            loss.backward()
            return loss

        opt_a.step(closure)
        opt_b.step(closure)
    assert_same(
        [p.detach() for p in params],
        [p.detach() for p in split],
        rtol=1e-12,
        atol=1e-12,
        what="params",
    )


def check_grad_none_untouched(record, impl):
    params = make_params()
    frozen = torch.randn(3, 3, dtype=torch.float64)
    before = frozen.clone()
    opt = build(record, [*params, frozen], impl)
    drive(opt, params, 4)
    assert torch.equal(frozen, before)
    assert len(opt.state[frozen]) == 0


def check_maximize(record, impl):
    if "maximize" not in record.cls.hyperparams:
        return
    a, b = make_params(), make_params()
    opt_a = build(record, a, impl, maximize=True)
    opt_b = build(record, b, impl)
    drive(opt_a, a, 6, loss_fn=lambda ps, s: -quadratic_loss(ps, s))
    drive(opt_b, b, 6)
    assert_same(
        [p.detach() for p in a], [p.detach() for p in b], rtol=1e-12, atol=1e-12, what="maximize"
    )


def check_complex(record, impl):
    shapes = [(7,), (5, 3)]
    if not record.supports_complex:
        try:
            record.cls(make_params(shapes=shapes, complex_=True), impl=impl)
        except ValueError as error:
            assert "complex" in str(error)
            return
        raise AssertionError("complex parameters accepted by an optimizer that says it can't")
    z = make_params(shapes=shapes, complex_=True)
    r = [torch.view_as_real(p.detach()).clone().requires_grad_() for p in z]
    opt_z = build(record, z, impl)
    opt_r = build(record, r, impl)
    drive(opt_z, z, 6)
    drive(opt_r, r, 6)
    assert_same(
        [torch.view_as_real(p.detach()) for p in z],
        [p.detach() for p in r],
        rtol=1e-10,
        atol=1e-12,
        what="complex",
    )


def check_low_precision(record, impl):
    for dtype in (torch.bfloat16, torch.float16):
        params = make_params(dtype)
        opt = build(record, params, impl)
        drive(opt, params, 5)
        for p in params:
            assert p.dtype == dtype
            assert torch.isfinite(p).all()


def check_zero_grad_no_nan(record, impl):
    for dtype in (torch.float32, torch.float64):
        params = make_params(dtype)
        opt = build(record, params, impl)
        drive(opt, params, 5, loss_fn=lambda ps, s: sum((p * 0).sum() for p in ps))
        for p in params:
            assert torch.isfinite(p).all()
        for _, value in state_tensors(opt):
            if value.is_floating_point():
                assert torch.isfinite(value).all()


def check_deterministic(record, impl):
    runs = []
    for _ in range(2):
        params = make_params()
        opt = build(record, params, impl)
        drive(opt, params, 6)
        runs.append([p.detach() for p in params])
    assert_same(runs[0], runs[1], what="two runs")


def check_closure_and_hooks(record, impl):
    params = make_params()
    opt = build(record, params, impl)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: calls.append("post"))

    def closure():
        calls.append("closure")
        opt.zero_grad()
        loss = quadratic_loss(params, 0)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert calls == ["pre", "closure", "post"]
    opt.zero_grad()
    assert all(p.grad is None for p in params)


def check_scheduler_and_tensor_lr(record, impl):
    base = hp_for(record)
    lr = float(base.get("lr", record.defaults["lr"]))
    a, b = make_params(), make_params()
    opt_a = record.cls(a, impl=impl, **{**base, "lr": torch.tensor(lr, dtype=torch.float64)})
    opt_b = record.cls(b, impl=impl, **{**base, "lr": lr})
    sched = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.5)
    for s in range(5):
        drive(opt_a, a, 1, start=s)
        drive(opt_b, b, 1, start=s)
        sched.step()
        opt_a.param_groups[0]["lr"].fill_(opt_b.param_groups[0]["lr"])
    assert_same(
        [p.detach() for p in a],
        [p.detach() for p in b],
        rtol=1e-12,
        atol=1e-12,
        what="tensor lr + scheduler",
    )
    assert opt_b.param_groups[0]["lr"] == lr * 0.25


def check_state_bytes(record, impl):
    """info().state_bytes equals what the optimizer allocates for fp32 parameters."""
    if record.needs_model:  # the reference layer itself, with its hooks
        layer = torch.nn.Linear(*REFERENCE_LAYER)
        params = list(layer.parameters())
        opt = record.cls(layer, impl=impl)
        inputs = torch.randn(8, REFERENCE_LAYER[0])
        drive(opt, params, 1, loss_fn=lambda ps, s: layer(inputs).pow(2).sum())
    else:
        params = [torch.randn(shape, requires_grad=True) for shape in REFERENCE_SHAPES]
        opt = record.cls(params, impl=impl)  # the defaults, as info() reports them
        drive(opt, params, 1, loss_fn=lambda ps, s: sum((p * p).sum() for p in ps))
    total = sum(v.numel() * v.element_size() for _, v in state_tensors(opt) if v.dim() > 0)
    numel = sum(p.numel() for p in params)
    assert total / numel == record.state_bytes, (total / numel, record.state_bytes)


def check_sparse_error(record, impl):
    if record.cls.supports_sparse:
        return
    p = torch.randn(5, 3, requires_grad=True)
    opt = build(record, [p], impl)
    p.grad = torch.randn(5, 3).to_sparse()
    try:
        opt.step()
    except RuntimeError as error:
        assert "sparse" in str(error)
    else:
        raise AssertionError("sparse gradient accepted")


def check_state_dict_is_copy_safe(record, impl):
    """state_dict() can be deep-copied and loaded into a fresh optimizer twice."""
    params = make_params()
    opt = build(record, params, impl)
    drive(opt, params, 2)
    sd = copy.deepcopy(opt.state_dict())
    for _ in range(2):
        fresh = build(record, [p.detach().clone().requires_grad_() for p in params], impl)
        fresh.load_state_dict(sd)
        assert len(fresh.state) == len(opt.state)


def _assert_state_dtypes(opt, precision):
    """Each floating state buffer has the dtype ``state_dtype`` names: ``precision`` unless
    the optimizer keeps that entry in a precision of its own (e.g. fp32 norms)."""
    while not hasattr(opt, "state_buffers"):  # a wrapper: its inner optimizer's state
        opt = opt.optimizer
    buffers = set(opt.state_buffers(opt.group_hyperparams(opt.param_groups[0])))
    checked = 0
    for p in opt.param_groups[0]["params"]:
        for key, value in opt.state[p].items():
            if key in buffers and value.is_floating_point():
                assert value.dtype == opt.state_dtype(key, p), (key, value.dtype)
                checked += value.dtype == precision
    assert checked or not buffers  # at least one buffer follows state_precision


def check_state_precision(record, impl):
    """``state_precision``: fp32 state for bf16 parameters computes the step in fp32 and rounds
    once (one step == the fp32 step of the same numbers, rounded), and checkpoints keep the
    fp32 state; bf16 state for fp32 parameters stays bf16 and loads back exactly. Optimizers
    with their own step refuse the option with a TypeError."""
    if not record.cls._uses_engine_step():
        with pytest.raises(TypeError, match="state_precision"):
            build(record, make_params(torch.float32), impl, state_precision=torch.float32)
        return
    params = make_params(torch.bfloat16)
    drive(build(record, params, impl), params, 1)  # bf16 gradients of the battery's loss
    grads = [p.grad.detach().clone() for p in params]

    def one_step(opt, ps, gs):
        def closure():
            for p, g in zip(ps, gs):
                p.grad = g.clone()
            return torch.zeros(())

        closure()
        opt.step(closure if record.cls.needs_closure else None)

    narrow = [p.detach().clone().requires_grad_() for p in params]
    opt = build(record, narrow, impl, state_precision=torch.float32)
    one_step(opt, narrow, grads)
    wide = [p.detach().float().requires_grad_() for p in params]
    one_step(build(record, wide, impl), wide, [g.float() for g in grads])
    assert_same(narrow, [w.detach().to(torch.bfloat16) for w in wide], what="one step")
    _assert_state_dtypes(opt, torch.float32)
    one_step(opt, narrow, grads)
    twin = [p.detach().clone().requires_grad_() for p in narrow]
    loaded = build(record, twin, impl, state_precision=torch.float32)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for (key, x), (_, y) in zip(state_tensors(opt), state_tensors(loaded)):
        assert x.dtype == y.dtype and torch.equal(x, y), key

    params = make_params(torch.float32)
    opt = build(record, params, impl, state_precision=torch.bfloat16)
    losses = drive(opt, params, 3)
    assert all(math.isfinite(v) for v in losses)
    _assert_state_dtypes(opt, torch.bfloat16)
    loaded = build(
        record,
        [p.detach().clone().requires_grad_() for p in params],
        impl,
        state_precision=torch.bfloat16,
    )
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for (key, x), (_, y) in zip(state_tensors(opt), state_tensors(loaded)):
        assert x.dtype == y.dtype and torch.equal(x, y), key


CHECKS = {
    name[len("check_") :]: fn for name, fn in list(globals().items()) if name.startswith("check_")
}
