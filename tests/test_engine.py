"""The engine's pieces: TensorList, hyperparameter specs, the registry and dispatch."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import optimkit
from optimkit.engine import (
    Betas,
    Choice,
    Flag,
    Interval,
    Optimizer,
    TensorList,
    maximum_,
    minimum_,
)
from optimkit.registry import UnknownOptimizerError


def _lists():
    gen = torch.Generator().manual_seed(0)
    a = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in [(), (3,), (2, 4)]]
    b = [torch.rand(s, generator=gen, dtype=torch.float64) + 0.5 for s in [(), (3,), (2, 4)]]
    return a, b


OUT_OF_PLACE = {
    "neg": lambda x, y: -x,
    "add": lambda x, y: x + y,
    "add_scalar": lambda x, y: x + 2.0,
    "radd": lambda x, y: 2.0 + x,
    "sub": lambda x, y: x - y,
    "rsub": lambda x, y: 1.0 - x,
    "mul": lambda x, y: x * y,
    "rmul": lambda x, y: 3.0 * x,
    "div": lambda x, y: x / y,
    "rdiv": lambda x, y: 2.0 / x,
    "add_alpha": lambda x, y: x.add(y, alpha=0.3),
    "add_alpha_scalar": lambda x, y: x.add(2.0, alpha=0.5),
    "sqrt": lambda x, y: x.sqrt(),
    "abs": lambda x, y: (x - 1.0).abs(),
    "sign": lambda x, y: (x - 1.0).sign(),
    "exp": lambda x, y: x.exp(),
    "reciprocal": lambda x, y: x.reciprocal(),
    "pow": lambda x, y: x.pow(1.5),
    "clone": lambda x, y: x.clone(),
    "maximum": lambda x, y: x.maximum(y),
    "minimum": lambda x, y: x.minimum(y),
    "clamp_min": lambda x, y: x.clamp_min(0.8),
    "clamp_max": lambda x, y: x.clamp_max(0.8),
    "mul_method": lambda x, y: x.mul(y),
    "div_method": lambda x, y: x.div(y),
    "neg_method": lambda x, y: x.neg(),
}

IN_PLACE = {
    "add_": lambda x, y: x.add_(y, alpha=0.5),
    "add_scalar_": lambda x, y: x.add_(1.0, alpha=2.0),
    "sub_": lambda x, y: x.sub_(y, alpha=0.5),
    "sub_scalar_": lambda x, y: x.sub_(0.25),
    "mul_": lambda x, y: x.mul_(y),
    "div_": lambda x, y: x.div_(y),
    "addcmul_": lambda x, y: x.addcmul_(y, y, value=0.3),
    "addcdiv_": lambda x, y: x.addcdiv_(y, y + 1.0, value=0.3),
    "lerp_": lambda x, y: x.lerp_(y, 0.1),
    "copy_": lambda x, y: x.copy_(y),
    "zero_": lambda x, y: x.zero_(),
    "sqrt_": lambda x, y: x.sqrt_(),
    "abs_": lambda x, y: x.sub_(1.0).abs_(),
    "sign_": lambda x, y: x.sub_(1.0).sign_(),
    "neg_": lambda x, y: x.neg_(),
    "reciprocal_": lambda x, y: x.reciprocal_(),
    "clamp_min_": lambda x, y: x.clamp_min_(0.9),
    "clamp_max_": lambda x, y: x.clamp_max_(0.9),
    "maximum_": lambda x, y: maximum_(x, y),
    "minimum_": lambda x, y: minimum_(x, y),
}


@pytest.mark.parametrize("op", sorted(OUT_OF_PLACE))
def test_tensorlist_out_of_place_matches_tensor(op):
    a, b = _lists()
    fn = OUT_OF_PLACE[op]
    got = fn(TensorList(a), TensorList(b))
    assert isinstance(got, TensorList) and len(got) == len(a)
    for x, y, z in zip(a, b, got):
        torch.testing.assert_close(z, fn(x, y), rtol=0, atol=0)


@pytest.mark.parametrize("op", sorted(IN_PLACE))
def test_tensorlist_in_place_matches_tensor(op):
    a, b = _lists()
    expected = [t.clone() for t in a]
    fn = IN_PLACE[op]
    result = fn(TensorList(a), TensorList(b))
    assert isinstance(result, TensorList)
    for x, y in zip(expected, b):
        fn(x, y)
    for x, y in zip(a, expected):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_tensorlist_norm_and_per_tensor_scalars():
    a, _ = _lists()
    norms = TensorList(a).norm()
    for t, n in zip(a, norms):
        torch.testing.assert_close(n, t.norm())
    scaled = TensorList(a) / norms
    for t in scaled:
        torch.testing.assert_close(t.norm(), torch.tensor(1.0, dtype=torch.float64))
    assert repr(TensorList(a)) == "TensorList(3 tensors)"
    assert TensorList(a)[1] is a[1] and list(TensorList(a)) == a


@pytest.mark.parametrize(
    ("spec", "good", "bad", "message"),
    [
        (Interval(0.0), [0.0, 1e9], [-1e-9, float("nan"), "1", True], "[0, inf)"),
        (Interval(0.0, 1.0, high_open=True), [0.0, 0.999], [1.0, -0.1], "[0, 1)"),
        (Interval(0.0, low_open=True), [1e-12], [0.0], "(0, inf)"),
        (Interval(1, 10, integer=True), [1, 10, 5.0], [0, 2.5, 11], "an integer in [1, 10]"),
        (
            Interval(0.0, tensor=True),
            [torch.tensor(0.1)],
            [torch.tensor(-1.0), torch.zeros(2)],
            "[0, inf)",
        ),
        (Flag(), [True, False], [1, "yes"], "True or False"),
        (Choice(("a", "b")), ["a"], ["c"], "one of 'a', 'b'"),
        (Betas(2), [(0.9, 0.99), [0.0, 0.5]], [(0.9,), (1.0, 0.5), 0.9], "[0, 1)"),
    ],
)
def test_specs(spec, good, bad, message):
    for value in good:
        spec.check("Opt", "x", value)
    for value in bad:
        with pytest.raises(ValueError, match=r"x"):
            spec.check("Opt", "x", value)
    assert message in spec.describe()


def test_interval_rejects_tensor_when_not_allowed():
    with pytest.raises(ValueError, match="got a tensor"):
        Interval(0.0).check("Opt", "eps", torch.tensor(1.0))
    assert "inf" in Interval(-math.inf).describe()


def test_errors_name_the_parameter_and_range():
    p = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match=r"AdamW: invalid lr = -1.*\[0, inf\)"):
        optimkit.AdamW(p, lr=-1)
    with pytest.raises(ValueError, match=r"betas\[1\].*\[0, 1\)"):
        optimkit.AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match=r"eps"):
        optimkit.AdamW(p, eps=-1e-8)
    with pytest.raises(ValueError, match=r"weight_decay"):
        optimkit.AdamW(p, weight_decay=-0.1)
    with pytest.raises(TypeError, match=r"'lrr'.*accepted: .*lr"):
        optimkit.AdamW(p, lrr=0.1)
    with pytest.raises(ValueError, match=r"lr"):
        optimkit.AdamW([{"params": p, "lr": -0.5}])
    opt = optimkit.AdamW(p)
    with pytest.raises(ValueError, match=r"weight_decay"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)], "weight_decay": -1.0})


def test_loaded_checkpoint_is_validated():
    p = [torch.zeros(2, requires_grad=True)]
    sd = optimkit.AdamW(p).state_dict()
    sd["param_groups"][0]["betas"] = (0.9, 1.5)
    with pytest.raises(ValueError, match="betas"):
        optimkit.AdamW(p).load_state_dict(sd)


def test_lr_positional_like_torch():
    opt = optimkit.SGD([torch.zeros(2, requires_grad=True)], 0.5)
    assert opt.param_groups[0]["lr"] == 0.5


def test_registry():
    names = optimkit.available()
    assert {"SGD", "SGDW", "Adam", "AdamW", "AMSGrad", "AdaMax"} <= set(names)
    assert names == sorted(names, key=str.lower)
    assert "AdamW" in optimkit.available("adaptive")
    assert "AdamW" not in optimkit.available("sgd")
    with pytest.raises(ValueError, match="unknown category"):
        optimkit.available("nope")
    record = optimkit.info("adamw")  # case-insensitive
    assert record.name == "AdamW" and record.cls is optimkit.AdamW
    assert record.paper.arxiv == "1711.05101" and record.paper.year == 2017
    assert record.paper.url == "https://arxiv.org/abs/1711.05101"
    assert record.defaults["weight_decay"] == 1e-2
    assert record.state_bytes == 8
    assert optimkit.info("AMSGrad").state_bytes == 12
    caps = record.capabilities()
    assert caps["complex"] and not caps["needs_closure"] and "foreach" in caps["impls"]
    opt = optimkit.create("sgd", [torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
    assert isinstance(opt, optimkit.SGD)
    with pytest.raises(UnknownOptimizerError, match="available: .*AdamW"):
        optimkit.create("NoSuchOptimizer", [])


def test_register_rejects_duplicates_and_bad_category():
    from optimkit.registry import Paper, register

    with pytest.raises(ValueError, match="category"):
        register(paper=Paper("t", "", 2000), category="nope")
    with pytest.raises(ValueError, match="already registered"):
        register(paper=Paper("t", "", 2000), category="sgd", name="adamw")(optimkit.AdamW)


def test_needs_closure_enforced():
    class NeedsClosure(Optimizer):
        hyperparams = dict(optimkit.SGD.hyperparams)
        needs_closure = True

    opt = NeedsClosure([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(RuntimeError, match="requires a closure"):
        opt.step()


def test_foreach_buckets_by_step_count():
    """Parameters that skipped steps keep their own step count and bias correction."""
    a = torch.ones(3, requires_grad=True)
    b = torch.ones(3, requires_grad=True)
    a_ref = a.detach().clone().requires_grad_()
    b_ref = b.detach().clone().requires_grad_()
    opt = optimkit.Adam([a, b], lr=0.1)
    ref = torch.optim.Adam([a_ref, b_ref], lr=0.1, foreach=False)
    for step in range(4):
        for p, q in ((a, a_ref), (b, b_ref)):
            g = torch.full((3,), float(step + 1)) if (p is a or step % 2) else None
            p.grad = g
            q.grad = None if g is None else g.clone()
        opt.step()
        ref.step()
    assert opt.state[a]["step"].item() == 4 and opt.state[b]["step"].item() == 2
    torch.testing.assert_close(a, a_ref, rtol=0, atol=0)
    torch.testing.assert_close(b, b_ref, rtol=0, atol=0)


def test_step_counters_share_one_vector_and_follow_outside_changes():
    """A group's step counters become views of one vector (one add per step); a counter
    replaced from outside, a loaded checkpoint or a change of which parameters have gradients
    is respected, and a loaded state_dict's tensors are never advanced by later steps."""
    params = [torch.ones(2, requires_grad=True) for _ in range(5)]
    opt = optimkit.AdamW(params, lr=0.1)
    for p in params:
        p.grad = torch.ones(2)
    opt.step()
    opt.step()
    counters = [opt.state[p]["step"] for p in params]
    assert [c.item() for c in counters] == [2.0] * 5
    assert len({c.untyped_storage().data_ptr() for c in counters}) == 1
    assert all(c.dim() == 0 and c.dtype == torch.float32 for c in counters)

    opt.state[params[0]]["step"] = torch.tensor(10.0)  # replaced from outside
    params[1].grad = None  # skips the next step
    opt.step()
    assert [opt.state[p]["step"].item() for p in params] == [11.0, 2.0, 3.0, 3.0, 3.0]

    saved = opt.state_dict()
    other = optimkit.AdamW([torch.ones(2, requires_grad=True) for _ in range(5)], lr=0.1)
    other.load_state_dict(saved)
    loaded = [other.state[p]["step"] for p in other.param_groups[0]["params"]]
    for p in other.param_groups[0]["params"]:
        p.grad = torch.ones(2)
    other.step()
    assert [c.item() for c in loaded] == [11.0, 2.0, 3.0, 3.0, 3.0]  # untouched
    steps = [other.state[p]["step"].item() for p in other.param_groups[0]["params"]]
    assert steps == [12.0, 3.0, 4.0, 4.0, 4.0]


