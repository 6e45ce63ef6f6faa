"""`optimkit bench speed-matrix`: step time of the matrix (shape-aware) optimizers against the
matmul work they must do, measured in one run.

An elementwise step is memory-bound; SOAP, Shampoo and Muon are compute-bound: their floor is
the matrix-multiply work of a step (statistics, rotations or Newton-Schulz iterations, and the
refreshes amortised over their frequency) at the GPU's matmul rate, measured here in the same
process for the precision each uses. Factorisations (``eigh``, QR) do not run at the matmul
rate; their matmul-equivalent FLOPs (4/3 n^3 for a QR) are counted, ``eigh`` is not (it is in
the time but not in the floor), so the ratio time / floor is an upper bound on the overhead.
Every step gets a fresh random gradient (drawn outside the timed region), so that the
statistics are full-rank as in training; ``--spectrum decaying`` draws them with a decaying
spectrum in a fixed basis, as training's are, which is what makes warm-started refreshes ill
conditioned (see :class:`GradientSource`). The timed period (``--steps``, one refresh
period) follows an untimed one (``--warmup``), so that the refresh it times is a training
run's usual one, not the first, which allocates its buffers and loads its kernels.
``refresh_counts`` in the JSON output report the refresh factorisations that fell back from
Gram-Schmidt QR to CholeskyQR2 (``cholesky_fallbacks``) and to Householder's
(``householder_fallbacks``).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import optimkit
from optimkit import linalg
from optimkit.lab.speed import _make_params, _sync, llama_shapes, shapes_for
from optimkit.optimizers.soap import refresh_precision


def matmul_rate(device: torch.device, precision: str, size: int = 4096) -> float:
    """Measured FLOP/s of a square matmul at ``precision``: ``"fp32"`` (TF32 off), ``"tf32"``
    (fp32 tensors, TF32 allowed), ``"bf16"`` or ``"fp16"``. On CUDA: the best of 5 timings of
    10 back-to-back products each, after 5 untimed ones (one timed product of a few hundred
    microseconds, with its launch and a cold clock, read a bf16 rate 16% below a second
    measurement's on the same H100, which made the floors and the training step it scales
    look slower than they are); elsewhere the best of 5 single products."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    products = 10 if device.type == "cuda" else 1
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        for _ in range(5 if device.type == "cuda" else 1):
            a @ b
        best = math.inf
        for _ in range(5):
            _sync(device)
            start = time.perf_counter()
            for _ in range(products):
                a @ b
            _sync(device)
            best = min(best, (time.perf_counter() - start) / products)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return 2 * size**3 / best


def _matrices(shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, int]]:
    return [(s[0], math.prod(s[1:])) for s in shapes if len(s) >= 2]


def soap_flop_parts(shapes, frequency: int, max_dim: int = 10000) -> tuple[float, float, float]:
    """Per step, ``(regular, refresh, rotation)``: the regular step's products, both
    statistics as symmetric products (m^2 n + m n^2: the half on and above the diagonal,
    which is all a symmetric product needs), the gradient into the eigenbasis and the update
    back (2 x (2 m^2 n + 2 m n^2)); the refresh's every ``frequency`` steps, amortised, per
    side of size k: one power iteration (2 k^3) and a QR's Q factor (2 k^3: one Gram-Schmidt
    pass, the least any QR takes to form Q; Householder's R and Q take 8/3 k^3); and, also
    every ``frequency`` steps, the momentum's rotation to the new basis, the cheaper of the
    two ways: back by the old basis and into the new one (2 x 2 k m n), or one product by
    Q_new^T Q_old after forming it (2 k m n + 2 k^3)."""
    regular = refresh = rotation = 0.0
    for m, n in _matrices(shapes):
        sides = [k for k in (m, n) if k <= max_dim]
        rotate = sum(2 * k * m * n for k in sides)  # one side: 2 k * (m n)
        regular += 2.5 * rotate  # statistics (half a rotation), into and out of the eigenbasis
        for k in sides:
            one_side = 2 * k * m * n
            refresh += (2 + 2) * k**3 / frequency
            rotation += (one_side + min(one_side, 2 * k**3)) / frequency
    return regular, refresh, rotation


