"""SOAP: parity with an independent fp64 re-implementation of the authors' soap.py.

``RefSOAP`` below re-states nikhilvyas/SOAP ``soap.py`` (HEAD a1e5535) step by step: the first
call only initialises the preconditioner, the first moment lives in the eigenbasis and is
projected back and forth every step, the basis is refreshed by one power-iteration step + QR
every ``precondition_frequency`` steps with ``exp_avg_sq`` re-ordered, weight decay comes after
the step. It shares no code with optimkit.
"""

from __future__ import annotations

from itertools import chain

import pytest
import torch

from optimkit import SOAP

SHAPES = [(), (7,), (5, 3), (4, 3, 3, 3), (6, 4)]


def ref_merge(shape, max_dim):
    new, cur = [], 1
    for sh in shape:
        if cur * sh > max_dim:
            if cur > 1:
                new.append(cur)
                cur = sh
            else:
                new.append(sh)
                cur = 1
        else:
            cur *= sh
    if cur > 1 or not new:
        new.append(cur)
    return new


class RefSOAP:
    def __init__(
        self,
        p,
        lr=3e-3,
        betas=(0.95, 0.95),
        shampoo_beta=-1,
        eps=1e-8,
        wd=0.01,
        freq=10,
        max_dim=10000,
        merge=False,
        pre1d=False,
        normalize=False,
        bias=True,
    ):
        self.p = p.clone()
        self.lr, self.betas, self.eps, self.wd, self.freq = lr, betas, eps, wd, freq
        self.sb = shampoo_beta if shampoo_beta >= 0 else betas[1]
        self.max_dim, self.merge, self.pre1d = max_dim, merge, pre1d
        self.normalize, self.bias = normalize, bias
        self.step_count = 0
        self.Q = None
        self.GG = None

    def shape(self, x):
        return ref_merge(x.shape, self.max_dim) if self.merge and x.dim() > 1 else list(x.shape)

    def project(self, g, back=False):
        orig = g.shape
        g = g.reshape(self.shape(g)) if self.merge and g.dim() > 1 else g
        for q in self.Q:
            if q is not None:
                g = torch.tensordot(g, q, dims=[[0], [1 if back else 0]])
            else:
                g = g.permute(list(range(1, g.dim())) + [0])
        return g.reshape(orig)

    def update_preconditioner(self, g):
        if self.Q is not None:
            self.m = self.project(self.m, back=True)
        gm = g.reshape(self.shape(g)) if self.merge and g.dim() > 1 else g
        for idx, mat in enumerate(self.GG):
            if mat is not None:
                axes = [*chain(range(idx), range(idx + 1, gm.dim()))]
                outer = torch.tensordot(gm, gm, dims=[axes, axes])
                self.GG[idx] = torch.lerp(mat, outer, 1 - self.sb)
        if self.Q is None:
            self.Q = []
            for mat in self.GG:
                if mat is None:
                    self.Q.append(None)
                    continue
                _, vec = torch.linalg.eigh(mat + 1e-30 * torch.eye(mat.shape[0], dtype=mat.dtype))
                self.Q.append(torch.flip(vec, [1]))
        if self.step_count > 0 and self.step_count % self.freq == 0:
            v = self.v.reshape(self.shape(self.v))
            new_q = []
            for ind, (mat, o) in enumerate(zip(self.GG, self.Q)):
                if mat is None:
                    new_q.append(None)
                    continue
                est = torch.diag(o.T @ mat @ o)
                idx = torch.argsort(est, descending=True, stable=True)
                v = v.index_select(ind, idx)
                o = o[:, idx]
                new_q.append(torch.linalg.qr(mat @ o)[0])
            self.v = v.reshape(self.v.shape)
            self.Q = new_q
        if self.step_count > 0:
            self.m = self.project(self.m)

    def step(self, g):
        if self.GG is None:
            self.m = torch.zeros_like(g)
            self.v = torch.zeros_like(g)
            dims = self.shape(g)
            if g.dim() == 1:
                use = self.pre1d and g.shape[0] <= self.max_dim
                self.GG = [torch.zeros(dims[0], dims[0], dtype=g.dtype) if use else None]
            else:
                self.GG = [
                    torch.zeros(s, s, dtype=g.dtype) if s <= self.max_dim else None for s in dims
                ]
            self.update_preconditioner(g)
            return
        gp = self.project(g)
        b1, b2 = self.betas
        self.step_count += 1
        self.m = self.m * b1 + (1 - b1) * gp
        self.v = self.v * b2 + (1 - b2) * gp.square()
        denom = self.v.sqrt() + self.eps
        size = self.lr
        if self.bias:
            size = size * (1 - b2**self.step_count) ** 0.5 / (1 - b1**self.step_count)
        n = self.project(self.m / denom, back=True)
        if self.normalize:
            n = n / (1e-30 + torch.mean(n**2) ** 0.5)
        self.p = self.p - size * n
        if self.wd > 0:
            self.p = self.p - self.lr * self.wd * self.p
        self.update_preconditioner(g)