def test_p_grad_is_never_modified():
    p = torch.ones(4, requires_grad=True)
    opt = optimkit.Adam([p], lr=0.1, weight_decay=0.5, maximize=True)
    p.grad = torch.full((4,), 2.0)
    before = p.grad.clone()
    opt.step()
    torch.testing.assert_close(p.grad, before, rtol=0, atol=0)


def test_cache_sized_chunks_cut_and_pack():
    from optimkit.engine import cache_sized_chunks

    a = [torch.arange(10.0), torch.zeros(3), torch.zeros(2, 2).t(), torch.zeros(())]
    b = [t.clone() for t in a]
    chunks = cache_sized_chunks([a, b], 4)
    # the 10-element tensor is cut into views of 4, 4, 2; the rest packed whole
    assert [len(c[0]) for c in chunks] == [1, 1, 1, 2, 1]
    assert [c[0][0].numel() for c in chunks[:3]] == [4, 4, 2]
    assert chunks[0][0][0].data_ptr() == a[0].data_ptr()
    assert chunks[3][0][1].is_contiguous() is False  # non-contiguous kept whole
    total = sum(t.numel() for c in chunks for t in c[0])
    assert total == sum(t.numel() for t in a)


def test_chunked_foreach_matches_reference(monkeypatch):
    import optimkit.engine as engine

    monkeypatch.setattr(engine, "CPU_CHUNK_NUMEL", 16)
    results = []
    for impl in ("reference", "foreach"):
        gen = torch.Generator().manual_seed(0)
        params = [
            torch.randn(s, generator=gen, requires_grad=True) for s in [(50,), (3, 7), (), (20, 3)]
        ]
        opt = optimkit.AdamW(params, lr=0.1, impl=impl, amsgrad=True, maximize=True)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        results.append([p.detach().clone() for p in params])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_cache_sized_chunks_without_cutting_packs_whole_tensors():
    from optimkit.engine import cache_sized_chunks

    a = [torch.zeros(10), torch.zeros(3), torch.zeros(2), torch.zeros(6)]
    chunks = cache_sized_chunks([a], 4, cut=False)
    assert [[t.numel() for t in c[0]] for c in chunks] == [[10], [3, 2], [6]]
    assert all(t.data_ptr() in {x.data_ptr() for x in a} for c in chunks for t in c[0])