def soap_flops(shapes, frequency: int, max_dim: int = 10000) -> float:
    """Per step: :func:`soap_flop_parts`, the regular step's and the refresh's together."""
    return sum(soap_flop_parts(shapes, frequency, max_dim))


def soap_fp16_flops(shapes, hp: dict[str, Any], device: torch.device) -> float:
    """The part of :func:`soap_flops` that optimkit's SOAP runs as fp16 products (floored at
    the fp16 rate): the QR's Q (2 k^3 a refresh) of each preconditioned side whose block
    Gram-Schmidt projections are fp16 (:func:`optimkit.linalg.half_projections_at` at the
    refresh's precision, :func:`optimkit.optimizers.soap.refresh_precision`: at TF32 on
    CUDA, from ``linalg.GRAM_SCHMIDT_WIDE`` columns on); 0 for other QR methods."""
    if hp.get("qr_method") != "gram_schmidt":
        return 0.0
    precision = refresh_precision(hp.get("matmul_precision", "fp32"))
    total = 0.0
    for m, n in _matrices(shapes):
        for k in (m, n):
            if k <= hp["max_precond_dim"] and linalg.half_projections_at(k, device, precision):
                total += 2 * k**3
    return total / hp["precondition_frequency"]


def soap_flops_by_precision(shapes, hp: dict[str, Any], device: torch.device) -> dict[str, float]:
    """SOAP's FLOPs per step by the precision its products run at: the regular step's and
    the momentum's rotation at a refresh at ``matmul_precision`` (on the device:
    :func:`precision_of`), the refresh's power iteration and QR at
    :func:`~optimkit.optimizers.soap.refresh_precision` of it, but for
    :func:`soap_fp16_flops` at fp16."""
    regular, refresh, rotation = soap_flop_parts(
        shapes, hp["precondition_frequency"], hp["max_precond_dim"]
    )
    fp16 = soap_fp16_flops(shapes, hp, device)
    precision = precision_of("SOAP", hp, device)
    parts: dict[str, float] = {precision: regular + rotation}
    later = refresh_precision(precision)
    parts[later] = parts.get(later, 0.0) + refresh - fp16
    if fp16:
        parts["fp16"] = parts.get("fp16", 0.0) + fp16
    return parts


def shampoo_flops(shapes, block: int, frequency: int) -> float:
    """Per step and block (a x b): statistics 2 a^2 b + 2 a b^2 and preconditioning
    2 a^2 b + 2 a b^2. The inverse roots are not in this count: with
    ``root_method="newton"`` the products its iterations ran during the timed steps are added
    by :func:`main` (``refresh_counts["root_matmul_flops"]``); ``eigh`` is not counted."""
    total = 0.0
    for m, n in _matrices(shapes):
        for a in _pieces(m, block):
            for b in _pieces(n, block):
                total += 2 * (2 * a * a * b + 2 * a * b * b)
    return total


