"""optimkit.linalg: batched matrix functions against direct fp64 computations."""

from __future__ import annotations

import pytest
import torch

from optimkit import linalg
from optimkit.linalg import (
    _max_eigenvalue_power_iteration,
    eigenbasis_eigh,
    eigenbasis_power_qr,
    inverse_root_coupled_newton,
    inverse_root_eigh,
    newton_schulz5,
)


def spd_stack(k=3, n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(k, n, n + 2, generator=gen, dtype=torch.float64)
    return a @ a.mT + 0.1 * torch.eye(n, dtype=torch.float64)


def test_inverse_root_eigh_is_a_root():
    stack = spd_stack()
    for p in (2, 4):
        roots, ok = inverse_root_eigh(stack, p, 0.0)
        assert ok.all()
        eye = torch.eye(5, dtype=torch.float64).expand_as(stack)
        torch.testing.assert_close(torch.linalg.matrix_power(roots, p) @ stack, eye)


def test_inverse_root_relative_ridge():
    stack = spd_stack(k=1)
    lam = torch.linalg.eigvalsh(stack[0])
    roots, _ = inverse_root_eigh(stack, 4, 1e-2)
    ridged = stack[0] + 1e-2 * lam.max() * torch.eye(5, dtype=torch.float64)
    torch.testing.assert_close(
        torch.linalg.matrix_power(roots[0], 4) @ ridged, torch.eye(5).double()
    )


def test_failures_are_reported_not_raised():
    stack = spd_stack()
    stack[1, 0, 0] = float("nan")
    stack[2].zero_()  # no finite inverse root of a zero matrix
    _, ok = inverse_root_eigh(stack, 4, 1e-12)
    assert ok.tolist() == [True, False, False]
    _, ok = inverse_root_coupled_newton(stack, 4, 1e-12)
    assert ok.tolist() == [True, False, False]
    _, _, ok = eigenbasis_power_qr(stack, torch.eye(5, dtype=torch.float64).expand_as(stack))
    assert ok[1].item() is False


def test_coupled_newton_well_conditioned():
    stack = spd_stack() + 5 * torch.eye(5, dtype=torch.float64)
    newton, ok = inverse_root_coupled_newton(stack, 4, 1e-6)
    exact, _ = inverse_root_eigh(stack, 4, 1e-6)
    assert ok.all()
    torch.testing.assert_close(newton, exact, rtol=1e-5, atol=1e-6)


def authors_power_iter(mat, start, tolerance=1e-6, iterations=100):
    """The Shampoo authors' ``PowerIter`` for one matrix, from a given start vector."""
    v, error, count, value = start.clone(), 1.0, 0, torch.zeros((), dtype=mat.dtype)
    while error > tolerance and count < iterations:
        v = v / torch.norm(v)
        mat_v = mat @ v
        s_v = torch.dot(v, mat_v)
        error, v, value, count = (s_v - value).abs(), mat_v, s_v, count + 1
    return value


@pytest.mark.parametrize("check_every", [1, 3, 10, 200])
def test_power_iteration_stops_each_matrix_as_the_authors_do(check_every):
    """Batched, with host checks every few rounds and compaction, each matrix's estimate is the
    authors' single-matrix PowerIter's: the early converging ones are not iterated further."""
    gen = torch.Generator().manual_seed(3)
    q = torch.linalg.qr(torch.randn(6, 8, 8, generator=gen, dtype=torch.float64))[0]
    gaps = torch.tensor([0.1, 0.5, 0.9, 0.99, 0.999, 1.0], dtype=torch.float64)
    values = torch.linspace(0.1, 1.0, 8, dtype=torch.float64).expand(6, 8).clone()
    values[:, -1], values[:, -2] = 30.0, 30.0 * gaps  # second eigenvalue sets the speed
    stack = (q * values.unsqueeze(-2)) @ q.mT
    stack = torch.cat([stack, torch.zeros(1, 8, 8, dtype=torch.float64)])
    start = torch.linspace(1.0, 2.0, 8, dtype=torch.float64)
    got = _max_eigenvalue_power_iteration(stack.reshape(7, 1, 8, 8), check_every=check_every)
    assert got.shape == (7, 1)
    expected = torch.stack([authors_power_iter(m, start) for m in stack])
    torch.testing.assert_close(got.reshape(7), expected, rtol=1e-12, atol=1e-12)
    assert got[-1] == 0.0 and abs(got[0] - 30.0) < 1e-5  # zero matrix; fast convergence
    assert abs(got[-2] - 30.0) < 1e-9  # equal top two: converges from the first step on


def test_coupled_newton_counts_its_matmul_flops():
    """counts["root_matmul_flops"]: 2 n^3 per product, 4 products a round for p = 4 (x @ t,
    t^2, (t^2)^2, @ m), for every matrix iterated in a round (three copies of one matrix:
    all three in every round); added up across calls; a square root (p = 2) makes 3
    products a round."""
    stack = (spd_stack(k=1) + 5 * torch.eye(5, dtype=torch.float64)).expand(3, 5, 5)
    counts = {}
    inverse_root_coupled_newton(stack, 4, 1e-6, counts=counts)
    per_round = 2 * 5**3 * 3 * 4
    rounds = counts["root_matmul_flops"] / per_round
    assert rounds == int(rounds) and 1 <= rounds <= 100
    inverse_root_coupled_newton(stack, 4, 1e-6, counts=counts)
    assert counts["root_matmul_flops"] == 2 * rounds * per_round
    square = {}
    inverse_root_coupled_newton(stack, 2, 1e-6, counts=square)
    assert square["root_matmul_flops"] % (2 * 5**3 * 3 * 3) == 0


def test_eigenbasis_descending_and_power_qr_orthogonal():
    stack = spd_stack()
    q, ok = eigenbasis_eigh(stack)
    est = torch.einsum("kij,kij->kj", q, stack @ q)
    assert ok.all() and torch.all(est[:, :-1] >= est[:, 1:])
    perturbed = stack + 0.01 * spd_stack(seed=1)
    q2, order, ok = eigenbasis_power_qr(perturbed, q)
    eye = torch.eye(5, dtype=torch.float64).expand_as(stack)
    torch.testing.assert_close(q2.mT @ q2, eye)
    assert order.shape == (3, 5) and ok.all()
    # the order sorts diag(Q^T A Q), the estimated eigenvalues, in descending order
    estimates = torch.diagonal(q.mT @ perturbed @ q, dim1=-2, dim2=-1)
    assert torch.equal(order, torch.argsort(estimates, dim=-1, descending=True, stable=True))
    # and Q' is the Q factor of A Q with its columns so ordered
    permuted = torch.gather(perturbed @ q, -1, order.unsqueeze(-2).expand(3, 5, 5))
    torch.testing.assert_close(q2, torch.linalg.qr(permuted)[0])


def test_newton_schulz_batched_equals_single_and_orthogonalises():
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4, 12, 7, generator=gen, dtype=torch.float64)
    batched = newton_schulz5(g, steps=5)
    single = torch.stack([newton_schulz5(m, steps=5) for m in g])
    torch.testing.assert_close(batched, single)
    s = torch.linalg.svdvals(batched)
    assert s.min() > 0.6 and s.max() < 1.25
    # many more steps with the classic cubic-free (1.5, -0.5, 0) map converge to UV^T
    exact = newton_schulz5(g, steps=60, coefficients=(1.5, -0.5, 0.0))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    torch.testing.assert_close(exact, u @ vh, rtol=1e-8, atol=1e-8)
    assert not newton_schulz5(torch.zeros(3, 4), steps=5).isnan().any()