def test_tensorwise_rules_see_whole_tensors(monkeypatch):
    """A per-tensor rule (here: a per-tensor norm) gives the same result packed in chunks."""
    import optimkit.engine as engine
    from optimkit.engine import Optimizer

    class NormalizedSGD(Optimizer):
        hyperparams = {"lr": optimkit.SGD.hyperparams["lr"]}
        tensorwise = True

        def update(self, param, grad, state, step, hp):
            param.add_(grad / grad.norm(), alpha=-hp["lr"])

    monkeypatch.setattr(engine, "CPU_CHUNK_NUMEL", 8)
    results = []
    for impl in ("reference", "foreach"):
        gen = torch.Generator().manual_seed(0)
        params = [torch.randn(s, generator=gen, requires_grad=True) for s in [(20,), (3,), (4, 2)]]
        opt = NormalizedSGD(params, lr=0.1, impl=impl)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
        results.append([p.detach().clone() for p in params])
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_state_precision_is_validated():
    p = [torch.ones(2, requires_grad=True)]
    with pytest.raises(ValueError, match="state_precision"):
        optimkit.AdamW(p, state_precision=torch.int8)
    with pytest.raises(TypeError, match="state_precision"):
        optimkit.SOAP(p, state_precision=torch.float32)
    opt = optimkit.AdamW(p, state_precision=torch.bfloat16)
    p[0].grad = torch.ones(2)
    opt.step()
    assert opt.state[p[0]]["exp_avg"].dtype == torch.bfloat16
    assert p[0].dtype == torch.float32