def _pieces(size: int, block: int) -> list[int]:
    return [block] * (size // block) + ([size % block] if size % block else [])


def muon_flops(shapes, ns_steps: int = 5) -> float:
    """Newton-Schulz: per iteration on a (k x l) matrix with k <= l, A = X X^T (2 k^2 l),
    B = b A + c A A (2 k^3), X = a X + B X (2 k^2 l)."""
    total = 0.0
    for m, n in _matrices(shapes):
        k, l = min(m, n), max(m, n)
        total += ns_steps * (4 * k * k * l + 2 * k**3)
    return total


#: name -> (hyperparameters, flops(shapes, hp)); the precision of the matmuls comes from the
#: hyperparameters (``matmul_precision`` for SOAP and Shampoo, ``ns_dtype`` for Muon).
DEFAULT_OPTIMIZERS = "SOAP(matmul_precision='bf16'),Shampoo(root_method='newton'),Muon"
"""What ``optimkit bench speed-matrix`` times without ``--optimizers``: SOAP with bf16
products (fp32, the authors' precision and the class default, takes the fp32 matmul rate: 51.7
TFLOP/s against 785.5 at bf16 on an H100), Shampoo with the authors' Newton roots (its default
``eigh`` is about 60x slower on a GPU), and Muon."""

CANDIDATES = {
    "SOAP": (
        dict(precondition_frequency=10),
        lambda shapes, hp: soap_flops(shapes, hp["precondition_frequency"], hp["max_precond_dim"]),
    ),
    "Shampoo": (
        dict(preconditioning_compute_steps=10),
        lambda shapes, hp: shampoo_flops(
            shapes, hp["block_size"], hp["preconditioning_compute_steps"]
        ),
    ),
    "Muon": ({}, lambda shapes, hp: muon_flops(shapes, hp["ns_steps"])),
}

#: tokens of the "realistic batch" against which the optimizer's share of a training step is
#: reported (the issue's 0.5 M tokens), for a step of 6 N FLOPs per token at the bf16 rate.
TRAINING_TOKENS = 500_000


def precision_of(name: str, hp: dict[str, Any], device: torch.device) -> str:
    """The matmul precision a configured optimizer runs at: "fp32", "tf32" or "bf16"."""
    if name == "Muon":
        choice = hp.get("ns_dtype", "auto")
        if choice == "auto":
            return "bf16" if device.type == "cuda" else "fp32"
        return {"bfloat16": "bf16"}.get(choice, "fp32")
    precision = hp.get("matmul_precision", "fp32")
    return "fp32" if device.type != "cuda" and precision == "tf32" else precision


#: how the timed steps' gradients are drawn (``--spectrum``).
SPECTRA = ("isotropic", "decaying")

#: decades spanned by the singular values of a "decaying" gradient's row and column factors.
DECAY_DECADES = 3.0


class GradientSource:
    r"""A fresh gradient for every parameter before each step, drawn on its device outside
    the timed region: a gradient repeated step after step would make rank-deficient
    statistics (:math:`GG^\top` of one 5504 x 2048 gradient has rank 2048), which no training
    run has.

    ``"isotropic"``: i.i.d. normal entries (std 1e-3); every statistic is then nearly a
    multiple of the identity, its eigenbasis arbitrary and a warm-started refresh well
    conditioned. ``"decaying"``: :math:`G = 10^{-3} L Z R^\top` with :math:`Z` i.i.d. normal
    and, per side size :math:`k`, a fixed :math:`L = U\,\mathrm{diag}(d)` (:math:`U`
    random orthogonal, :math:`d_i` log-spaced from 1 down to
    :math:`10^{-\text{DECAY\_DECADES}}`), so the statistics have a decaying spectrum
    (condition :math:`\approx 10^{6}`) in a fixed basis plus sampling noise, as training
    gradients' do; the warm-started power-iteration products :math:`AQ` are then ill
    conditioned in their small directions, as in training, which is what makes Cholesky QR
    fall back to Householder's."""

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        spectrum: str,
        device: torch.device,
        seed: int = 1,
    ) -> None:
        if spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
        self.params = list(params)
        self.spectrum = spectrum
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.factors: dict[int, torch.Tensor] = {}
        if spectrum == "decaying":
            for p in self.params:
                if p.dim() >= 2:
                    for k in (p.shape[0], math.prod(p.shape[1:])):
                        if k not in self.factors:
                            self.factors[k] = self._factor(k, device)

    def _factor(self, size: int, device: torch.device) -> torch.Tensor:
        gaussian = torch.randn(size, size, generator=self.generator, device=device)
        orthogonal, _ = torch.linalg.qr(gaussian)
        decay = torch.logspace(0.0, -DECAY_DECADES, size, device=device)
        return orthogonal * decay  # U diag(d)

    def __call__(self) -> None:
        """Writes the next gradient into every parameter's ``.grad``."""
        for p in self.params:
            p.grad.normal_(0.0, 1e-3, generator=self.generator)
            if self.spectrum == "decaying" and p.dim() >= 2:
                m, n = p.shape[0], math.prod(p.shape[1:])
                grad = p.grad.view(m, n)
                grad.copy_(self.factors[m] @ grad @ self.factors[n].T)


