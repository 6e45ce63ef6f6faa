"""Shampoo: parity with an independent fp64 reference (per-block loop, exact roots by eigh).

The reference restates the rules of the authors' PyTorch port (google-research
scalable_shampoo/pytorch: statistics initialised to eps*I, relative ridge eps*lambda_max,
exponent 2*rank, blocking, per-tensor grafting, coupled weight decay after grafting) with the
deviations named in the Shampoo docstring (single momentum, Nesterov look-ahead not stored).
It shares no code with optimkit.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from optimkit import Shampoo
from optimkit.optimizers.shampoo import block_slices, merge_small_dims

SHAPES = [(), (7,), (5, 3), (4, 3, 3, 3), (9, 6)]


def ref_root(mat, p, eps):
    if mat.shape[0] == 1:  # the authors' ComputePower: identity for a 1x1 statistic
        return torch.ones_like(mat)
    w, v = torch.linalg.eigh(mat)
    w = w.clamp_min(0)
    return v @ torch.diag((w + eps * w.max()) ** (-1.0 / p)) @ v.T


def ref_root_newton(mat, p, eps):
    """The authors' ComputePower (coupled Newton, early stop when the error grows by 20%)."""
    if mat.shape[0] == 1:
        return torch.ones_like(mat)
    eye = torch.eye(mat.shape[0], dtype=mat.dtype)
    mat = mat + eps * torch.linalg.eigvalsh(mat).max() * eye
    z = (1 + p) / (2 * torch.norm(mat))
    x, m = eye * z ** (1.0 / p), mat * z
    err, count, alpha = (m - eye).abs().max(), 0, -1.0 / p
    while err > 1e-6 and count < 100:
        t = (1 - alpha) * eye + alpha * m
        new_x, m_next = x @ t, torch.linalg.matrix_power(t, p) @ m
        new_err = (m_next - eye).abs().max()
        if new_err > err * 1.2:
            break
        x, m, err, count = new_x, m_next, new_err, count + 1
    return x


def ref_blocks(shape, bs):
    ranges = []
    for d in shape:
        if d > bs:
            cuts = list(range(0, d, bs))
            ranges.append([(c, min(c + bs, d)) for c in cuts])
        else:
            ranges.append([(0, d)])
    return list(itertools.product(*ranges))


class RefShampoo:
    def __init__(
        self,
        p,
        lr=1.0,
        mu=0.9,
        nesterov=True,
        beta2=1.0,
        deps=1e-6,
        meps=1e-12,
        wd=0.0,
        start=1,
        every=1,
        bs=128,
        merge=True,
        graft="sgd",
        gbeta=0.999,
        override=0,
        root_fn=ref_root,
    ):
        self.p = p.clone()
        self.root_fn = root_fn
        self.__dict__.update(
            lr=lr,
            mu=mu,
            nesterov=nesterov,
            beta2=beta2,
            deps=deps,
            meps=meps,
            wd=wd,
            start=start,
            every=every,
            bs=bs,
            graft=graft,
            gbeta=gbeta,
        )
        shape = list(p.shape)
        if merge:
            new, prod = [], 1
            for d in shape:
                if prod * d <= bs:
                    prod *= d
                else:
                    if prod > 1:
                        new.append(prod)
                    prod = d
            if prod > 1:
                new.append(prod)
            shape = new
        self.shape = shape
        self.exp = override or 2 * len(shape)
        self.blocks = ref_blocks(shape, bs) if len(shape) >= 2 else []
        self.stats = [
            [meps * torch.eye(b - a, dtype=p.dtype) for a, b in blk] for blk in self.blocks
        ]
        self.roots = [[torch.eye(b - a, dtype=p.dtype) for a, b in blk] for blk in self.blocks]
        self.m = torch.zeros_like(p)
        self.acc = torch.zeros_like(p)
        self.t = 0

    def step(self, g):
        self.t += 1
        if self.graft == "adagrad":
            self.acc = self.acc + g * g
        elif self.graft == "adam":
            self.acc = self.gbeta * self.acc + (1 - self.gbeta) * g * g
        gs = g.reshape(self.shape)
        w = 1.0 if self.beta2 == 1.0 else 1 - self.beta2
        for blk, stats, roots in zip(self.blocks, self.stats, self.roots):
            sub = gs[tuple(slice(a, b) for a, b in blk)]
            for i in range(len(blk)):
                axes = [j for j in range(sub.dim()) if j != i]
                stats[i] = self.beta2 * stats[i] + w * torch.tensordot(sub, sub, [axes, axes])
                if self.t % self.every == 0:
                    roots[i] = self.root_fn(stats[i], self.exp, self.meps)
        if self.graft == "adagrad":
            dg = g / (self.acc.sqrt() + self.deps)
        elif self.graft == "adam":
            dg = g / ((self.acc / (1 - self.gbeta**self.t)).sqrt() + self.deps)
        else:
            dg = g
        if self.t >= self.start:
            out = gs.clone()
            for blk, roots in zip(self.blocks, self.roots):
                idx = tuple(slice(a, b) for a, b in blk)
                x = gs[idx]
                for i, r in enumerate(roots):  # x times_i r
                    x = torch.movedim(torch.tensordot(r, x, dims=([1], [i])), 0, i)
                out[idx] = x
            d = out.reshape(g.shape)
            if self.graft != "none":
                d = d * dg.norm() / (d.norm() + 1e-16)
        else:
            d = dg
        d = d + self.wd * self.p
        self.m = self.mu * self.m + d
        upd = self.mu * self.m + d if self.nesterov else self.m
        self.p = self.p - self.lr * upd


