"""impl="fused" (Triton kernels) against the reference path.

On a machine without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set here before Triton is imported) on tiny shapes; ``OPTIMKIT_TEST_DEVICE=cuda`` runs the same
tests on a GPU with compiled kernels. Every optimizer with a registered fused rule is checked
automatically, with each of its options.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

import optimkit  # noqa: E402
from optimkit import kernels  # noqa: E402
from optimkit.kernels.registry import registered  # noqa: E402

SHAPES = [(), (7,), (5, 3), (4, 3, 3, 3)]  # a scalar, a vector, a matrix, a conv kernel
STEPS = 8
BF16_ULP = 2.0**-7

# One case per option of each optimizer (not the full product: the interpreter is slow).
CASES = {
    "Adam": [{}, {"amsgrad": True}, {"weight_decay": 0.1, "maximize": True}],
    "AdamW": [{}, {"weight_decay": 0.1, "betas": (0.8, 0.99)}],
    "AMSGrad": [{"decoupled_weight_decay": True, "weight_decay": 0.05}],
    "AdaMax": [{}, {"weight_decay": 0.1, "maximize": True}],
    "SGD": [
        {},
        {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"momentum": 0.9, "dampening": 0.5},
    ],
    "SGDW": [{"momentum": 0.9, "weight_decay": 0.1}],
    "Lion": [{}, {"weight_decay": 0.1, "betas": (0.95, 0.98), "maximize": True}],
    "RMSprop": [
        {},
        {"momentum": 0.9, "weight_decay": 0.1},
        {"centered": True, "momentum": 0.5, "alpha": 0.9},
    ],
    "RAdam": [
        {},  # steps 1-5 take the SGD-like step, 6-8 the rectified one
        {"decoupled_weight_decay": True, "weight_decay": 0.1},
        {"degenerated_to_sgd": False, "maximize": True},
    ],
    "ADOPT": [
        {},
        {"decoupled_weight_decay": True, "weight_decay": 0.1},
        {"clip": False, "weight_decay": 0.1, "maximize": True},
    ],
    "AdaMod": [{}, {"beta3": 0.9, "weight_decay": 0.1}],
    "Grams": [{}, {"weight_decay": 0.1, "maximize": True}],
    "AdaBound": [{}, {"final_lr": 0.05, "gamma": 0.1, "weight_decay": 0.1}],
    "AMSBound": [{}],
    "AdaGrad": [
        {},
        {"lr_decay": 0.01, "initial_accumulator_value": 0.1, "weight_decay": 0.1, "maximize": True},
    ],
    "EXAdam": [{}, {"growing_lr": True, "weight_decay": 0.1, "maximize": True}],
    "OptimisticAMSGrad": [{}, {"weight_decay": 0.1, "betas": (0.8, 0.95), "maximize": True}],
    "MADGRAD": [
        {},
        {"momentum": 0.0, "weight_decay": 0.1},
        {"decouple_decay": True, "weight_decay": 0.1, "maximize": True},
        {"momentum": 0.0, "eps": 0.0, "decouple_decay": True, "weight_decay": 0.05},
    ],
    # resets at steps 4 and 8, warm-up after each, clipping from step 1 (threshold 2)
    "SPAM": [
        {"reset_interval": 4, "warmup_steps": 2, "clip_delay": 1, "threshold": 2.0},
        {"weight_decay": 0.1, "maximize": True, "clip_delay": 0, "reset_interval": 0},
    ],
    "LAMB": [
        {},
        {"bias_correction": False, "grad_averaging": False, "weight_decay": 0.0},
        {"exclude_from_layer_adaptation": True, "maximize": True, "betas": (0.8, 0.9)},
    ],
    "LARS": [
        {},
        {"exclude_from_layer_adaptation": True, "weight_decay": 0.0, "eps": 0.0},
        {"momentum": 0.5, "trust_coefficient": 0.02, "maximize": True},
    ],
    "TVLARS": [
        {},
        {"lars_adaptation_filter": True, "delay_steps": 3, "min_scale": 0.1, "maximize": True},
        {"norm_clip": 0.5, "weight_decay": 0.0},
    ],
    "NovoGrad": [
        {},
        {"grad_averaging": True, "weight_decay": 0.01, "maximize": True},
    ],
    "Gravity": [{}, {"alpha": 0.0, "beta": 0.5, "weight_decay": 0.1, "maximize": True}],
    "SGDSaI": [
        {},
        {"momentum": 0.0, "weight_decay": 0.1, "eps": 0.5},
        {"weight_decay": 0.01, "maximize": True},
    ],
    "ComplexMomentum": [
        {},
        {"momentum_phase": -1.0, "momentum": 0.5, "weight_decay": 0.1, "maximize": True},
    ],
    "MARS": [
        {},
        {"optimizer": "lion", "weight_decay": 0.1, "weight_decay_1d": 0.0, "maximize": True},
        {"optimize_1d": True, "amsgrad": True, "gamma": 0.5},
        {"optimizer": "lion", "optimize_1d": True, "lr_1d_factor": 0.5},
    ],
    "AdaGradNorm": [{}, {"b0": 0.5, "weight_decay": 0.1, "maximize": True}],
    "ClipRAdaGradD": [
        {"max_grad_norm": 0.5},
        {"clipping": "global", "weight_decay": 0.1, "maximize": True},
        {"clipping": "elementwise", "max_grad_norm": 0.3, "eta": 0.5},
        {"clipping": "none", "initial_accumulator_value": 0.0, "eps": 1e-3},
    ],
    "StableSPAM": [
        {"reset_interval": 4},
        {"total_steps": 10, "amsgrad": True, "weight_decay": 0.1, "maximize": True},
        {"reset_interval": 0, "theta": 0.5, "gamma1": 0.9},
    ],
    # a loose switch tolerance makes tensors switch to SGD within the 8 steps
    "SWATS": [{}, {"switch_tol": 1.0, "weight_decay": 0.1, "maximize": True}],
    "CoRe": [
        {},
        {"betas": (0.7, 0.8, 5.0, -1.0), "weight_decay": 0.0, "maximize": True},
        {"step_sizes": (1e-4, 2e-2), "etas": (0.5, 1.5), "weight_decay": 0.3},
    ],
}
PARAMS = [(name, hp) for name, cases in CASES.items() for hp in cases]


@pytest.fixture(autouse=True)
def small_chunks():
    """Chunks of 64 elements in blocks of 16: the conv kernel spans two chunks, with full
    (unmasked) blocks and a masked tail."""
    saved = dict(kernels.config)
    if DEVICE == "cpu":
        kernels.config.update(chunk=64, block=16)
    yield
    kernels.config.update(saved)


def make_params(dtype=torch.float32, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(s, generator=gen, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()
        for s in shapes
    ]


def set_grads(params, step, scale=1.0):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
        p.grad = g.to(DEVICE, p.dtype)


def state_of(opt, params):
    return [
        (k, v)
        for p in params
        for k, v in sorted(opt.state[p].items())
        if isinstance(v, torch.Tensor) and k != "step"
    ]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (normwise relative error)."""
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def run(name, hp, impl, steps=STEPS, dtype=torch.float32, params=None, lrs=None):
    record = optimkit.info(name)
    params = params if params is not None else make_params(dtype)
    opt = record.cls(params, impl=impl, lr=1e-2, **hp)
    for s in range(steps):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[s]
        set_grads(params, s)
        opt.step()
    return params, opt