def test_kahan_keeps_updates_below_half_an_ulp():
    """bf16 weights at 1.0 (ulp 2**-7) with steps of 1e-3: plain rounding loses every step;
    Kahan compensation keeps them (weight + compensation tracks the exact sum)."""
    results = {}
    for kahan in (False, True):
        p = torch.ones(64, dtype=torch.bfloat16, requires_grad=True)
        opt = optimkit.SGD([p], lr=1.0, kahan=kahan)
        for _ in range(20):
            p.grad = torch.full_like(p, -1e-3)
            opt.step()
        results[kahan] = (p.detach().float(), opt.state[p].get("kahan_comp"))
    assert torch.equal(results[False][0], torch.ones(64))
    weight, comp = results[True]
    assert comp.dtype == torch.bfloat16
    torch.testing.assert_close(weight, torch.full((64,), 1.02), rtol=0, atol=2.0**-7)
    torch.testing.assert_close(weight + comp.float(), torch.full((64,), 1.02), rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["AdamW", "Lion", "Adan", "SGD"])
def test_kahan_tracks_the_fp32_trajectory_and_resumes(name):
    """Many small steps on bf16 weights: with Kahan the weights stay closer to the fp32 run
    than without; foreach == reference; a checkpoint (with the compensation) resumes exactly."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(3, 40, generator=gen).bfloat16().float()
    grads = [torch.randn(3, 40, generator=gen) for _ in range(30)]
    hp = {"lr": 1e-4, **({"momentum": 0.9} if name == "SGD" else {})}

    def run(dtype, impl="foreach", **kw):
        p = start.clone().to(dtype).requires_grad_()
        opt = optimkit.create(name, [p], impl=impl, **hp, **kw)
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        return p, opt

    exact, _ = run(torch.float32)
    plain, _ = run(torch.bfloat16)
    compensated, opt = run(torch.bfloat16, kahan=True)
    reference, _ = run(torch.bfloat16, impl="reference", kahan=True)
    exact = exact.detach()
    plain_error = (plain.detach().float() - exact).abs()
    kahan_error = (compensated.detach().float() - exact).abs()
    assert kahan_error.mean() < plain_error.mean()
    # weight + compensation is the fp32 trajectory up to the compensation's own rounding
    carried = compensated.detach().float() + opt.state[compensated]["kahan_comp"].float()
    assert (carried - exact).abs().max() < 0.1 * plain_error.max()
    torch.testing.assert_close(compensated, reference, rtol=0, atol=0)

    twin = compensated.detach().clone().requires_grad_()
    loaded = optimkit.create(name, [twin], **hp, kahan=True)
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if saved to disk
    assert torch.equal(loaded.state[twin]["kahan_comp"], opt.state[compensated]["kahan_comp"])
    for g in grads[:3]:
        for q, o in ((compensated, opt), (twin, loaded)):
            q.grad = g.bfloat16()
            o.step()
    assert torch.equal(compensated, twin)


def test_kahan_is_validated():
    p = [torch.ones(2, requires_grad=True)]
    with pytest.raises(TypeError, match="kahan"):
        optimkit.AdamW(p, kahan=1)
    with pytest.raises(TypeError, match="kahan"):
        optimkit.SOAP(p, kahan=True)


def test_param_group_index_follows_the_groups():
    """``param_group_index`` maps every parameter to its group, and is rebuilt when a group
    is added or a checkpoint's groups replace the old ones (not served stale)."""
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    opt = optimkit.create("AdamW", [{"params": [a]}, {"params": [b], "lr": 0.5}])
    index = opt.param_group_index()
    assert index[id(a)] is opt.param_groups[0] and index[id(b)] is opt.param_groups[1]
    assert opt.param_group_index() is index  # cached
    opt.add_param_group({"params": [c], "lr": 0.25})
    assert opt.param_group_index()[id(c)] is opt.param_groups[2]
    opt.load_state_dict(opt.state_dict())
    index = opt.param_group_index()
    assert all(index[id(p)] is g for g in opt.param_groups for p in g["params"])
    assert index[id(c)]["lr"] == 0.25
