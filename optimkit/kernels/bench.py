"""Benchmark of the fused optimizer step against torch's fused and foreach AdamW.

    python -m optimkit.kernels.bench --out fused-bench.json            # on a CUDA machine
    TRITON_INTERPRET=1 python -m optimkit.kernels.bench --tiny --out x.json   # CPU smoke run

Everything is measured in one process, on two parameter lists:

* ``transformer``: 12 layers of four 2048x2048 and three 5504x2048 fp32 matrices (0.61e9
  parameters; ``--scale`` shrinks both dimensions by ``sqrt(scale)``);
* ``small``: 4,096 vectors of 256..8,192 elements (launch and host overhead dominate).

For each optimizer: milliseconds per ``step()`` (CUDA events around ``--steps`` steps, after two
warm-up steps; gradients fixed), the bytes an ideal step moves per parameter (param read and
write, grad read, each state buffer read and written), the bandwidth that implies as a share of
the copy bandwidth measured in the same process (``dst.copy_(src)``, read + write), the ratio of
step time to torch's fused AdamW, the first step's wall time (kernel compilation included; a
fresh Triton cache is used unless ``--warm-cache``), the peak memory allocated during a step
above what was allocated before it (params, grads and state), and whether changing ``lr``
compiled anything. ``check`` compares each fused optimizer with its reference path after ten
steps on mixed shapes. Results go to ``--out`` as JSON and to stdout as a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["main"]

#: hyperparameters used for some optimizers (momentum gives SGD state); every optimizer with a
#: fused path is benchmarked by default, the others with their defaults.
OPTIMKIT = {
    "Adam": {},
    "AdamW": {},
    "AMSGrad": {},
    "AdaMax": {},
    "SGD": {"momentum": 0.9},
    "SGDW": {"momentum": 0.9, "weight_decay": 1e-4},
    "Lion": {"weight_decay": 0.1},
    "RMSprop": {"momentum": 0.9},
    "AdaGrad": {},
    "RAdam": {},
    "ADOPT": {},
    "AdaMod": {},
    "Grams": {},
    "AdaBound": {},
    "AMSBound": {},
    "Adan": {},
    "AdaBelief": {},
}


def _round64(x: float) -> int:
    return max(64, int(round(x / 64)) * 64)


def transformer_shapes(scale: float = 1.0, tiny: bool = False) -> list[tuple[int, ...]]:
    """12 layers x (4 attention matrices d x d, 3 MLP matrices f x d)."""
    if tiny:
        d, f, layers = 32, 48, 2
    else:
        d, f, layers = _round64(2048 * math.sqrt(scale)), _round64(5504 * math.sqrt(scale)), 12
    return [(d, d)] * 4 * layers + [(f, d)] * 3 * layers


def small_shapes(count: int = 4096, tiny: bool = False) -> list[tuple[int, ...]]:
    """``count`` vectors of 256..8192 elements (deterministic)."""
    gen = torch.Generator().manual_seed(0)
    if tiny:
        count, high = 16, 200
        sizes = torch.randint(1, high, (count,), generator=gen)
    else:
        sizes = torch.randint(256, 8193, (count,), generator=gen)
    return [(int(n),) for n in sizes]


def fused_bytes_per_param(cls: type, hp: dict[str, Any]) -> int:
    """Bytes per fp32 parameter a fused step of ``cls`` must move: parameter read and
    written, gradient read, each parameter-shaped state buffer read and written, and, for a
    rule with a reduction pass, that pass's reads (parameter, gradient and the state buffers
    its ``stats`` takes)."""
    from optimkit.kernels.multi_tensor import _signature
    from optimkit.kernels.registry import rule_for
    from optimkit.optimizers._group import GroupNormOptimizer

    record = rule_for(cls)
    if record is not None and record.columns is not None:  # views of the buffers
        buffers = list(record.state)
    else:
        buffers = [b for b in cls.state_buffers(hp) if record is None or b in record.state]
    nbytes = 12 + 8 * len(buffers)
    if issubclass(cls, GroupNormOptimizer) and cls.needs_group_norms(hp):
        nbytes += 4  # the engine's pass over the gradients for the group's norms
    chain = record.reduction.chain() if record is not None and record.reduction else []
    for level, reduction in enumerate(chain, start=1):
        if not reduction.runs(hp):
            continue
        used = _used_arguments(reduction.stats)  # loads of unused ones are compiled out
        stats_states = [s for s in _signature(record, stats=level).states if s in used]
        reads = ["param", "grad", *(b for b in buffers if b in stats_states)]
        if hp.get("weight_decay", 0) != 0 and cls.weight_decay_mode in ("coupled", "hyper"):
            used = used | {"param"}  # the coupled decay term, added before stats
        nbytes += 4 * len([name for name in reads if name in used])
    return nbytes


def _used_arguments(jitted: Any) -> set[str]:
    """The arguments a ``@triton.jit`` function's body refers to."""
    import inspect
    import re

    fn = getattr(jitted, "fn", jitted)
    source = inspect.getsource(fn)
    body = source.split(":", 1)[1] if ")" not in source else source.split(")", 1)[1]
    names = inspect.signature(fn).parameters
    return {n for n in names if re.search(rf"\b{n}\b", body)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """CUDA events on a GPU, perf_counter on the CPU; milliseconds."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _Timer:
        _sync(self.device)
        if self.device.type == "cuda":
            self.start = torch.cuda.Event(enable_timing=True)
            self.end = torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.end.record()
            torch.cuda.synchronize(self.device)
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 20) -> float:
    """Bytes per second of ``dst.copy_(src)``, counting bytes read and written."""
    n = nbytes // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    with _Timer(device) as t:
        for _ in range(repeats):
            dst.copy_(src)
    del src, dst
    return 2 * n * 4 * repeats / (t.ms / 1e3)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if isinstance(v, torch.Tensor) and v.dim() > 0
    )


def _compiled() -> int | None:
    try:
        from optimkit.kernels.multi_tensor import compiled_variants

        return compiled_variants()
    except Exception:
        return None


def measure(
    label: str,
    make: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    params: list[torch.Tensor],
    bytes_per_param: int,
    steps: int,
    device: torch.device,
    copy_bw: float,
    fused_optimkit: bool,
) -> dict[str, Any]:
    """Time one optimizer on one parameter list (see the module docstring)."""
    n = sum(p.numel() for p in params)
    row: dict[str, Any] = {"optimizer": label, "bytes_per_param": bytes_per_param}
    opt = None
    try:
        _sync(device)
        t0 = time.perf_counter()
        opt = make(params)
        opt.step()
        _sync(device)
        row["first_step_s"] = round(time.perf_counter() - t0, 3)
        for _ in range(2):
            opt.step()
        row["state_MiB"] = round(_state_bytes(opt) / 2**20, 2)
        if device.type == "cuda":
            _sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        with _Timer(device) as t:
            for _ in range(steps):
                opt.step()
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - before
            row["peak_above_state_MiB"] = round(peak / 2**20, 3)
        ms = t.ms / steps
        row["ms_per_step"] = round(ms, 4)
        achieved = bytes_per_param * n / (ms / 1e3)
        row["achieved_GBps"] = round(achieved / 1e9, 1)
        row["share_of_copy_bw"] = round(achieved / copy_bw, 3)
        if fused_optimkit:
            compiled = _compiled()
            for group in opt.param_groups:  # what an LR scheduler does
                group["lr"] = group["lr"] * 0.5
            with _Timer(device) as t:
                opt.step()
            row["step_after_lr_change_ms"] = round(t.ms, 4)
            after = _compiled()
            row["compiled_variants"] = after
            if compiled is not None and after is not None and device.type == "cuda":
                row["recompiled_after_lr_change"] = after != compiled
    except Exception as error:  # keep going: one failure must not lose the whole run
        row["error"] = f"{type(error).__name__}: {error}"
        row["traceback"] = traceback.format_exc(limit=6)
    finally:
        del opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _make_params(shapes, device, dtype=torch.float32, seed=0) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for shape in shapes:
        p = torch.empty(shape, device=device, dtype=dtype)
        p.normal_(0, 0.02, generator=gen)
        p.requires_grad_()
        p.grad = torch.empty_like(p).normal_(0, 1e-3, generator=gen)
        params.append(p)
    return params


def check(device: torch.device, names: list[str], tiny: bool) -> list[dict[str, Any]]:
    """Fused vs reference after 10 steps on mixed shapes (several chunks, masked tails)."""
    import optimkit

    shapes = [(), (7,), (5, 3), (4, 3, 3, 3)]
    if not tiny:
        shapes += [(257, 129), (65537,), (300, 1000)]
    rows = []
    for name in names:
        hp = OPTIMKIT.get(name, {})
        results = []
        try:
            for impl in ("reference", "fused"):
                params = _make_params(shapes, device, seed=1)
                opt = optimkit.create(name, params, impl=impl, lr=1e-2, **hp)
                for s in range(10):
                    gen = torch.Generator(device=device).manual_seed(100 + s)
                    for p in params:
                        p.grad = torch.randn(p.shape, device=device, generator=gen)
                    opt.step()
                results.append(params)
            err = max(
                ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                for a, b in zip(*[[p.detach().double() for p in r] for r in results[::-1]])
            )
            rows.append({"optimizer": name, "max_rel_err": err})
        except Exception as error:
            rows.append({"optimizer": name, "error": f"{type(error).__name__}: {error}"})
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m optimkit.kernels.bench", description=__doc__)
    parser.add_argument("--out", default="fused-bench.json", help="JSON file to write")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the 0.6B list")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--small-count", type=int, default=4096, help="tensors in 'small'")
    parser.add_argument(
        "--optimizers", default="all", help="optimkit names with a fused path, or 'all'"
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run (interpreter)")
    parser.add_argument("--warm-cache", action="store_true", help="keep Triton's disk cache")
    args = parser.parse_args(argv)

    if args.tiny:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
        steps = 2
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device; use --tiny for the CPU smoke run")
        device = torch.device("cuda", torch.cuda.current_device())
        steps = args.steps
        if not args.warm_cache:  # cold compilation, as a user's first run sees it
            os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="optimkit-triton-")

    import optimkit
    from optimkit import kernels

    fused = [n for n in optimkit.available() if "fused" in optimkit.info(n).impls]
    names = fused if args.optimizers == "all" else [n for n in args.optimizers.split(",") if n]
    unknown = [n for n in names if n not in fused]
    if unknown:
        parser.error(f"no fused path for {unknown}; choose from {', '.join(fused)}")
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "python": platform.python_version(),
        "interpreter": kernels.interpreting(),
        "config": dict(kernels.config),
    }
    copy_bw = copy_bandwidth(device, (16 << 20) if args.tiny else (2 << 30))
    info["copy_bandwidth_GBps"] = round(copy_bw / 1e9, 1)
    print(f"# {info['device']}: copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)

    workloads = {
        "transformer": transformer_shapes(args.scale, args.tiny),
        "small": small_shapes(args.small_count, args.tiny),
    }
    results: list[dict[str, Any]] = []
    info["workloads"] = {}
    for workload, shapes in workloads.items():
        params = _make_params(shapes, device)
        n = sum(p.numel() for p in params)
        info["workloads"][workload] = {"tensors": len(params), "params": n}
        print(f"# {workload}: {len(params)} tensors, {n / 1e6:.1f}M params", flush=True)
        candidates: list[tuple[str, Callable, int, bool]] = [
            ("torch fused AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True), 28, 0),
            ("torch foreach AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True), 28, 0),
        ]
        if "AdamW" in names:
            candidates.append(
                ("optimkit foreach AdamW", lambda ps: optimkit.AdamW(ps, impl="foreach"), 28, 0)
            )
        for name in names:
            hp = OPTIMKIT.get(name, {})
            cls = optimkit.info(name).cls
            make = (lambda c, h: lambda ps: c(ps, impl="fused", lr=1e-4, **h))(cls, hp)
            nbytes = fused_bytes_per_param(cls, {**optimkit.info(name).defaults, **hp})
            candidates.append((f"optimkit {name}", make, nbytes, 1))
        reference_ms = None
        for label, make, nbytes, fused in candidates:
            row = measure(label, make, params, nbytes, steps, device, copy_bw, bool(fused))
            row["workload"] = workload
            if label == "torch fused AdamW":
                reference_ms = row.get("ms_per_step")
            if reference_ms and "ms_per_step" in row:
                row["ratio_to_torch_fused_AdamW"] = round(row["ms_per_step"] / reference_ms, 3)
            results.append(row)
            _print_row(row)
        del params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report = {**info, "results": results, "check": check(device, names, args.tiny)}
    for row in report["check"]:
        print(f"# check {row}", flush=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"# wrote {args.out}", flush=True)
    return report


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        print(f"{row['workload']:12s} {row['optimizer']:24s} ERROR {row['error']}", flush=True)
        return
    print(
        f"{row['workload']:12s} {row['optimizer']:24s} {row['ms_per_step']:9.3f} ms "
        f"{row['achieved_GBps']:8.1f} GB/s ({row['share_of_copy_bw']:.0%} of copy) "
        f"x{row.get('ratio_to_torch_fused_AdamW', float('nan')):.2f} vs torch fused, "
        f"first step {row['first_step_s']:.2f} s, peak +{row.get('peak_above_state_MiB', 0)} MiB",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