def grads_for(t, shapes, dtype):
    gen = torch.Generator().manual_seed(200 + t)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def run(dtype, hp, ref_hp, steps=50, shapes=SHAPES):
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    params = [x.clone().requires_grad_() for x in init]
    opt = Shampoo(params, **hp)
    refs = [RefShampoo(x, **ref_hp) for x in init]
    for t in range(1, steps + 1):
        grads = grads_for(t, shapes, dtype)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for r, g in zip(refs, grads):
            r.step(g)
    return opt, params, refs


def assert_parity(params, refs, tol):
    for p, r in zip(params, refs):
        err = (p.detach() - r.p).norm() / r.p.norm()
        assert err <= tol, (tuple(p.shape), float(err))


CASES = [
    ({"lr": 0.05}, {"lr": 0.05}),
    (  # blocking with uneven edges, no shape merging, AdaGrad grafting
        {
            "lr": 0.05,
            "block_size": 4,
            "best_effort_shape_interpretation": False,
            "graft": "adagrad",
        },
        {"lr": 0.05, "bs": 4, "merge": False, "graft": "adagrad"},
    ),
    (
        {
            "lr": 0.01,
            "block_size": 3,
            "graft": "adam",
            "beta2": 0.99,
            "weight_decay": 0.1,
            "start_preconditioning_step": 5,
            "preconditioning_compute_steps": 3,
        },
        {"lr": 0.01, "bs": 3, "graft": "adam", "beta2": 0.99, "wd": 0.1, "start": 5, "every": 3},
    ),
    (
        {
            "lr": 0.001,
            "graft": "none",
            "nesterov": False,
            "momentum": 0.5,
            "best_effort_shape_interpretation": False,
            "inverse_exponent_override": 2,
        },
        {"lr": 0.001, "graft": "none", "nesterov": False, "mu": 0.5, "merge": False, "override": 2},
    ),
]


@pytest.mark.parametrize(("hp", "ref_hp"), CASES)
def test_parity_fp64(hp, ref_hp):
    _, params, refs = run(torch.float64, hp, ref_hp)
    assert_parity(params, refs, 1e-10)


def test_parity_fp32():
    hp, ref_hp = CASES[1]
    _, params, refs = run(torch.float32, hp, ref_hp)
    assert_parity(params, refs, 1e-5)


def test_newton_roots_parity_with_authors_compute_power():
    """root_method="newton" == the authors' ComputePower (which may stop early and return a
    rough root when the first iterate's error grows: pinned here, not a bug of ours)."""
    hp = {
        "lr": 0.05,
        "block_size": 4,
        "best_effort_shape_interpretation": False,
        "graft": "adagrad",
        "root_method": "newton",
    }
    ref_hp = {"lr": 0.05, "bs": 4, "merge": False, "graft": "adagrad", "root_fn": ref_root_newton}
    _, params, refs = run(torch.float64, hp, ref_hp, steps=10)
    assert_parity(params, refs, 1e-6)  # power-iteration lambda_max vs exact in the reference