def test_tf32_round_and_matmul_precision():
    from optimkit.linalg import matmul, tf32_round

    x = torch.tensor([1.0, 1.0 + 2**-11, 1.0 + 2**-10, 1.0 + 3 * 2**-11, float("inf"), -3.3])
    # ties to even at TF32's 10-bit mantissa; inf kept
    assert tf32_round(x).tolist() == [
        1.0,
        1.0,
        1.0 + 2**-10,
        1.0 + 2**-9,
        float("inf"),
        tf32_round(torch.tensor([-3.3])).item(),
    ]
    assert abs(tf32_round(torch.tensor([-3.3])).item() + 3.3) <= 3.3 * 2**-11
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 40, generator=gen), torch.randn(40, 20, generator=gen)
    assert torch.equal(matmul(a, b, "fp32"), a @ b)
    assert torch.equal(matmul(a, b, "tf32"), tf32_round(a) @ tf32_round(b))
    assert not torch.equal(matmul(a, b, "tf32"), a @ b)
    d = a.double()
    assert torch.equal(matmul(d, b.double(), "tf32"), d @ b.double())  # fp64 untouched
    with pytest.raises(ValueError, match="precision must be one of"):
        matmul(a, b, "bf16")  # 16-bit products take 16-bit operands (half_matmul)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matmul_accumulate_in_place(dtype):
    """out = beta out + alpha a @ b, in place, also into a strided view; TF32 rounds the
    product's inputs only; the CUDA path (one GEMM with the accumulation) agrees."""
    from optimkit.linalg import matmul, matmul_accumulate_

    gen = torch.Generator().manual_seed(2)
    a = torch.randn(2, 6, 4, generator=gen, dtype=dtype)
    b = torch.randn(2, 4, 5, generator=gen, dtype=dtype)
    base = torch.randn(2, 7, 8, generator=gen, dtype=dtype)
    for precision in ("fp32", "tf32"):
        out = base.clone()
        view = out[:, 1:, 3:]  # strided: the result must land in the parent
        result = matmul_accumulate_(view, a, b, 0.9, -0.25, precision)
        assert result.data_ptr() == view.data_ptr()
        expected = 0.9 * base[:, 1:, 3:] - 0.25 * matmul(a, b, precision)
        torch.testing.assert_close(out[:, 1:, 3:], expected)
        assert torch.equal(out[:, 0], base[:, 0]) and torch.equal(out[:, :, :3], base[:, :, :3])
        single = base[0].clone()
        matmul_accumulate_(single[:6, :5], a[0], b[0], 1.0, -1.0, precision)
        torch.testing.assert_close(single[:6, :5], base[0, :6, :5] - matmul(a[0], b[0], precision))
        if torch.cuda.is_available():
            on_gpu = base.cuda()
            matmul_accumulate_(on_gpu[:, 1:, 3:], a.cuda(), b.cuda(), 0.9, -0.25, precision)
            tol = 1e-2 if precision == "tf32" and dtype == torch.float32 else 1e-5
            torch.testing.assert_close(on_gpu.cpu(), out, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_matmul_accumulates_in_fp32(dtype):
    """16-bit operands, fp32 accumulation: the exact product of the rounded values to fp32
    rounding (not the 16-bit rounding of each partial sum); a 16-bit result is that product
    rounded once; other dtypes or result dtypes are refused by name."""
    from optimkit.linalg import half_matmul

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(2, 6, 300, generator=gen).to(dtype)
    b = torch.randn(300, 5, generator=gen).to(dtype)
    exact = a.double() @ b.double()
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        product = half_matmul(a.to(device), b.to(device)).cpu()
        assert product.dtype == torch.float32
        torch.testing.assert_close(product.double(), exact, rtol=1e-5, atol=1e-4)
        rounded = half_matmul(a[0].to(device), b.to(device), dtype).cpu()
        assert rounded.dtype == dtype
        torch.testing.assert_close(rounded, exact[0].to(dtype), rtol=0, atol=0)
    with pytest.raises(ValueError, match="two float16 or two bfloat16"):
        half_matmul(a, b.float())
    with pytest.raises(ValueError, match="out_dtype"):
        half_matmul(a, b, torch.float64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matmul_accumulate_of_half_operands_into_fp32(dtype):
    """16-bit operands into an fp32 ``out`` (also a strided view, also beta 0 over NaN):
    beta out + alpha a @ b with fp32 accumulation; on CUDA the one-GEMM path
    (addmm/baddbmm with out_dtype, out as input and output) and the product-then-update
    path both agree with it."""
    import optimkit.linalg as linalg

    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 6, 64, generator=gen).to(dtype)
    b = torch.randn(2, 64, 5, generator=gen).to(dtype)
    base = torch.randn(2, 7, 8, generator=gen)
    product = a.double() @ b.double()
    expected = (0.9 * base[:, 1:, 3:].double() - 0.25 * product).float()
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        for in_place in (True, False):
            linalg.HALF_ACCUMULATE_IN_PLACE = in_place
            try:
                out = base.to(device, copy=True)
                result = linalg.matmul_accumulate_(
                    out[:, 1:, 3:], a.to(device), b.to(device), 0.9, -0.25
                )
                single = torch.full((6, 5), float("nan"), device=device)
                linalg.matmul_accumulate_(single, a[0].to(device), b[0].to(device), 0.0, 2.0)
            finally:
                linalg.HALF_ACCUMULATE_IN_PLACE = True
            assert result.data_ptr() == out[:, 1:, 3:].data_ptr()
            torch.testing.assert_close(out[:, 1:, 3:].cpu(), expected, rtol=1e-5, atol=1e-5)
            assert torch.equal(out[:, 0].cpu(), base[:, 0])
            torch.testing.assert_close(single.cpu(), 2 * product[0].float(), rtol=1e-5, atol=1e-5)


def test_batched_qr_matches_torch():
    from optimkit.linalg import batched_qr

    stack = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(batched_qr(stack), torch.linalg.qr(stack)[0], rtol=0, atol=0)
    if torch.cuda.is_available():  # the stream-parallel path
        big = torch.randn(6, 64, 64, device="cuda")
        per_matrix = torch.stack([torch.linalg.qr(m)[0] for m in big])
        torch.testing.assert_close(batched_qr(big), per_matrix, rtol=1e-6, atol=1e-6)


def _same_up_to_column_signs(q, reference):
    signs = torch.sign((q * reference).sum(-2, keepdim=True))
    return (q - reference * signs).abs().amax()


@pytest.mark.parametrize("name", ["cholesky_qr2", "block_gram_schmidt_qr"])
@pytest.mark.parametrize("block", [4, 5, 256])
def test_matmul_qr_is_householders_q_up_to_signs(name, block):
    """Blocked (block 4, 5: uneven last block) and unblocked CholeskyQR2 and block Gram-Schmidt
    give torch.linalg.qr's Q factor in fp64 (columns may differ in sign), orthogonal, and
    report success; in fp32 and TF32 within their rounding."""
    qr = getattr(linalg, name)
    gen = torch.Generator().manual_seed(3)
    stack = torch.randn(3, 13, 13, generator=gen, dtype=torch.float64)
    stack[1] *= torch.logspace(0, -6, 13, dtype=torch.float64)  # badly scaled columns
    original = stack.clone()
    q, ok = qr(stack, block=block)
    assert ok.all() and torch.equal(stack, original)  # the input is not overwritten
    assert _same_up_to_column_signs(q, torch.linalg.qr(stack)[0]) < 1e-12
    torch.testing.assert_close(q.mT @ q, torch.eye(13, dtype=torch.float64).expand(3, 13, 13))
    # fp32: within fp32 rounding; TF32 (emulated here): within its rounding, still orthogonal
    q32, ok32 = qr(stack.float(), block=block)
    assert ok32.all() and _same_up_to_column_signs(q32.double(), q) < 1e-4
    q_tf32, ok_tf32 = qr(stack.float(), "tf32", block=block)
    assert ok_tf32.all() and _same_up_to_column_signs(q_tf32.double(), q) < 5e-2
    if name == "cholesky_qr2" or block < 13:  # TF32 products took part (Gram-Schmidt's one
        # panel of 13 columns is only factored in fp64)
        assert _same_up_to_column_signs(q_tf32.double(), q) > 1e-6
    assert (q_tf32.mT @ q_tf32 - torch.eye(13)).abs().amax() < 2e-2


def _stale_basis_products(n: int, decades: float, perturbation: float, count: int = 2):
    """``(A, A Q)`` with A of a spectrum over ``decades`` decades and Q the eigenbasis of a
    perturbed A, its columns ordered by estimated eigenvalue: a warm-started refresh's
    product, fp64."""
    gen = torch.Generator().manual_seed(7)
    u, _ = torch.linalg.qr(torch.randn(count, n, n, generator=gen, dtype=torch.float64))
    a = (u * torch.logspace(0, -decades, n, dtype=torch.float64)) @ u.mT
    noise = torch.randn(count, n, n, generator=gen, dtype=torch.float64)
    _, basis = torch.linalg.eigh(a + perturbation * (noise + noise.mT))
    product = a @ basis
    order = torch.argsort((basis * product).sum(-2), dim=-1, descending=True)
    return a, torch.gather(product, -1, order.unsqueeze(-2).expand_as(product))


def test_block_gram_schmidt_qr_on_stale_basis_products(monkeypatch):
    """Power-iteration products of a stale basis (6 decades of spectrum, condition ~300 after
    column scaling; blocks of 16 over 96 columns): block Gram-Schmidt gives Householder's Q up
    to signs at fp32 rounding and an orthogonal Q at TF32 (emulated) that diagonalises A as
    well as Householder's does, to TF32 rounding. At condition ~2e6 two TF32 projections
    cannot keep the trailing blocks orthogonal (flagged when the extra passes are off); the
    extra passes on the panels whose second projection is ill conditioned restore it to
    TF32's rounding, and the basis diagonalises A as well as fp32 Householder's."""

    def off_diagonal(a, q):
        rotated = q.mT @ a @ q
        return (rotated - torch.diag_embed(torch.diagonal(rotated, dim1=-2, dim2=-1))).norm(
            dim=(-2, -1)
        ) / a.norm(dim=(-2, -1))

    def loss_of_orthogonality(q):
        return (q.mT.double() @ q.double() - torch.eye(q.size(-1), dtype=torch.float64)).abs()

    a, product = _stale_basis_products(96, 6.0, 1e-5)
    reference = torch.linalg.qr(product)[0]
    q32, ok32 = linalg.block_gram_schmidt_qr(product.float(), "fp32", block=16)
    assert ok32.all() and _same_up_to_column_signs(q32.double(), reference) < 1e-3
    q_tf32, ok_tf32 = linalg.block_gram_schmidt_qr(product.float(), "tf32", block=16)
    assert ok_tf32.all() and loss_of_orthogonality(q_tf32).amax() < 2e-2
    assert (off_diagonal(a, q_tf32.double()) < off_diagonal(a, reference) + 5e-3).all()

    a, product = _stale_basis_products(96, 8.0, 1e-3)
    reference = torch.linalg.qr(product.float())[0].double()
    q_tf32, ok_tf32 = linalg.block_gram_schmidt_qr(product.float(), "tf32", block=16)
    assert ok_tf32.all() and loss_of_orthogonality(q_tf32).amax() < 3e-3
    assert (off_diagonal(a, q_tf32.double()) < off_diagonal(a, reference) + 5e-3).all()
    stacked, _ = linalg.block_gram_schmidt_qr(product.float()[None], "tf32", block=16)
    assert torch.equal(stacked[0], q_tf32)  # two batch axes: the same extra passes
    monkeypatch.setattr(linalg, "GRAM_SCHMIDT_EXTRA_PASSES", 0)
    q_two, ok_two = linalg.block_gram_schmidt_qr(product.float(), "tf32", block=16)
    assert not ok_two.all() and loss_of_orthogonality(q_two).amax() > 2e-2
    _, ok32 = linalg.block_gram_schmidt_qr(product.float(), "fp32", block=16)
    assert ok32.all()


def test_cholesky_qr2_factors_the_first_pass_in_fp64():
    """Products of condition 1e5 (a stale basis's A Q in training): with the first pass's
    Gram matrix and Cholesky factor in fp32 or TF32 (kappa^2 u > 1) every matrix is flagged;
    in fp64 (the default) fp32 gives Householder's Q (up to signs) and a backward error at
    fp32 rounding, and TF32 factors more of them, each an orthogonal Q with Q^T Y upper
    triangular up to TF32 rounding."""
    from optimkit.linalg import cholesky_qr2

    n = 48
    gen = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(4, n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(4, n, n, generator=gen, dtype=torch.float64))
    y = (u * torch.logspace(0, -5, n, dtype=torch.float64)) @ v.mT
    y = y / torch.linalg.vector_norm(y, dim=-2, keepdim=True)
    reference = torch.linalg.qr(y)[0]

    def backward_error(q):
        return torch.tril(q.double().mT @ y, -1).abs().amax((-2, -1))

    for precision in ("fp32", "tf32"):
        _, ok_plain = cholesky_qr2(y.float(), precision, factor_in_fp64=False)
        assert not ok_plain.any()
    q32, ok32 = cholesky_qr2(y.float(), "fp32")
    assert ok32.all() and _same_up_to_column_signs(q32.double(), reference) < 1e-3
    assert (backward_error(q32) < 1e-5).all()
    q_tf32, ok_tf32 = cholesky_qr2(y.float(), "tf32")
    assert ok_tf32.sum() >= 2
    errors = backward_error(q_tf32)
    eye = torch.eye(n)
    for i in ok_tf32.nonzero().flatten().tolist():
        assert (q_tf32[i].mT @ q_tf32[i] - eye).abs().amax() < 2e-2
        assert errors[i] < 5e-2


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_blocked_cholesky_reads_only_the_upper_blocks(device):
    """_gram_upper computes Y^T Y on and above its diagonal blocks; _blocked_cholesky_ reads
    nothing below them (NaN there changes nothing) and its panels and inverted diagonal
    blocks make torch's Cholesky factor; matmul_accumulate_ with beta 0 ignores a NaN out."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from optimkit.linalg import _blocked_cholesky_, _gram_upper, matmul_accumulate_

    gen = torch.Generator().manual_seed(5)
    y = torch.randn(2, 11, 11, generator=gen, dtype=torch.float64).to(device)
    gram = _gram_upper(y, "fp32", 4)
    full = y.mT @ y
    blocks = torch.arange(11, device=device) // 4
    upper = blocks[:, None] <= blocks[None, :]
    torch.testing.assert_close(gram[:, upper], full[:, upper])
    gram[:, ~upper] = float("nan")
    panels, inverses, ok = _blocked_cholesky_(gram, "fp32", 4)
    factor = torch.linalg.cholesky(full, upper=True)
    assert ok.all() and len(panels) == 2 and len(inverses) == 3
    for index, start in enumerate(range(0, 11, 4)):
        stop = min(start + 4, 11)
        diagonal = factor[:, start:stop, start:stop]
        eye = torch.eye(stop - start).to(full).expand_as(diagonal)
        torch.testing.assert_close(inverses[index] @ diagonal, eye)
        if stop < 11:
            torch.testing.assert_close(panels[index], factor[:, start:stop, stop:])
    out = torch.full((3, 3), float("nan"), dtype=torch.float64, device=device)
    a = torch.randn(3, 2, generator=gen, dtype=torch.float64).to(device)
    matmul_accumulate_(out, a, a.T, 0.0, 2.0)
    torch.testing.assert_close(out, 2 * a @ a.T)


@pytest.mark.parametrize("name", ["cholesky_qr2", "block_gram_schmidt_qr"])
def test_matmul_qr_flags_what_it_cannot_factor(name):
    """A zero column or a NaN cannot be factored and is flagged; a rank-deficient matrix is
    either flagged or (rounding made its Gram matrix definite) given a valid Q factor:
    orthogonal with Q Q^T Y = Y."""
    qr = getattr(linalg, name)
    stack = torch.randn(5, 6, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    stack[1, :, 3] = stack[1, :, 2]  # rank-deficient
    stack[2, :, 0] = 0.0  # a zero column
    stack[3, 0, 0] = float("nan")
    stack[4, 2, 5] = float("-inf")
    q, ok = qr(stack, block=2)
    assert ok[0] and not ok[2] and not ok[3] and not ok[4]
    for i in (0, 1):
        if ok[i]:
            torch.testing.assert_close(q[i].mT @ q[i], torch.eye(6, dtype=torch.float64))
            torch.testing.assert_close(q[i] @ (q[i].mT @ stack[i]), stack[i])


def _statistics_with_an_unused_coordinate(count: int):
    """``count`` 6x6 fp64 statistics, the first with a zero last row and column (a coordinate
    that never had a gradient: a zero column in A Q), and identity bases."""
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(count, 6, 6, generator=gen, dtype=torch.float64)
    stats = full @ full.mT
    stats[0, -1, :] = 0.0
    stats[0, :, -1] = 0.0
    return stats, torch.eye(6, dtype=torch.float64).expand(count, 6, 6).clone()


def test_power_qr_gram_schmidt_falls_back_in_turn(monkeypatch):
    """method="gram_schmidt": a matrix block Gram-Schmidt flags takes CholeskyQR2, one that
    CholeskyQR2 flags too (a zero column of A Q) Householder's QR; each counted, every Q
    orthogonal and the one of each stage that stage's own."""
    stats, basis = _statistics_with_an_unused_coordinate(3)
    gram_schmidt = linalg.block_gram_schmidt_qr

    def flag_the_second(stack, precision="fp32", block=None, **options):  # and the failures
        q, ok = gram_schmidt(stack, precision, block, **options)
        ok[1] = False
        return q, ok

    monkeypatch.setattr(linalg, "block_gram_schmidt_qr", flag_the_second)
    counts = {}
    q, order, ok = eigenbasis_power_qr(stats, basis, method="gram_schmidt", counts=counts)
    assert ok.all() and counts == {"cholesky_fallbacks": 2, "householder_fallbacks": 1}
    torch.testing.assert_close(q.mT @ q, torch.eye(6, dtype=torch.float64).expand(3, 6, 6))
    householder, ref_order, _ = eigenbasis_power_qr(stats, basis, method="householder")
    assert torch.equal(order, ref_order)
    assert torch.equal(q[0], householder[0])
    product = torch.gather(stats @ basis, -1, order.unsqueeze(-2).expand(3, 6, 6))
    assert torch.equal(q[1], linalg.cholesky_qr2(product[1:2])[0][0])
    assert torch.equal(q[2], gram_schmidt(product[2:3])[0][0])


def test_power_qr_cholesky_falls_back_to_householder_and_counts():
    """A statistic with a zero row and column (a coordinate that never had a gradient) makes a
    zero column in A Q, which Cholesky cannot factor: that matrix takes Householder's QR
    (counted), the other keeps CholeskyQR2's; both orthogonal, the same order."""
    stats, basis = _statistics_with_an_unused_coordinate(2)
    counts = {}
    q, order, ok = eigenbasis_power_qr(stats, basis, method="cholesky", counts=counts)
    assert ok.all() and counts == {"householder_fallbacks": 1}
    eye = torch.eye(6, dtype=torch.float64).expand(2, 6, 6)
    torch.testing.assert_close(q.mT @ q, eye)
    reference, ref_order, _ = eigenbasis_power_qr(stats, basis, method="householder")
    assert torch.equal(order, ref_order)
    assert torch.equal(q[0], reference[0])  # the fallback is Householder's exactly
    assert _same_up_to_column_signs(q[1:], reference[1:]) < 1e-12
    with pytest.raises(ValueError, match="method"):
        eigenbasis_power_qr(stats, basis, method="givens")


@pytest.mark.parametrize("method", ["cholesky", "gram_schmidt"])
@pytest.mark.parametrize("factor_in_fp64", [True, False])
def test_power_qr_passes_factor_in_fp64_on(monkeypatch, method, factor_in_fp64):
    """eigenbasis_power_qr's factor_in_fp64 reaches the matrix-product QR it uses (and the
    CholeskyQR2 fallback of Gram-Schmidt), and both settings give an orthogonal basis."""
    seen = []
    for name in ("cholesky_qr2", "block_gram_schmidt_qr"):
        original = getattr(linalg, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            seen.append((_name, kwargs.get("factor_in_fp64")))
            q, ok = _original(*args, **kwargs)
            if _name == "block_gram_schmidt_qr":
                ok[0] = False  # so that the fallback runs too
            return q, ok

        monkeypatch.setattr(linalg, name, spy)
    gen = torch.Generator().manual_seed(8)
    full = torch.randn(2, 6, 6, generator=gen)
    stats = full @ full.mT
    basis = torch.eye(6).expand(2, 6, 6).clone()
    q, _, ok = eigenbasis_power_qr(
        stats, basis, method=method, counts={}, factor_in_fp64=factor_in_fp64
    )
    expected = [("cholesky_qr2", factor_in_fp64)]
    if method == "gram_schmidt":
        expected.insert(0, ("block_gram_schmidt_qr", factor_in_fp64))
    assert seen == expected
    assert ok.all()
    torch.testing.assert_close(q.mT @ q, torch.eye(6).expand(2, 6, 6), atol=1e-5, rtol=0)


def test_distance_to_identity_is_the_max_entry_of_m_minus_i():
    """max |M - I| per matrix, exactly as the subtraction gives it, the stack left unchanged
    (its diagonal is zeroed and restored); a NaN anywhere propagates."""
    gen = torch.Generator().manual_seed(5)
    stack = torch.eye(6) + 1e-3 * torch.randn(4, 6, 6, generator=gen)
    stack[1, 2, 2] = 1.5  # the largest entry on the diagonal
    stack[2, 0, 5] = -0.25  # off the diagonal
    stack[3, 4, 1] = float("nan")
    original = stack.clone()
    expected = (stack - torch.eye(6)).abs().amax((-2, -1))
    distance = linalg._distance_to_identity(stack)
    assert torch.equal(distance[:3], expected[:3]) and torch.isnan(distance[3])
    assert torch.equal(torch.nan_to_num(stack), torch.nan_to_num(original))
    assert distance[1] == 0.5 and distance[2] == 0.25


def test_block_gram_schmidt_qr_with_fp16_projections(monkeypatch):
    """The fp16 projections (CUDA's TF32 path; emulated here: fp16 inputs multiplied in fp32)
    give what the TF32 projections give, to TF32 rounding: an orthogonal Q that is
    Householder's up to signs on a well-conditioned stack, and on stale-basis products of
    condition ~2e6 (with extra passes) an orthogonal Q that diagonalises A as well as fp32
    Householder's. The path is taken (fp16 bases reach the projection)."""
    seen = []
    project = linalg._project_out_

    def spy(panel, basis, precision):
        seen.append(basis.dtype)
        return project(panel, basis, precision)

    monkeypatch.setattr(linalg, "_project_out_", spy)
    monkeypatch.setattr(linalg, "_half_projections", lambda q, precision: precision == "tf32")
    gen = torch.Generator().manual_seed(3)
    stack = torch.randn(3, 40, 40, generator=gen, dtype=torch.float64)
    q, ok = linalg.block_gram_schmidt_qr(stack.float(), "tf32", block=8)
    assert ok.all() and set(seen) == {torch.float16}
    assert _same_up_to_column_signs(q.double(), torch.linalg.qr(stack)[0]) < 5e-2
    assert (q.mT.double() @ q.double() - torch.eye(40, dtype=torch.float64)).abs().amax() < 2e-2

    a, product = _stale_basis_products(96, 8.0, 1e-3)
    reference = torch.linalg.qr(product.float())[0].double()
    q, ok = linalg.block_gram_schmidt_qr(product.float(), "tf32", block=16)
    assert ok.all()
    assert (q.mT.double() @ q.double() - torch.eye(96, dtype=torch.float64)).abs().amax() < 3e-3

    def off_diagonal(basis):
        x = basis.mT @ a @ basis
        off = (x - torch.diag_embed(torch.diagonal(x, dim1=-2, dim2=-1))).norm(dim=(-2, -1))
        return off / a.norm(dim=(-2, -1))

    assert (off_diagonal(q.double()) < off_diagonal(reference) + 5e-3).all()
    seen.clear()
    linalg.block_gram_schmidt_qr(product.float(), "fp32", block=16)
    assert set(seen) == {torch.float32}  # fp32 precision keeps fp32 projections


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_fp16_projections_on_cuda_match_the_tf32_ones(monkeypatch):
    """On the GPU the fp16 projections (torch.bmm with out_dtype=float32) give the TF32
    projections' Q to TF32 rounding, orthogonal, on stale-basis products; they are taken at
    TF32 from GRAM_SCHMIDT_WIDE columns on (here lowered to 256), not below, not in fp32."""
    _, product = _stale_basis_products(256, 6.0, 1e-5, count=3)
    product = product.float().cuda()
    assert not linalg._half_projections(product, "tf32")  # 256 < GRAM_SCHMIDT_WIDE
    monkeypatch.setattr(linalg, "GRAM_SCHMIDT_WIDE", 256)
    assert linalg._half_projections(product, "tf32")
    assert not linalg._half_projections(product, "fp32")
    assert not linalg._half_projections(product.cpu(), "tf32")
    q_half, ok_half = linalg.block_gram_schmidt_qr(product, "tf32", block=64)
    monkeypatch.setattr(linalg, "HALF_PROJECTIONS", False)
    assert not linalg._half_projections(product, "tf32")
    q_tf32, ok_tf32 = linalg.block_gram_schmidt_qr(product, "tf32", block=64)
    assert ok_half.all() and ok_tf32.all()
    eye = torch.eye(256, device="cuda")
    assert (q_half.mT @ q_half - eye).abs().amax() < 3e-3
    assert 0 < _same_up_to_column_signs(q_half, q_tf32) < 5e-2


def test_half_projections_at_is_the_rule_for_a_side(monkeypatch):
    """fp16 projections exactly at TF32, on CUDA, for fp32 matrices of at least
    GRAM_SCHMIDT_WIDE columns, while HALF_PROJECTIONS is on (no GPU needed to ask)."""
    cuda, wide = torch.device("cuda"), linalg.GRAM_SCHMIDT_WIDE
    assert linalg.half_projections_at(wide, cuda, "tf32")
    assert not linalg.half_projections_at(wide - 1, cuda, "tf32")
    assert not linalg.half_projections_at(wide, cuda, "fp32")
    assert not linalg.half_projections_at(wide, torch.device("cpu"), "tf32")
    assert not linalg.half_projections_at(wide, cuda, "tf32", torch.float64)
    monkeypatch.setattr(linalg, "HALF_PROJECTIONS", False)
    assert not linalg.half_projections_at(wide, cuda, "tf32")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_all_finite_marks_each_matrix(device, dtype):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA")
    stack = torch.randn(6, 2, 3, 4, device=device).to(dtype)
    bad = {(0, 1, 2, 3): float("nan"), (2, 0, 0, 0): float("inf"), (4, 1, 1, 2): -float("inf")}
    for index, value in bad.items():
        stack[index] = value
    stack[5, 0, 2, 1] = 1e30 if dtype != torch.bfloat16 else 3e38  # large but finite
    expected = torch.ones(6, 2, dtype=torch.bool)
    for index in bad:
        expected[index[:2]] = False
    assert torch.equal(linalg.all_finite(stack).cpu(), expected)
    assert linalg.all_finite(stack[:, :, :0]).shape == (6, 2)
    assert linalg.all_finite(stack[:, :, :0]).all()


def test_coupled_newton_stops_each_matrix_on_its_own():
    """A batch of matrices that need very different numbers of rounds gives each one the
    root it gets alone (with its own error-growth stop), with fewer products than every
    matrix iterating until the slowest converges: the finished ones are set aside once at
    most half still run. The batch shape is kept."""
    gen = torch.Generator().manual_seed(4)
    q = torch.linalg.qr(torch.randn(6, 6, 6, generator=gen, dtype=torch.float64))[0]
    decades = torch.tensor([0.0, 0.5, 1.0, 6.0, 9.0, 1.0], dtype=torch.float64)
    values = 10 ** (-decades[:, None] * torch.linspace(0, 1, 6, dtype=torch.float64))
    stack = (q * values.unsqueeze(-2)) @ q.mT
    counts = {}
    roots, ok = inverse_root_coupled_newton(stack.reshape(2, 3, 6, 6), 4, 1e-12, counts=counts)
    assert roots.shape == (2, 3, 6, 6) and ok.shape == (2, 3) and ok.all()
    alone, rounds = [], []
    for matrix in stack:
        single = {}
        root, good = inverse_root_coupled_newton(matrix, 4, 1e-12, counts=single)
        assert root.shape == (6, 6) and good.shape == () and bool(good)
        alone.append(root)
        rounds.append(single["root_matmul_flops"] / (2 * 6**3 * 4))
    torch.testing.assert_close(roots.reshape(6, 6, 6), torch.stack(alone), rtol=1e-12, atol=0)
    assert max(rounds) >= 2 * min(rounds)  # the test's premise: uneven rounds
    flops_per_matrix_round = 2 * 6**3 * 4
    assert sum(rounds) * flops_per_matrix_round <= counts["root_matmul_flops"]
    assert counts["root_matmul_flops"] < max(rounds) * 6 * flops_per_matrix_round