def test_registry_matches_impls():
    """A class advertises "fused" exactly when a rule is registered for it."""
    rules = registered()
    for name in optimkit.available():
        cls = optimkit.info(name).cls
        assert ("fused" in cls.impls) == (cls in rules), name
    assert {cls.__name__ for cls in rules} >= set(CASES)


@pytest.mark.parametrize(("name", "hp"), PARAMS, ids=[f"{n}-{i}" for n, i in PARAMS])
def test_fused_matches_reference_fp32(name, hp):
    ref, ref_opt = run(name, hp, "reference")
    fused, fused_opt = run(name, hp, "fused")
    for a, b in zip(fused, ref):
        assert rel_err(a.detach(), b.detach()) <= 1e-5
    for (ka, a), (kb, b) in zip(state_of(fused_opt, fused), state_of(ref_opt, ref)):
        assert ka == kb
        assert a.dtype == b.dtype
        assert rel_err(a, b) <= 1e-5, ka
    for a, b in zip(fused, ref):
        assert fused_opt.state[a]["step"].item() == ref_opt.state[b]["step"].item() == STEPS


def test_lr_schedule_and_param_groups():
    """Runtime scalars: a changing lr and groups with different hyperparameters."""
    lrs = [1e-2 * 0.7**s for s in range(STEPS)]
    results = []
    for impl in ("reference", "fused"):
        params = make_params()
        groups = [
            {"params": params[:2], "weight_decay": 0.0},
            {"params": params[2:], "weight_decay": 0.3, "betas": (0.5, 0.9), "eps": 1e-3},
        ]
        opt = optimkit.AdamW(groups, impl=impl, lr=1e-2)
        for s in range(STEPS):
            for group in opt.param_groups:
                group["lr"] = lrs[s] * (1 if group["weight_decay"] == 0 else 2)
            set_grads(params, s)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        assert rel_err(b.detach(), a.detach()) <= 1e-5