def test_authors_shape_helpers():
    assert merge_small_dims((1, 2, 512, 1, 2048, 1, 3, 4), 1024) == (1024, 2048, 12)
    assert merge_small_dims((1, 2, 768, 1, 2048), 1024) == (2, 768, 2048)
    assert [tuple((s.start, s.stop) for s in b) for b in block_slices((5, 3), 2)] == [
        ((0, 2), (0, 2)),
        ((0, 2), (2, 3)),
        ((2, 4), (0, 2)),
        ((2, 4), (2, 3)),
        ((4, 5), (0, 2)),
        ((4, 5), (2, 3)),
    ]


def test_state_layout_and_bytes():
    w = torch.randn(64, 48, requires_grad=True)
    opt = Shampoo([w], block_size=32)
    w.grad = torch.randn_like(w)
    opt.step()
    keys = sorted(k for k in opt.state[w] if k.startswith("stat"))
    assert len(keys) == 4 * 2  # a 2x2 block grid, two statistics each
    assert Shampoo.state_bytes_per_param() == 4 * (3136 + 2 * (64**2 + 48**2)) / 3136
    assert (
        Shampoo.state_bytes_per_param({"graft": "adagrad"})
        == 4 * (2 * 3136 + 2 * (64**2 + 48**2)) / 3136
    )


def test_zero_and_rank_deficient_grads_no_nan():
    p = torch.randn(6, 5, requires_grad=True)
    opt = Shampoo([p], lr=0.1, graft="adagrad", beta2=0.9)
    for t in range(6):
        p.grad = torch.zeros(6, 5) if t < 3 else torch.outer(torch.ones(6), torch.ones(5))
        opt.step()
    assert torch.isfinite(p).all()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v))


def test_failed_root_keeps_previous_and_is_counted():
    p = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    opt = Shampoo([p], lr=0.1, best_effort_shape_interpretation=False)
    p.grad = torch.randn(5, 3, dtype=torch.float64)
    opt.step()
    st = opt.state[p]
    before = st["root0_0"].clone()
    st["stat0_0"][0, 0] = float("inf")
    p.grad = torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="previous root"):
        opt.step()
    assert torch.equal(st["root0_0"], before)
    assert st["root_failures"] == 1
    assert torch.isfinite(p).all()


def test_bf16_params_fp32_statistics():
    p = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = Shampoo([p], lr=0.1, best_effort_shape_interpretation=False, graft="adam")
    for _ in range(3):
        p.grad = torch.randn(6, 4, dtype=torch.bfloat16)
        opt.step()
    assert opt.state[p]["stat0_0"].dtype == torch.float32
    opt.load_state_dict(opt.state_dict())
    assert opt.state[p]["root0_1"].dtype == torch.float32 and p.dtype == torch.bfloat16


def test_evenly_split_matrices_are_batched_and_resume_from_checkpoints():
    """A matrix whose dims split evenly into blocks keeps its per-block entries as views of
    stacked tensors (one batched product per step instead of a loop over blocks); the
    checkpoint format is unchanged, a loaded one resumes identically, and a failed block root
    keeps its previous value."""
    import copy

    w = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    opt = Shampoo([w], lr=0.05, block_size=4, graft="adagrad")
    twin_w = w.detach().clone().requires_grad_()
    looped = Shampoo([twin_w], lr=0.05, block_size=4, graft="adagrad")
    looped._arenas = lambda *args: []  # the per-block loop, for comparison
    for t in range(3):
        g = grads_for(t, [(8, 12)], torch.float64)[0]
        w.grad, twin_w.grad = g.clone(), g.clone()
        opt.step()
        looped.step()
    state = opt.state[w]
    assert sorted(k for k in state if k.startswith("stat")) == sorted(
        f"stat{b}_{i}" for b in range(6) for i in range(2)
    )
    storages = {state[f"stat{b}_0"].untyped_storage().data_ptr() for b in range(6)}
    assert len(storages) == 1  # views of one stack
    torch.testing.assert_close(w, twin_w, rtol=1e-12, atol=1e-12)

    loaded_w = w.detach().clone().requires_grad_()
    loaded = Shampoo([loaded_w], lr=0.05, block_size=4, graft="adagrad")
    loaded.load_state_dict(copy.deepcopy(opt.state_dict()))
    for t in range(3, 6):
        g = grads_for(t, [(8, 12)], torch.float64)[0]
        w.grad, loaded_w.grad = g.clone(), g.clone()
        opt.step()
        loaded.step()
    assert torch.equal(w, loaded_w)

    before = state["root2_0"].clone()
    state["stat2_0"][0, 0] = float("inf")
    w.grad = grads_for(7, [(8, 12)], torch.float64)[0]
    with pytest.warns(RuntimeWarning, match="previous root"):
        opt.step()  # roots are refreshed at every step (the default frequency, 1)
    assert torch.equal(state["root2_0"], before)
    assert state["root_failures"] == 1