def _time(
    opt: torch.optim.Optimizer,
    device: torch.device,
    steps: int,
    params: Sequence[torch.Tensor] = (),
    warmup: int = 0,
    spectrum: str = "isotropic",
) -> tuple[float, list]:
    """``(first step's seconds, the timed steps' seconds)``: after the first step,
    ``warmup`` untimed steps (with one refresh period of them, the timed refresh is not the
    first one, which allocates its buffers and loads its kernels), then ``steps`` timed ones.
    ``params`` get new gradients (:class:`GradientSource` of ``spectrum``) before every
    step."""
    new_gradients = GradientSource(params, spectrum, device)
    new_gradients()
    _sync(device)
    start = time.perf_counter()
    opt.step()  # initialises statistics and bases
    _sync(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        new_gradients()
        opt.step()
    _sync(device)
    counts = getattr(opt, "refresh_counts", None)  # optimkit's matrix optimizers only
    if counts is not None:
        counts.clear()  # count the timed steps only
    times = []
    for _ in range(steps):
        new_gradients()
        _sync(device)
        start = time.perf_counter()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return first, times


def _peers(device: torch.device) -> dict[str, Any]:
    """Other libraries' implementations to time on the same list, where installed (a peer
    that cannot be imported is reported, not silently left out)."""
    peers: dict[str, Any] = {}
    try:
        import pytorch_optimizer
    except ImportError as error:
        print(f"--peers: pytorch_optimizer cannot be imported ({error}); no peer timed")
        return peers
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as package_version

    try:
        version = package_version("pytorch_optimizer")
    except PackageNotFoundError:  # imported from a path, not installed
        version = getattr(pytorch_optimizer, "__version__", "?")
    peers[f"pytorch_optimizer {version} SOAP"] = (
        lambda ps: pytorch_optimizer.SOAP(ps, precondition_frequency=10),
        "SOAP",
    )
    return peers


#: refresh_counts keys of the QR fallbacks the table prints, and their names.
_FALLBACKS = {"cholesky_fallbacks": "CholeskyQR2", "householder_fallbacks": "Householder"}


def _release(device: torch.device) -> None:
    """Free what the previous candidate left (its cyclic garbage and the CUDA allocator's
    cached blocks), so each one starts from the same allocator state and a garbage
    collection of another's objects does not land in its timed steps."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def main(argv: Sequence[str] | None = None) -> int:
    from optimkit.lab.search import parse_optimizer_list

    parser = argparse.ArgumentParser(prog="optimkit bench speed-matrix", description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--size",
        choices=("gpu", "tiny"),
        default=None,
        help="gpu: the 0.6 B transformer list (default on CUDA); tiny: tests",
    )
    parser.add_argument(
        "--optimizers",
        default=DEFAULT_OPTIMIZERS,
        help="comma-separated NAME or NAME(key=value, ...) among "
        + ", ".join(CANDIDATES)
        + f" (default: {DEFAULT_OPTIMIZERS}, each one's configuration for a GPU)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps (one refresh period)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=None,
        help="untimed steps after the first (default: --steps, one refresh period)",
    )
    parser.add_argument(
        "--spectrum",
        choices=SPECTRA,
        default="isotropic",
        help="the gradients: isotropic (i.i.d. normal) or decaying (a fixed basis and a "
        "spectrum over 3 decades per side, as training's; see GradientSource)",
    )
    parser.add_argument(
        "--peers", action="store_true", help="also time pytorch_optimizer's SOAP, if installed"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    warmup = args.steps if args.warmup is None else args.warmup
    if warmup < 0:
        parser.error(f"--warmup must be 0 or more, got {warmup}")
    device = torch.device(args.device)
    size = args.size or ("gpu" if device.type == "cuda" else "tiny")
    shapes = llama_shapes() if size == "gpu" else shapes_for("tiny")
    numel = sum(math.prod(s) for s in shapes)
    try:
        specs = parse_optimizer_list(args.optimizers)
    except ValueError as error:
        parser.error(str(error))
    unknown = [s.name for s in specs if s.name not in CANDIDATES]
    if unknown:
        parser.error(f"unknown optimizer(s) {unknown}; choose from {', '.join(CANDIDATES)}")
    precisions = ("fp32", "tf32", "bf16", "fp16") if device.type == "cuda" else ("fp32", "bf16")
    rates = {p: matmul_rate(device, p) for p in precisions}
    rates.setdefault("tf32", rates["fp32"])
    rates.setdefault("fp16", rates["bf16"])
    training_ms = 1e3 * 6 * numel * TRAINING_TOKENS / rates["bf16"]
    print(
        f"device {device}, {len(shapes)} tensors, {numel / 1e6:.1f} M parameters; matmul rate "
        + ", ".join(f"{p} {r / 1e12:.1f}" for p, r in rates.items())
        + f" TFLOP/s; a {TRAINING_TOKENS / 1e6:g} M-token training step (6 N FLOPs per token "
        f"at the bf16 rate) takes at least {training_ms:.0f} ms"
    )

    params = _make_params(shapes, device)
    baseline = torch.optim.AdamW(params, fused=device.type == "cuda")
    _, times = _time(baseline, device, args.steps, params, warmup, args.spectrum)
    adamw_ms = 1e3 * sum(times) / len(times)
    del baseline, params
    _release(device)

    runs: list[tuple[str, str, Any, dict[str, Any]]] = []
    for spec in specs:
        base, _ = CANDIDATES[spec.name]
        hp = {**base, **spec.fixed_hyperparams}
        label = spec.name if not spec.fixed else spec.label
        runs.append(
            (
                label,
                spec.name,
                (lambda n, h: lambda ps: optimkit.create(n, ps, **h))(spec.name, hp),
                hp,
            )
        )
    if args.peers:
        for label, (make, algorithm) in _peers(device).items():
            runs.append((label, algorithm, make, dict(CANDIDATES[algorithm][0])))

    rows = []
    for label, algorithm, make, hp in runs:
        params = _make_params(shapes, device)
        try:
            opt = make(params)
            first, times = _time(opt, device, args.steps, params, warmup, args.spectrum)
        except Exception as error:  # a peer may fail on this list: report it, go on
            rows.append({"optimizer": label, "error": f"{type(error).__name__}: {error}"})
            print(f"{label}: {rows[-1]['error']}")
            del params
            _release(device)
            continue
        ms = 1e3 * sum(times) / len(times)  # the mean covers one refresh period
        full = {**optimkit.info(algorithm).defaults, **hp}
        precision = precision_of(algorithm, full, device)
        flops = CANDIDATES[algorithm][1](shapes, full)
        counts = dict(getattr(opt, "refresh_counts", {}))
        flops += counts.get("root_matmul_flops", 0.0) / len(times)  # measured, amortised
        if algorithm == "SOAP":
            parts = soap_flops_by_precision(shapes, full, device)
        else:
            parts = {precision: flops}
        floor_ms = 1e3 * sum(part / rates[name] for name, part in parts.items())
        rows.append(
            {
                "optimizer": label,
                "hyperparameters": hp,
                "matmul_precision": precision,
                "ms_per_step": ms,
                "median_ms": 1e3 * statistics.median(times),
                "slowest_ms": 1e3 * max(times),
                "first_step_s": first,
                "flops_per_step": flops,
                "flops_by_precision": parts,
                "floor_ms": floor_ms,
                "vs_floor": ms / floor_ms if floor_ms else None,
                "vs_torch_fused_adamw": ms / adamw_ms,
                "share_of_training_step": ms / training_ms,
                "refresh_counts": counts,
            }
        )
        mixed = ", ".join(f"{part / 1e12:.2f} at {name}" for name, part in parts.items())
        at = precision if len(parts) == 1 else f"{precision} ({mixed})"
        print(
            f"{label:<34} {ms:9.1f} ms/step (median {rows[-1]['median_ms']:.1f}, slowest "
            f"{rows[-1]['slowest_ms']:.1f}, first step "
            f"{first:.1f} s)  {flops / 1e12:7.2f} TFLOP/step  floor {floor_ms:8.1f} ms at "
            f"{at}  {_ratio(rows[-1]['vs_floor'])} floor  "
            f"{ms / adamw_ms:.1f}x torch AdamW  {100 * ms / training_ms:.1f}% of a training step"
            + "".join(
                f"  {counts[key]} {name} fallbacks"
                for key, name in _FALLBACKS.items()
                if counts.get(key)
            )
        )
        del opt, params
        _release(device)
    print(f"torch AdamW ({'fused' if device.type == 'cuda' else 'foreach'}): {adamw_ms:.2f} ms")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "device": torch.cuda.get_device_name(device)
                    if device.type == "cuda"
                    else str(device),
                    "parameters": numel,
                    "torch": torch.__version__,
                    "matmul_flops_per_s": rates,
                    "training_step_ms": training_ms,
                    "torch_adamw_ms": adamw_ms,
                    "timed_steps": args.steps,
                    "warmup_steps": warmup,
                    "spectrum": args.spectrum,
                    "results": rows,
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