def emulate_bf16(name, hp, round_state: bool):
    """fp32 reference steps on bf16 values: after each step the parameters (and the state, when
    it is kept in bf16) are rounded to bf16, which is what the fused kernel does."""
    params = [p.detach().bfloat16().float().requires_grad_() for p in make_params()]
    opt = optimkit.info(name).cls(params, impl="reference", lr=1e-2, **hp)
    for s in range(STEPS):
        set_grads(params, s)
        for p in params:
            p.grad = p.grad.bfloat16().float()
        opt.step()
        with torch.no_grad():
            for p in params:
                p.copy_(p.bfloat16().float())
                if round_state:
                    for key, value in opt.state[p].items():
                        if key != "step":
                            value.copy_(value.bfloat16().float())
    return params, opt


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("name", "hp"), [("AdamW", {}), ("SGD", {"momentum": 0.9})], ids=["AdamW", "SGD"]
)
def test_bf16_params(name, hp, state_dtype):
    """bf16 parameters, with fp32 state (kept by the caller) or the engine's bf16 state."""
    params = make_params(torch.bfloat16)
    opt = optimkit.info(name).cls(params, impl="fused", lr=1e-2, **hp)
    if state_dtype == torch.float32:
        for p in params:
            for buffer in opt.state_buffers(opt.param_groups[0]):
                opt.state[p][buffer] = torch.zeros_like(p, dtype=torch.float32)
    for s in range(STEPS):
        set_grads(params, s)
        opt.step()
    ref, ref_opt = emulate_bf16(name, hp, round_state=state_dtype == torch.bfloat16)
    for a, b in zip(params, ref):
        assert a.dtype == torch.bfloat16
        a, b = a.detach().float().cpu(), b.detach().cpu()
        torch.testing.assert_close(a, b, rtol=2 * BF16_ULP, atol=0)
    for (ka, a), (_, b) in zip(state_of(opt, params), state_of(ref_opt, ref)):
        assert a.dtype == state_dtype
        tol = 1e-5 if state_dtype == torch.float32 else 2 * BF16_ULP
        assert rel_err(a, b) <= tol, ka


def test_stochastic_rounding_is_unbiased():
    """Updates far below half a bf16 ulp: nearest rounding loses them, stochastic keeps them
    on average."""
    kernels.config.update(chunk=128, block=128)  # one program: the interpreter is slow
    results = {}
    for rounding in (False, True):
        p = torch.ones(128, dtype=torch.bfloat16, device=DEVICE, requires_grad=True)
        opt = optimkit.SGD([p], impl="fused", lr=1.0)
        kernels.set_stochastic_rounding(opt, rounding)
        for _ in range(20):
            p.grad = torch.full_like(p, -1e-3)
            opt.step()
        results[rounding] = p.detach().float().mean().item()
    assert results[False] == 1.0
    assert abs(results[True] - 1.02) < 0.006