def test_a_block_entry_replaced_from_outside_is_used():
    """The stacked layout checks every step that each per-block entry is still its view: an
    entry the user replaces (here one block's root and one's statistic) is what the next
    step reads, as in the per-block loop, and the stacks are rebuilt around it."""
    w = torch.randn(8, 12, dtype=torch.float64, requires_grad=True)
    opt = Shampoo([w], lr=0.05, block_size=4, graft="adagrad", preconditioning_compute_steps=3)
    twin_w = w.detach().clone().requires_grad_()
    looped = Shampoo(
        [twin_w], lr=0.05, block_size=4, graft="adagrad", preconditioning_compute_steps=3
    )
    looped._arenas = lambda *args: []
    for t in range(4):
        if t == 2:
            for o, p in ((opt, w), (looped, twin_w)):
                o.state[p]["root3_1"] = 2 * torch.eye(4, dtype=torch.float64)
                o.state[p]["stat1_0"] = 5 * torch.eye(4, dtype=torch.float64)
        g = grads_for(t, [(8, 12)], torch.float64)[0]
        w.grad, twin_w.grad = g.clone(), g.clone()
        opt.step()
        looped.step()
        torch.testing.assert_close(w, twin_w, rtol=1e-12, atol=1e-12)
    state = opt.state[w]
    storages = {state[f"root{b}_1"].untyped_storage().data_ptr() for b in range(6)}
    assert len(storages) == 1  # stacked again, the replaced entry included


@pytest.mark.parametrize(
    "hp",
    [
        {"graft": "adagrad", "preconditioning_compute_steps": 2, "beta2": 0.95},
        {"graft": "sgd", "nesterov": False, "weight_decay": 0.1, "start_preconditioning_step": 3},
        {"graft": "adam", "preconditioning_compute_steps": 3, "root_method": "newton"},
    ],
)
def test_matrices_of_a_group_share_one_arena_and_match_the_loop(monkeypatch, hp):
    """Every evenly split matrix of a group with blocks of one size, dtype and device keeps its
    statistics and roots in one set of stacks (an arena), processed in runs of at most
    BATCH_BLOCKS blocks; the trajectory is the per-block loop's, also with a parameter that
    has no gradient on some steps (a run breaks around it), a non-contiguous parameter
    (updated through a copy of its blocks), a bf16 parameter (its own arena: fp32 state
    for bf16 weights, its own dtype key), blocks of another size and a tensor on the loop
    path (a 3-D one)."""
    from optimkit.optimizers import shampoo

    monkeypatch.setattr(shampoo, "BATCH_BLOCKS", 12)  # several runs, a gap inside one
    shapes = [(8, 12), (12, 8), (4, 4), (8, 12), (3, 8), (16, 4), (4, 4, 4), (5,)]
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    init.append(torch.randn(8, 4, generator=gen).to(torch.bfloat16))

    def params():
        ps = [x.clone().requires_grad_() for x in init]
        ps[1] = init[1].t().contiguous().t().requires_grad_()  # non-contiguous (12, 8)
        return ps

    a, b = params(), params()
    assert not a[1].is_contiguous()
    opt = Shampoo(a, lr=0.05, block_size=4, best_effort_shape_interpretation=False, **hp)
    looped = Shampoo(b, lr=0.05, block_size=4, best_effort_shape_interpretation=False, **hp)
    looped._arenas = lambda *args: []
    for t in range(7):
        grads = grads_for(t, shapes + [(8, 4)], torch.float64)
        for ps in (a, b):
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if (i == 3 and t in (2, 3)) else g.to(p.dtype)
        opt.step()
        looped.step()
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-10)
            for key in ("stat0_0", "stat0_1", "root0_1"):
                if key in opt.state[x]:
                    torch.testing.assert_close(opt.state[x][key], looped.state[y][key])
    arenas = opt._shampoo_arenas
    assert len(arenas) == 3  # 4 x 4 fp64 blocks, 3 x 4 ones, 4 x 4 fp32 ones (bf16 weights)
    one = {opt.state[p]["stat0_0"].untyped_storage().data_ptr() for p in (a[0], a[1], a[3])}
    assert len(one) == 1  # three matrices, one stack


