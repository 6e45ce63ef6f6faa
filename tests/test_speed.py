"""The speed command and the memory tracker (properties, not timings)."""

from __future__ import annotations

import json

import pytest
import torch

import optimkit
from optimkit.lab import speed


def test_transformer_shapes_count():
    shapes = speed.shapes_for("cpu")
    numel = sum(torch.Size(s).numel() for s in shapes)
    assert 10e6 < numel < 11e6
    assert sum(torch.Size(s).numel() for s in speed.llama_shapes()) == 12 * (
        4 * 2048 * 2048 + 3 * 5504 * 2048
    )


def test_peak_step_bytes_counts_temporaries():
    x = torch.ones(1000)
    assert speed.peak_step_bytes(lambda: x.mul_(2)) == 0
    assert speed.peak_step_bytes(lambda: (x * 2).sum()) >= 4000
    kept = []
    assert speed.peak_step_bytes(lambda: kept.extend([x + 1, x + 2])) == 8000


def _param_list(shapes):
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def test_adamw_step_allocates_at_most_one_parameter_sized_buffer():
    """No hidden temporaries: a foreach AdamW step allocates at most one parameter-sized buffer
    above its state (the issue's memory bound), and much less with cache-sized chunks."""
    params = _param_list(speed.shapes_for("tiny") + [(700, 600)])
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    for name in ("AdamW", "Adam", "AdaMax", "SGD"):
        for impl in ("foreach", "reference"):
            opt = (
                optimkit.create(name, params, impl=impl, momentum=0.9)
                if name == "SGD"
                else optimkit.create(name, params, impl=impl)
            )
            opt.step()
            assert speed.peak_step_bytes(opt.step) <= param_bytes, (name, impl)