def test_grad_scale_and_found_inf_attributes():
    """The attributes GradScaler sets on optimizers that support AMP scaling."""
    ref, ref_opt = run("Adam", {"weight_decay": 0.1}, "reference", steps=3)
    params = make_params()
    opt = optimkit.Adam(params, impl="fused", lr=1e-2, weight_decay=0.1)
    assert opt._step_supports_amp_scaling
    opt.grad_scale = torch.tensor(1024.0, device=DEVICE)
    opt.found_inf = torch.tensor(0.0, device=DEVICE)
    for s in range(3):
        set_grads(params, s, scale=1024.0)
        opt.step()
    for a, b in zip(params, ref):
        assert rel_err(a.detach(), b.detach()) <= 1e-5
    before = [p.detach().clone() for p in params]
    state_before = [v.clone() for _, v in state_of(opt, params)]
    opt.found_inf = torch.tensor(1.0, device=DEVICE)
    set_grads(params, 3, scale=1024.0)
    opt.step()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params))
    assert all(torch.equal(a, b) for a, (_, b) in zip(state_before, state_of(opt, params)))
    assert all(opt.state[p]["step"].item() == 3 for p in params)


@pytest.mark.parametrize("impl", ["fused", "foreach"])
def test_grad_scaler(impl):
    """torch.amp.GradScaler end to end: scaled gradients, then a step skipped on inf."""
    params = make_params()
    ref = make_params()
    opt = optimkit.AdamW(params, impl=impl, lr=1e-2)
    ref_opt = optimkit.AdamW(ref, impl="reference", lr=1e-2)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**10)
    for s in range(3):
        for ps, o in ((params, opt), (ref, ref_opt)):
            o.zero_grad()
            loss = sum((p * p * (i + 1)).sum() for i, p in enumerate(ps)) * (s + 1)
            (scaler.scale(loss) if o is opt else loss).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
    for a, b in zip(params, ref):
        assert rel_err(a.detach(), b.detach()) <= 1e-5
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    scaler.scale(sum((p * p).sum() for p in params)).backward()
    params[1].grad[0] = float("inf")
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, params))
    assert scaler.get_scale() == 2.0**9
    assert all(opt.state[p]["step"].item() == 3 for p in params)


def test_unsupported_tensors_fall_back():
    """float64 and non-contiguous tensors take the foreach rule inside a fused bucket."""
    base = torch.randn(3, 5, dtype=torch.float64)
    results = []
    for impl in ("reference", "fused"):
        contiguous = make_params()
        strided = base.to(DEVICE, torch.float32).t().requires_grad_()
        doubles = [p.detach().double().requires_grad_() for p in make_params()]
        params = [*contiguous, strided]
        opt = optimkit.AdamW([{"params": params}, {"params": doubles}], impl=impl, lr=1e-2)
        for s in range(3):
            set_grads(params + doubles, s)
            strided.grad = strided.grad.t().contiguous().t()  # same strides as the param
            opt.step()
        results.append(params + doubles)
    for a, b in zip(*results):
        assert rel_err(b.detach(), a.detach()) <= (1e-12 if a.dtype == torch.float64 else 1e-5)


def test_default_impl_and_errors(monkeypatch):
    assert kernels.default_impl(optimkit.AdamW, torch.device("cpu")) == "foreach"
    assert kernels.default_impl(optimkit.AdamW, torch.device("cuda")) == "fused"

    class Variant(optimkit.AdamW):  # inherits impls, not the kernel
        pass

    assert kernels.default_impl(Variant, torch.device("cuda")) == "foreach"
    with pytest.raises(RuntimeError, match="no fused kernel"):
        p = make_params(shapes=[(3,)])
        opt = Variant(p, impl="fused")
        set_grads(p, 0)
        opt.step()
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="CUDA"):
            run("AdamW", {}, "fused", steps=1)
        monkeypatch.setattr(kernels, "triton_available", lambda: False)
        with pytest.raises(RuntimeError, match="pip install triton"):
            run("AdamW", {}, "fused", steps=1)