def test_arena_is_rebuilt_for_new_members_and_loaded_checkpoints_free_old_stacks():
    """A matrix whose state appears later (its first gradient) joins the arena; a loaded
    checkpoint's entries are copied into the stacks; the arena cache never keeps stacks
    that no state entry views (a replaced param group)."""
    import copy

    shapes = [(8, 8), (8, 4)]
    ps = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    opt = Shampoo(ps, lr=0.05, block_size=4)
    for t in range(4):
        grads = grads_for(t, shapes, torch.float64)
        ps[0].grad, ps[1].grad = grads[0], (grads[1] if t >= 2 else None)
        opt.step()
    (arena,) = opt._shampoo_arenas.values()
    assert len(arena.params) == 2 and arena.stats[0].size(0) == 4 + 2
    saved = copy.deepcopy(opt.state_dict())
    twin = [p.detach().clone().requires_grad_() for p in ps]
    other = Shampoo(twin, lr=0.05, block_size=4)
    other.load_state_dict(saved)
    opt.load_state_dict(saved)
    for t in range(4, 6):
        grads = grads_for(t, shapes, torch.float64)
        for o, group in ((opt, ps), (other, twin)):
            group[0].grad, group[1].grad = grads[0].clone(), grads[1].clone()
            o.step()
        for x, y in zip(ps, twin):
            assert torch.equal(x, y)
    assert len(opt._shampoo_arenas) == 1  # the old group's arena was dropped
    (arena,) = opt._shampoo_arenas.values()
    assert opt.state[ps[1]]["root1_0"].untyped_storage().data_ptr() == (
        arena.roots[0].untyped_storage().data_ptr()
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_arena_on_cuda_matches_the_cpu():
    """The arena's batched products, foreach copies and strided multi-tensor tail on the GPU
    follow the CPU's trajectory (fp32 products, TF32 off), refreshes included."""
    shapes = [(16, 24), (24, 16), (16, 24), (8, 8), (6,)]
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(s, generator=gen) for s in shapes]
    runs = []
    for device in ("cpu", "cuda"):
        ps = [x.to(device, copy=True).requires_grad_() for x in init]
        opt = Shampoo(ps, lr=0.05, block_size=8, preconditioning_compute_steps=2)
        for t in range(6):
            for p, g in zip(ps, grads_for(t, shapes, torch.float32)):
                p.grad = g.to(device)
            opt.step()
        runs.append([p.detach().cpu() for p in ps])
    for a, b in zip(*runs):
        assert (a - b).norm() <= 1e-4 * a.norm()


def test_state_views_notice_replaced_entries_and_new_dicts(monkeypatch):
    """StateViews (SOAP's buckets, Shampoo's arenas) holds while the same dicts keep every
    view; a replaced or removed entry, or another dict, breaks it. After a loaded checkpoint
    Shampoo restacks each member once, not every step."""
    from optimkit.optimizers import shampoo
    from optimkit.optimizers._stacked import StateViews

    a, b = torch.zeros(3), torch.zeros(2)
    first, second = {"x": a, "y": b}, {"x": b}
    views = StateViews([(first, "x", a), (first, "y", b), (second, "x", b)])
    assert views.held_by([first, second])
    assert not views.held_by([second, first]) and not views.held_by([first])
    assert not views.held_by([dict(first), second])  # equal contents, another dict
    second["x"] = b.clone()
    assert not views.held_by([first, second])
    second["x"] = b
    del first["y"]
    assert not views.held_by([first, second])

    restacks, restack = [], shampoo._restack

    def counted(arena, k, state):
        restacks.append(k)
        restack(arena, k, state)

    monkeypatch.setattr(shampoo, "_restack", counted)
    ps = [torch.randn(8, 8, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    opt = Shampoo(ps, lr=0.05, block_size=4)
    builds, build = [], opt._build_arena
    opt._build_arena = lambda entries: builds.append(len(entries)) or build(entries)
    for t in range(5):
        for p, g in zip(ps, grads_for(t, [(8, 8)] * 2, torch.float64)):
            p.grad = g
        opt.step()
        if t == 1:
            opt.load_state_dict(opt.state_dict())  # new groups and state dicts: a new arena
        if t == 2:
            opt.state[ps[1]]["root1_0"] = torch.eye(4, dtype=torch.float64)
    assert builds == [2, 2] and restacks == [1]  # each once, at the step after the change