def grads_for(t, shapes, dtype):
    gen = torch.Generator().manual_seed(100 + t)
    out = []
    for s in shapes:
        g = torch.randn(s, generator=gen, dtype=torch.float64)
        if len(s) == 2 and t % 7 == 0:  # a rank-one gradient now and then
            g = torch.outer(g[:, 0], g[0])
        out.append(g.to(dtype))
    return out


def run(dtype, steps=55, hp=None, ref_hp=None, shapes=SHAPES):
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    params = [x.clone().requires_grad_() for x in init]
    opt = SOAP(params, **(hp or {}))
    refs = [RefSOAP(x, **(ref_hp or {})) for x in init]
    for t in range(1, steps + 1):
        grads = grads_for(t, shapes, dtype)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for r, g in zip(refs, grads):
            r.step(g)
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g)
    return opt, params, refs


def assert_parity(params, refs, tol):
    for p, r in zip(params, refs):
        err = (p.detach() - r.p).norm() / r.p.norm()
        assert err <= tol, (tuple(p.shape), float(err))


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_parity_defaults(dtype, tol):
    _, params, refs = run(dtype)
    assert_parity(params, refs, tol)


@pytest.mark.parametrize(
    ("hp", "ref_hp"),
    [
        (
            {"precondition_frequency": 3, "precondition_1d": True, "normalize_grads": True},
            {"freq": 3, "pre1d": True, "normalize": True},
        ),
        (
            {"merge_dims": True, "max_precond_dim": 12, "precondition_frequency": 4},
            {"merge": True, "max_dim": 12, "freq": 4},
        ),
        (
            {"correct_bias": False, "shampoo_beta": 0.9, "betas": (0.9, 0.99), "weight_decay": 0},
            {"bias": False, "shampoo_beta": 0.9, "betas": (0.9, 0.99), "wd": 0},
        ),
        ({"max_precond_dim": 4, "precondition_frequency": 2}, {"max_dim": 4, "freq": 2}),
    ],
)
def test_parity_options(hp, ref_hp):
    _, params, refs = run(torch.float64, hp=hp, ref_hp=ref_hp)
    if hp.get("precondition_1d"):
        # A vector's first statistic g g^T has rank 1: the eigenbasis of its 6-dimensional
        # null space is arbitrary, and LAPACK builds (and thread counts) pick different ones
        # (seen on an x86 machine with 16 threads: 1.3e-3 apart, while 1e-16 on this
        # project's CI machine), so vectors are left out of this comparison.
        kept = [(p, r) for p, r in zip(params, refs) if p.dim() != 1]
        params, refs = [p for p, _ in kept], [r for _, r in kept]
    assert_parity(params, refs, 1e-10)


def test_first_step_only_initialises():
    p = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    before = p.detach().clone()
    opt = SOAP([p], weight_decay=0.5)
    g = torch.randn(5, 3, dtype=torch.float64)
    p.grad = g
    opt.step()
    assert torch.equal(p.detach(), before)  # not even weight decay
    st = opt.state[p]
    torch.testing.assert_close(st["GG0"], 0.05 * g @ g.T)
    torch.testing.assert_close(st["GG1"], 0.05 * g.T @ g)
    # Q0: eigenvectors of GG0, largest eigenvalue first
    evals = torch.diag(st["Q0"].T @ st["GG0"] @ st["Q0"])
    assert torch.all(evals[:-1] >= evals[1:] - 1e-12)
    assert not st["exp_avg"].any() and not st["exp_avg_sq"].any()


def test_state_layout_and_bytes():
    w = torch.randn(64, 48, requires_grad=True)
    b = torch.randn(48, requires_grad=True)
    opt = SOAP([w, b])
    w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    opt.step()
    assert sorted(k for k in opt.state[w] if k.startswith(("GG", "Q"))) == [
        "GG0",
        "GG1",
        "Q0",
        "Q1",
    ]
    assert not any(k.startswith("GG") for k in opt.state[b])  # 1-D: identity by default
    expected = 4 * (2 * 3136 + 2 * (64**2 + 48**2)) / 3136
    assert SOAP.state_bytes_per_param() == expected