def test_works_without_triton():
    """With Triton unimportable, optimkit imports, steps on the CPU, and explains "fused"."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton now raises ImportError\n"
        "import torch, optimkit\n"
        "from optimkit import kernels\n"
        "assert not kernels.triton_available()\n"
        "p = torch.zeros(3, requires_grad=True)\n"
        "opt = optimkit.AdamW([p])\n"
        "p.grad = torch.ones(3)\n"
        "opt.step()\n"
        "assert kernels.default_impl(optimkit.AdamW, torch.device('cuda')) == 'foreach'\n"
        "opt = optimkit.AdamW([p], impl='fused')\n"
        "try:\n"
        "    opt.step()\n"
        "except RuntimeError as error:\n"
        "    assert 'pip install triton' in str(error)\n"
        "else:\n"
        "    raise AssertionError('fused ran without triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, env=env)


@pytest.mark.skipif(DEVICE != "cuda", reason="compilation happens only on a GPU")
def test_no_recompilation_on_gpu():
    from optimkit.kernels.multi_tensor import compiled_variants

    params = make_params(shapes=[(64, 64), (300,)])
    groups = [{"params": params[:1]}, {"params": params[1:], "lr": 0.5, "weight_decay": 0.0}]
    opt = optimkit.AdamW(groups, impl="fused", lr=1e-2)
    set_grads(params, 0)
    opt.step()
    compiled = compiled_variants()
    for s in range(1, 4):
        for group in opt.param_groups:
            group["lr"] *= 0.5
            group["betas"] = (0.9 - 0.1 * s, 0.999)
        set_grads(params, s)
        opt.step()
    assert compiled_variants() == compiled


@pytest.mark.skipif(DEVICE != "cpu", reason="the --tiny run is the CPU (interpreter) mode")
def test_bench_tiny(tmp_path):
    """The benchmark's CPU mode runs end to end (numbers are meaningless on the CPU)."""
    import json

    from optimkit.kernels import bench

    kernels.config.update(chunk=65536, block=1024)  # the defaults: few programs to interpret
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--out", str(out), "--optimizers", "AdamW,SGD"])
    data = json.loads(out.read_text())
    rows = data["results"]
    names = {row["optimizer"] for row in rows}
    assert {"torch fused AdamW", "torch foreach AdamW", "optimkit AdamW"} <= names
    assert all("error" not in row for row in rows if row["optimizer"].startswith("optimkit"))
    assert data["check"] and all(c["max_rel_err"] <= 1e-5 for c in data["check"])


def test_tensor_subclasses_fall_back():
    """Tensor subclasses (e.g. DTensor shards) take the foreach rule."""

    class Sub(torch.Tensor):
        pass

    results = []
    for impl in ("reference", "fused"):
        params = [p.detach().as_subclass(Sub).requires_grad_() for p in make_params()]
        opt = optimkit.AdamW(params, impl=impl, lr=1e-2)
        for s in range(3):
            set_grads(params, s)
            opt.step()
        results.append(params)
    for a, b in zip(*results):
        assert rel_err(torch.Tensor(b.detach()), torch.Tensor(a.detach())) <= 1e-5


def test_triton_on_needs_the_flag_a_cuda_tensor_and_triton(monkeypatch):
    """kernels.triton_on, the gate of the matrix optimizers' kernels: off when the flag is
    off, for a CPU tensor, or when Triton does not import; on for a CUDA tensor otherwise."""
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert not kernels.triton_on(True, torch.zeros(1))
    assert not kernels.triton_on(False, torch.zeros(1))
    if torch.cuda.is_available():
        assert kernels.triton_on(True, torch.zeros(1, device="cuda"))
        assert not kernels.triton_on(False, torch.zeros(1, device="cuda"))
        monkeypatch.setattr(kernels, "triton_available", lambda: False)
        assert not kernels.triton_on(True, torch.zeros(1, device="cuda"))