def test_speed_main_tiny(tmp_path, capsys):
    out = tmp_path / "speed.json"
    code = speed.main(
        [
            "--size",
            "tiny",
            "--optimizers",
            "AdamW,SGD",
            "--impls",
            "foreach,reference",
            "--steps",
            "1",
            "--rounds",
            "1",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    payload = json.loads(out.read_text())
    labels = [r["label"] for r in payload["results"]]
    assert labels[0] == "torch AdamW foreach" and "AdamW foreach" in labels
    assert "SGD reference" in labels
    first = payload["results"][0]
    assert first["vs_torch_foreach"] == 1.0 and first["bytes_per_param"] == 28
    assert "ms/step" in capsys.readouterr().out


def test_speed_rejects_unknown_optimizer(capsys):
    try:
        speed.main(["--size", "tiny", "--optimizers", "Nope"])
    except SystemExit as exit_:
        assert exit_.code == 2
    assert "available:" in capsys.readouterr().err


def test_matrix_flop_counts():
    from optimkit.lab import speed_matrix

    shapes = speed.llama_shapes()
    # the estimate for SOAP at frequency 10 on this list: about 2.5e13 FLOPs a step,
    # 2.3e13 with the statistics as symmetric products (half of each)
    assert 2.1e13 < speed_matrix.soap_flops(shapes, 10) < 2.6e13
    # one 4x6 matrix at frequency 1: statistics and rotations 2.5 x (2*4*24 + 2*6*24); the
    # refresh per side k: power step and Q 4 k^3, the momentum back and into (2 k * 24 each)
    # or by Q_new^T Q_old (2 k^3 + 2 k * 24), the cheaper: k=4 forms it, k=6 does not
    refresh = (4 * 64 + 192 + min(192, 2 * 64)) + (4 * 216 + 288 + min(288, 2 * 216))
    assert speed_matrix.soap_flops([(4, 6)], 1) == 2.5 * (192 + 288) + refresh
    # one 4x6 matrix: Newton-Schulz, 5 iterations of 4 k^2 l + 2 k^3 with k=4, l=6
    assert speed_matrix.muon_flops([(4, 6)]) == 5 * (4 * 16 * 6 + 2 * 64)
    # Shampoo's blocks of a 5x3 matrix with block 2: (2,2),(2,1),(2,2),(2,1),(1,2),(1,1)
    blocks = [(2, 2), (2, 1), (2, 2), (2, 1), (1, 2), (1, 1)]
    assert speed_matrix.shampoo_flops([(5, 3)], 2, 10) == sum(
        2 * (2 * a * a * b + 2 * a * b * b) for a, b in blocks
    )


def test_speed_matrix_main_tiny(tmp_path):
    from optimkit.cli import main as cli_main

    out = tmp_path / "matrix.json"
    assert (
        cli_main(
            [
                "bench",
                "speed-matrix",
                "--size",
                "tiny",
                "--device",
                "cpu",
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    payload = json.loads(out.read_text())
    assert [r["optimizer"] for r in payload["results"]] == [
        "SOAP(matmul_precision='bf16')",
        "Shampoo(root_method='newton')",
        "Muon",
    ]
    assert all(r["ms_per_step"] > 0 and r["flops_per_step"] > 0 for r in payload["results"])


def test_speed_matrix_counts_newton_roots_in_the_floor(tmp_path):
    """Shampoo with root_method="newton": the products its roots ran during the timed steps
    (refresh_counts) are added, amortised, to the floor's FLOPs; eigh roots are not."""
    from optimkit.lab import speed_matrix

    out = tmp_path / "matrix.json"
    args = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--out", str(out)]
    spec = "Shampoo(root_method='newton',preconditioning_compute_steps=1),Shampoo"
    assert speed_matrix.main([*args, "--optimizers", spec]) == 0
    newton, eigh = json.loads(out.read_text())["results"]
    roots = newton["refresh_counts"]["root_matmul_flops"]
    assert roots > 0 and eigh["refresh_counts"] == {}
    blocks_only = speed_matrix.shampoo_flops(speed_matrix.shapes_for("tiny"), 128, 1)
    assert newton["flops_per_step"] == pytest.approx(blocks_only + roots / 2)


def test_speed_matrix_configured_optimizers_and_precisions(tmp_path):
    """NAME(key=value) specs are timed with those hyperparameters; the floor uses the matmul
    precision they select; every row reports its share of a 0.5 M-token training step."""
    from optimkit.lab import speed_matrix

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert speed_matrix.precision_of("Muon", {"ns_dtype": "auto"}, cuda) == "bf16"
    assert speed_matrix.precision_of("Muon", {"ns_dtype": "auto"}, cpu) == "fp32"
    assert speed_matrix.precision_of("SOAP", {"matmul_precision": "tf32"}, cuda) == "tf32"
    assert speed_matrix.precision_of("SOAP", {"matmul_precision": "tf32"}, cpu) == "fp32"
    assert speed_matrix.precision_of("Shampoo", {}, cuda) == "fp32"
    out = tmp_path / "matrix.json"
    argv = ["--size", "tiny", "--device", "cpu", "--steps", "1", "--out", str(out)]
    assert speed_matrix.main([*argv, "--optimizers", "SOAP(precondition_frequency=2), Muon"]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["optimizer"] for r in rows] == ["SOAP(precondition_frequency=2)", "Muon"]
    assert rows[0]["hyperparameters"]["precondition_frequency"] == 2
    assert all(r["share_of_training_step"] > 0 for r in rows)
    with pytest.raises(SystemExit):
        speed_matrix.main([*argv, "--optimizers", "AdamW"])


def test_speed_matrix_reports_a_peer_it_cannot_import(tmp_path, monkeypatch, capsys):
    import sys

    from optimkit.lab import speed_matrix

    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import raises ImportError
    out = tmp_path / "matrix.json"
    argv = ["--size", "tiny", "--device", "cpu", "--steps", "1", "--out", str(out)]
    assert speed_matrix.main([*argv, "--optimizers", "Muon", "--peers"]) == 0
    assert "pytorch_optimizer cannot be imported" in capsys.readouterr().out
    assert [r["optimizer"] for r in json.loads(out.read_text())["results"]] == ["Muon"]


def test_speed_matrix_warms_up_before_timing(tmp_path, monkeypatch):
    """The timed steps follow --warmup untimed ones (default: one period of --steps), so the
    timed refresh is not the first one; bad counts are refused by name."""
    from optimkit.lab import speed_matrix

    calls = []
    real_step = optimkit.Muon.step

    def counting_step(self, *args, **kwargs):
        calls.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(optimkit.Muon, "step", counting_step)
    out = tmp_path / "matrix.json"
    argv = ["--size", "tiny", "--device", "cpu", "--steps", "3", "--out", str(out)]
    assert speed_matrix.main([*argv, "--optimizers", "Muon"]) == 0
    assert len(calls) == 1 + 3 + 3  # first, warm-up, timed
    payload = json.loads(out.read_text())
    assert (payload["timed_steps"], payload["warmup_steps"]) == (3, 3)
    calls.clear()
    assert speed_matrix.main([*argv, "--optimizers", "Muon", "--warmup", "0"]) == 0
    assert len(calls) == 1 + 3
    for bad in (["--warmup", "-1"], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            speed_matrix.main([*argv, "--optimizers", "Muon", *bad])


def test_speed_matrix_decaying_spectrum(tmp_path, capsys):
    """--spectrum decaying draws G = 1e-3 L Z R^T: the statistics' spectrum decays over about
    six decades in a fixed basis (isotropic ones stay within a small factor); the run
    records its spectrum; an unknown spectrum is refused by name."""
    from optimkit.lab import speed_matrix

    params = [torch.zeros(64, 32, requires_grad=True), torch.zeros(32, requires_grad=True)]
    for p in params:
        p.grad = torch.zeros_like(p)
    conditions = {}
    for spectrum in speed_matrix.SPECTRA:
        source = speed_matrix.GradientSource(params, spectrum, torch.device("cpu"))
        statistic = torch.zeros(64, 64, dtype=torch.float64)
        for _ in range(200):
            source()
            grad = params[0].grad.double()
            statistic += grad @ grad.T
        eigenvalues = torch.linalg.eigvalsh(statistic)
        conditions[spectrum] = float(eigenvalues[-1] / eigenvalues[0])
        assert params[1].grad.abs().max() > 0  # vectors get i.i.d. gradients
    assert conditions["isotropic"] < 10 and conditions["decaying"] > 1e5
    with pytest.raises(ValueError, match="spectrum must be one of"):
        speed_matrix.GradientSource(params, "flat", torch.device("cpu"))
    out = tmp_path / "matrix.json"
    argv = ["--size", "tiny", "--device", "cpu", "--steps", "2", "--out", str(out)]
    assert (
        speed_matrix.main(
            [*argv, "--optimizers", "SOAP(precondition_frequency=2)", "--spectrum", "decaying"]
        )
        == 0
    )
    payload = json.loads(out.read_text())
    assert payload["spectrum"] == "decaying"
    assert payload["results"][0]["ms_per_step"] > 0
    with pytest.raises(SystemExit):
        speed_matrix.main([*argv, "--spectrum", "flat"])


#: SOAP's hyperparameters that its floor reads (with a matmul_precision of each test's)
SOAP_FLOOR_HP = {
    "qr_method": "gram_schmidt",
    "max_precond_dim": 10000,
    "precondition_frequency": 10,
}


def test_soap_fp16_flops_are_the_wide_sides_qr(monkeypatch):
    """The part of SOAP's floor at the fp16 rate: the QR's Q (2 k^3 a refresh) of the sides
    from linalg.GRAM_SCHMIDT_WIDE columns on, whose Gram-Schmidt projections run as fp16
    products at TF32 on CUDA; none on the CPU, at fp32, by another QR, or switched off."""
    from optimkit import linalg
    from optimkit.lab import speed_matrix

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    hp = {**SOAP_FLOOR_HP, "matmul_precision": "tf32"}
    shapes = [(5504, 2048), (2048, 2048), (4096, 10)]
    assert speed_matrix.soap_fp16_flops(shapes, hp, cuda) == 2 * (5504**3 + 4096**3) / 10
    assert speed_matrix.soap_fp16_flops(shapes, {**hp, "max_precond_dim": 5000}, cuda) == (
        2 * 4096**3 / 10
    )
    assert speed_matrix.soap_fp16_flops(shapes, hp, cpu) == 0.0
    assert speed_matrix.soap_fp16_flops(shapes, {**hp, "matmul_precision": "fp32"}, cuda) == 0
    assert speed_matrix.soap_fp16_flops(shapes, {**hp, "qr_method": "cholesky"}, cuda) == 0
    monkeypatch.setattr(linalg, "HALF_PROJECTIONS", False)
    assert speed_matrix.soap_fp16_flops(shapes, hp, cuda) == 0.0


def test_soap_flops_by_precision_split_the_regular_step_from_the_refresh():
    """The floor's parts: the regular step's products and the momentum's rotation at a
    refresh at matmul_precision (bf16 for "bf16"), the refresh's power iteration and QR at
    TF32 for "bf16" and "tf32" (fp32 on the CPU's "tf32"), less its fp16 Gram-Schmidt part;
    together soap_flops."""
    from optimkit.lab import speed_matrix

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    hp = {**SOAP_FLOOR_HP, "matmul_precision": "bf16"}
    shapes = [(5504, 2048), (2048, 2048)]
    regular, refresh, rotation = speed_matrix.soap_flop_parts(shapes, 10)
    assert regular + refresh + rotation == speed_matrix.soap_flops(shapes, 10)
    assert regular == 2.5 * sum(2 * m * n * (m + n) for m, n in shapes)
    assert refresh == 4 * (3 * 2048**3 + 5504**3) / 10
    # 5504 x 2048: back and into the new basis on the 5504 side (2 * 2 k m n), by
    # Q_new^T Q_old on the 2048 side (2 k m n + 2 k^3); 2048 x 2048: the same on both sides
    one_side = 2 * 5504 * 2048
    assert rotation == pytest.approx(
        (2 * one_side * 5504 + one_side * 2048 + 2 * 2048**3 + 2 * (2 * 2048**3 + 2 * 2048**3)) / 10
    )
    fp16 = speed_matrix.soap_fp16_flops(shapes, hp, cuda)
    assert fp16 == 2 * 5504**3 / 10
    assert speed_matrix.soap_flops_by_precision(shapes, hp, cuda) == {
        "bf16": regular + rotation,
        "tf32": refresh - fp16,
        "fp16": fp16,
    }
    tf32 = {**hp, "matmul_precision": "tf32"}
    assert speed_matrix.soap_flops_by_precision(shapes, tf32, cuda) == {
        "tf32": regular + rotation + refresh - fp16,
        "fp16": fp16,
    }
    assert speed_matrix.soap_flops_by_precision(shapes, tf32, cpu) == {
        "fp32": regular + rotation + refresh
    }
    assert speed_matrix.soap_flops_by_precision(shapes, hp, cpu) == {
        "bf16": regular + rotation,
        "tf32": refresh,
    }


def test_matmul_rate_is_a_positive_rate_and_restores_the_tf32_switch():
    """``matmul_rate`` returns a finite positive FLOP/s at each precision and leaves torch's
    global TF32 switch as it found it (it flips it for the ``"tf32"`` measurement)."""
    import math

    from optimkit.lab.speed_matrix import matmul_rate

    saved = torch.backends.cuda.matmul.allow_tf32
    for precision in ("fp32", "tf32", "bf16"):
        rate = matmul_rate(torch.device("cpu"), precision, size=64)
        assert math.isfinite(rate) and rate > 0
        assert torch.backends.cuda.matmul.allow_tf32 == saved