def test_zero_and_rank_deficient_grads_no_nan():
    p = torch.randn(6, 5, requires_grad=True)
    opt = SOAP([p], precondition_frequency=2)
    for t in range(8):
        p.grad = torch.zeros(6, 5) if t < 3 else torch.outer(torch.ones(6), torch.ones(5))
        opt.step()
    assert torch.isfinite(p).all()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values() if torch.is_tensor(v))


def test_failed_eigendecomposition_keeps_basis_and_is_counted():
    p = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    opt = SOAP([p], precondition_frequency=1)
    for _ in range(3):
        p.grad = torch.randn(5, 3, dtype=torch.float64)
        opt.step()
    st = opt.state[p]
    q_before = st["Q0"].clone()
    st["GG0"][0, 0] = float("nan")  # a poisoned statistic
    p.grad = torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="previous eigenbasis"):
        opt.step()
    assert torch.equal(st["Q0"], q_before)
    assert st["root_failures"] >= 1
    assert torch.isfinite(p).all()
    assert opt.state_dict()["state"][0]["root_failures"] == st["root_failures"]


def test_bf16_params_fp32_statistics():
    p = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    opt = SOAP([p])
    for _ in range(3):
        p.grad = torch.randn(6, 4, dtype=torch.bfloat16)
        opt.step()
    assert all(
        v.dtype == torch.float32
        for k, v in opt.state[p].items()
        if k != "step" and torch.is_tensor(v)
    )
    opt.load_state_dict(opt.state_dict())
    assert opt.state[p]["GG0"].dtype == torch.float32
    assert p.dtype == torch.bfloat16


def test_tf32_matmuls_stay_close_to_the_fp64_reference():
    """matmul_precision="tf32" (TF32 inputs, fp32 accumulation; emulated on the CPU): the
    statistics, projections and refresh products lose precision but the trajectory stays
    within 1e-2 of the fp64 reference over 55 steps (fp32 matmuls: 1e-5). The stated
    tolerance of the option; the QR and eigh stay fp32."""
    _, rounded, refs = run(torch.float32, hp={"matmul_precision": "tf32"})
    errors = []
    for q, r in zip(rounded, refs):
        errors.append(float((q.detach() - r.p).norm() / r.p.norm()))
        assert errors[-1] <= 1e-2, (tuple(q.shape), errors[-1])
    assert max(errors) > 1e-6  # the option does change the arithmetic
    with pytest.raises(ValueError, match="matmul_precision"):
        SOAP([torch.zeros(2, 2, requires_grad=True)], matmul_precision="bf16")


@pytest.mark.parametrize("block", [None, 2])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_qr_methods_match_the_reference(monkeypatch, block, dtype, tol):
    """qr_method="cholesky" (the default: CholeskyQR2 from matrix products, blocked when the
    block size is below a side, here 2) and "householder" (the authors' torch.linalg.qr) both
    keep the fp64 reference's trajectory; they differ by rounding only."""
    import optimkit.linalg

    if block is not None:
        monkeypatch.setattr(optimkit.linalg, "CHOLESKY_BLOCK", block)
    cholesky_opt, cholesky, refs = run(dtype)
    _, householder, _ = run(dtype, hp={"qr_method": "householder"})
    assert_parity(cholesky, refs, tol)
    assert_parity(householder, refs, tol)
    assert SOAP([torch.zeros(2, 2, requires_grad=True)]).defaults["qr_method"] == "cholesky"
    # the rank-one gradients of grads_for make some refreshes fall back: counted, still exact
    assert set(cholesky_opt.refresh_counts) <= {"householder_fallbacks"}
    with pytest.raises(ValueError, match="qr_method"):
        SOAP([torch.zeros(2, 2, requires_grad=True)], qr_method="givens")


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_accumulate_gram_is_the_authors_lerp(dim):
    """S <- beta S + (1 - beta) X_(k) X_(k)^T, in place: the authors'
    ``GG.lerp_(X_(k) X_(k)^T, 1 - beta)`` for each mode k of a 3-D tensor."""
    from optimkit.linalg import accumulate_gram_

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    n = x.shape[dim]
    statistic = torch.randn(n, n, generator=gen, dtype=torch.float64)
    unfolded = torch.movedim(x, dim, 0).reshape(n, -1)
    expected = statistic.lerp(unfolded @ unfolded.T, 1 - 0.95)
    result = accumulate_gram_(statistic, x, dim, 0.95, 1 - 0.95)
    assert result is statistic
    torch.testing.assert_close(statistic, expected, rtol=1e-13, atol=1e-13)
