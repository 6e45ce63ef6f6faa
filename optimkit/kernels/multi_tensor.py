"""Multi-tensor launch machinery: one Triton launch updates a whole bucket of tensors.

Layout. For a bucket of ``n`` tensors we keep, on the tensors' device,

* a pointer table ``int64[n, 2 + k]``: per tensor the addresses of the parameter and of its
  ``k`` state buffers, then its element count;
* a gradient table ``int64[n]``: the gradients' addresses (these change whenever gradients are
  re-allocated, e.g. after ``zero_grad(set_to_none=True)``; re-uploaded only when they do);
* a chunk table ``int64[c, 2]``: one row (tensor index, chunk index) per program.

Program ``i`` handles elements ``[chunk * CHUNK, min((chunk + 1) * CHUNK, numel))`` of its
tensor: full ``BLOCK``-wide slices without a mask (vectorised loads and stores), then one masked
tail. Every tensor is read and written once, in its own dtype, with fp32 arithmetic; the only
workspace is the three small tables. The tables are cached on the optimizer and keyed by the
addresses and sizes they describe, so a steady-state step does a pointer comparison and one
launch per bucket.

The kernel of each rule is generated once from a fixed template (below) around the rule: load
``param``, ``grad`` and the state; unscale (GradScaler), ``maximize`` and weight decay exactly as
the engine's ``_prepare_grad`` does; call the rule; store (optionally rounding bf16 parameters
stochastically). Hyperparameters are runtime fp32 arguments; only dtypes, flags and the launch
geometry are compile-time constants.
"""

from __future__ import annotations

import inspect
import itertools
import linecache
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from optimkit.engine import TensorList
from optimkit.kernels import config, interpreting
from optimkit.kernels.registry import FusedRule, ReductionInputs, rule_for

__all__ = ["launch", "kernel_for", "supported_dtypes", "compiled_variants"]

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_WD_MODES = {None: 0, "coupled": 1, "decoupled": 2}
_MAX_PLANS = 64
_PLAIN = (Tensor, torch.nn.Parameter)


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """Parameter, gradient and state dtypes the fused kernels take (fp32 arithmetic)."""
    return tuple(_TL_DTYPES)


# ------------------------------------------------------------------------------------------
# device-side helpers shared by every generated kernel
# ------------------------------------------------------------------------------------------
@triton.jit
def _tensor_ptr(addr_ptr, start, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The typed pointer to element ``start`` of the tensor whose address is at ``addr_ptr``."""
    addr = tl.load(addr_ptr)
    if ALIGNED:
        addr = tl.multiple_of(addr, 16)
    return addr.to(tl.pointer_type(DTYPE)) + start


@triton.jit
def _stochastic_bf16(x, seed, offsets):
    """Round fp32 ``x`` to a bf16-representable value, up or down with probability given by
    the distance (add 16 random bits below the bf16 mantissa, then truncate)."""
    bits = x.to(tl.uint32, bitcast=True)
    noise = tl.randint(seed, offsets).to(tl.uint32, bitcast=True) & 0xFFFF
    rounded = ((bits + noise) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x == x, rounded, x)


@triton.jit
def _to_dtype(x, DTYPE: tl.constexpr):
    """``x.to(DTYPE)`` rounding to nearest even; for bf16 done in integer arithmetic, since
    Triton's CPU interpreter truncates fp32 -> bf16 while GPUs round to nearest."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (a constexpr on the left compares by value)
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x == x, bits.to(tl.float32, bitcast=True), x)
    return x.to(DTYPE)


# ------------------------------------------------------------------------------------------
# kernel generation
# ------------------------------------------------------------------------------------------
# One template for both kernels of a rule: the update (``_seed``, optional stochastic
# rounding) and the extra read-only pass of a rule with per-tensor reductions (``_partials``:
# per-chunk sums or maxima of what ``_stats`` returns). Both load and prepare alike.
_TEMPLATE = """
def {kernel}(
    _table, _grads, _chunks, _grad_scale, _sign, _weight_decay, _decay, {output},
   {tscalar_arg}{scalars}
    _CHUNK: tl.constexpr, _BLOCK: tl.constexpr, _COLS: tl.constexpr, _HAS_SCALE: tl.constexpr,
    _WD_MODE: tl.constexpr, _ALIGNED: tl.constexpr,{rounding}
    _PARAM_T: tl.constexpr, _GRAD_T: tl.constexpr,{state_types}{flags}
):
    _pid = tl.program_id(0)
    _t = tl.load(_chunks + 2 * _pid)
    _start = tl.load(_chunks + 2 * _pid + 1) * _CHUNK
    _row = _table + _t * _COLS
    _len = tl.minimum(tl.load(_row + _COLS - 1) - _start, _CHUNK).to(tl.int32)
    _param_ptr = _tensor_ptr(_row, _start, _PARAM_T, _ALIGNED)
    _grad_ptr = _tensor_ptr(_grads + _t, _start, _GRAD_T, _ALIGNED)
{state_ptrs}
{tscalar_loads}
    _inv_scale = 1.0
    if _HAS_SCALE:
        _inv_scale = 1.0 / tl.load(_grad_scale).to(tl.float32)
{acc_init}
    _full = _len // _BLOCK * _BLOCK
    for _off in range(0, _full, _BLOCK):
        _idx = _off + tl.arange(0, _BLOCK)
{body}
    if _full < _len:
        _idx = _full + tl.arange(0, _BLOCK)
        _mask = _idx < _len
{masked_body}
{acc_store}
"""

# Loads and the engine's preparation (_prepare_grad): the same in both kernels of a rule.
_PREPARE = """\
param = tl.load(_param_ptr + _idx{m}).to(tl.float32)
grad = tl.load(_grad_ptr + _idx{m}).to(tl.float32)
{state_loads}
if _HAS_SCALE:
    grad = grad * _inv_scale
grad = grad * _sign
if _WD_MODE == 1:
    grad = grad + _weight_decay * param
if _WD_MODE == 2:
    param = param * _decay
"""

_STATS_BODY = (
    _PREPARE
    + """\
{results} = _stats({arguments})
{accumulate}
"""
)

_BODY = (
    _PREPARE
    + """\
{results} = _rule({arguments})
if _ROUNDING:
    param = _stochastic_bf16(param, _seed + _t, (_start + _idx).to(tl.int32))
tl.store(_param_ptr + _idx, _to_dtype(param, _PARAM_T){m})
{state_stores}
"""
)


@dataclass(frozen=True)
class _Signature:
    """The rule's arguments, sorted by how the launcher binds them."""

    names: tuple[str, ...]
    states: tuple[str, ...]
    flags: tuple[str, ...]
    scalars: tuple[str, ...]
    tensor_scalars: tuple[str, ...] = ()


_SIGNATURES: dict[tuple[int, bool], _Signature] = {}
_KERNELS: dict[tuple[int, tuple[str, ...], bool], Any] = {}


def _chain(record: FusedRule) -> list:
    return record.reduction.chain() if record.reduction is not None else []


def _outputs_before(record: FusedRule, level: int) -> tuple[str, ...]:
    """The per-tensor scalars available at ``level``: 0 is the rule (every reduction's
    outputs), ``k >= 1`` the k-th reduction's ``stats`` (the outputs of those before it)."""
    chain = _chain(record)
    before = chain if level == 0 else chain[: level - 1]
    return tuple(name for r in before for name in r.outputs)


def _signature(record: FusedRule, stats: int = 0) -> _Signature:
    """The arguments of the rule (``stats`` 0) or of the ``stats`` of the reduction at that
    position of the chain (1 for the first)."""
    stats = int(stats)
    sig = _SIGNATURES.get((id(record), stats))
    if sig is not None:
        return sig
    tensor_scalars = _outputs_before(record, stats)
    fn = _chain(record)[stats - 1].stats if stats else record.rule
    fn = getattr(fn, "fn", fn)
    params = list(inspect.signature(fn).parameters.values())
    names = tuple(p.name for p in params)
    if names[:2] != ("param", "grad"):
        raise TypeError(f"fused rule {record.name}: the first arguments must be (param, grad, ...)")
    bad = [n for n in names if n.startswith("_")]
    if bad:
        raise TypeError(f"fused rule {record.name}: argument names may not start with '_': {bad}")
    states, flags, scalars, per_tensor = [], [], [], []
    for p in params[2:]:
        if "constexpr" in str(p.annotation):
            flags.append(p.name)
        elif p.name in record.state:
            states.append(p.name)
        elif p.name in tensor_scalars:
            per_tensor.append(p.name)
        else:
            scalars.append(p.name)
    missing = set(record.state) - set(states)
    if missing and not stats:
        raise TypeError(
            f"fused rule {record.name}: state {sorted(missing)} not among its arguments"
        )
    sig = _Signature(names, tuple(states), tuple(flags), tuple(scalars), tuple(per_tensor))
    _SIGNATURES[(id(record), stats)] = sig
    return sig


def _indent(text: str, spaces: int) -> str:
    pad = " " * spaces
    return "\n".join(pad + line if line else line for line in text.splitlines())


def _generate(record: FusedRule, present: tuple[str, ...]) -> str:
    """The source of the kernel for ``record`` with the state buffers ``present``."""
    sig = _signature(record)
    upper = {name: name.upper() for name in sig.states}
    state_ptrs = "\n".join(
        f"    _{name}_ptr = _tensor_ptr(_row + {1 + i}, _start, _{upper[name]}_T, _ALIGNED)"
        for i, name in enumerate(present)
    )
    arguments = ", ".join(n if n not in sig.states or n in present else "0.0" for n in sig.names)
    results = ", ".join(["param"] + [n if n in present else f"_unused_{n}" for n in sig.states])

    def body(masked: bool) -> str:
        m = ", mask=_mask" if masked else ""
        loads = "\n".join(f"{n} = tl.load(_{n}_ptr + _idx{m}).to(tl.float32)" for n in present)
        stores = "\n".join(
            f"tl.store(_{n}_ptr + _idx, _to_dtype({n}, _{upper[n]}_T){m})" for n in present
        )
        text = _BODY.format(
            m=m, state_loads=loads, results=results, arguments=arguments, state_stores=stores
        )
        return _indent(text, 8)

    outputs = _outputs_before(record, 0)
    tscalar_loads = _tscalar_loads(outputs)
    return _TEMPLATE.format(
        kernel=f"_fused_{record.name}",
        output="_seed",
        rounding=" _ROUNDING: tl.constexpr,",
        acc_init="",
        acc_store="",
        tscalar_arg=" _tscalars," if outputs else "",
        tscalar_loads=tscalar_loads,
        scalars="".join(f" {n}," for n in sig.scalars),
        state_types="".join(f" _{upper[n]}_T: tl.constexpr," for n in present),
        flags="".join(f" {n}: tl.constexpr," for n in sig.flags),
        state_ptrs=state_ptrs,
        body=body(False),
        masked_body=body(True),
    )


def _tscalar_loads(names: tuple[str, ...]) -> str:
    return "\n".join(
        f"    {name} = tl.load(_tscalars + _t * {len(names)} + {j})" for j, name in enumerate(names)
    )


def _generate_stats(record: FusedRule, present: tuple[str, ...], level: int) -> str:
    """The source of the reduction pass at ``level`` (1 for the first of the chain) of
    ``record`` with the state buffers ``present``."""
    sig = _signature(record, stats=level)
    reduction = _chain(record)[level - 1]
    count = reduction.count
    previous = _outputs_before(record, level)
    upper = {name: name.upper() for name in record.state}
    used = [name for name in present if name in sig.states]
    state_ptrs = "\n".join(
        f"    _{name}_ptr = _tensor_ptr(_row + {1 + present.index(name)}, _start, "
        f"_{upper[name]}_T, _ALIGNED)"
        for name in used
    )
    arguments = ", ".join(n if n not in sig.states or n in present else "0.0" for n in sig.names)
    results = ", ".join(f"_v{k}" for k in range(count))

    def body(masked: bool) -> str:
        m = ", mask=_mask" if masked else ""
        loads = "\n".join(f"{n} = tl.load(_{n}_ptr + _idx{m}).to(tl.float32)" for n in used)
        accumulate = "\n".join(_accumulate(k, reduction.kind(k), masked) for k in range(count))
        text = _STATS_BODY.format(
            m=m, state_loads=loads, results=results, arguments=arguments, accumulate=accumulate
        )
        return _indent(text, 8)

    return _TEMPLATE.format(
        kernel=f"_stats{level}_{record.name}",
        output="_partials",
        rounding="",
        tscalar_arg=" _tscalars," if previous else "",
        tscalar_loads=_tscalar_loads(previous),
        scalars="".join(f" {n}," for n in sig.scalars),
        state_types="".join(f" _{upper[n]}_T: tl.constexpr," for n in present),
        flags="".join(f" {n}: tl.constexpr," for n in sig.flags),
        state_ptrs=state_ptrs,
        acc_init="\n".join(
            f"    _acc{k} = tl.zeros([_BLOCK], dtype=tl.float32)"
            + (" - float('inf')" if reduction.kind(k) == "max" else "")
            for k in range(count)
        ),
        body=body(False),
        masked_body=body(True),
        acc_store="\n".join(
            f"    tl.store(_partials + _pid * {count} + {k}, "
            f"tl.{'max' if reduction.kind(k) == 'max' else 'sum'}(_acc{k}, axis=0))"
            for k in range(count)
        ),
    )


def _accumulate(k: int, kind: str, masked: bool) -> str:
    """The line adding block values ``_v{k}`` into accumulator ``_acc{k}``."""
    value = f"_v{k}"
    if kind == "max":
        if masked:
            value = f"tl.where(_mask, {value}, -float('inf'))"
        return f"_acc{k} = tl.maximum(_acc{k}, {value})"
    if masked:
        value = f"tl.where(_mask, {value}, 0.0)"
    return f"_acc{k} += {value}"


def kernel_for(record: FusedRule, present: tuple[str, ...], stats: int = 0) -> Any:
    """The (cached) Triton kernel of ``record`` for the state buffers ``present`` (with
    ``stats`` k >= 1: the kernel of the k-th reduction pass of its chain)."""
    stats = int(stats)
    key = (id(record), present, stats)
    kernel = _KERNELS.get(key)
    if kernel is not None:
        return kernel
    source = _generate_stats(record, present, stats) if stats else _generate(record, present)
    kind = f"stats{stats}" if stats else "fused"
    filename = f"<optimkit-{kind}-{record.name}-{'-'.join(present) or 'stateless'}>"
    # Triton reads a kernel's source through inspect, which finds it in linecache.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {
        "__name__": "optimkit.kernels.generated",
        "tl": tl,
        "triton": triton,
        "_rule": record.rule,
        "_stats": _chain(record)[stats - 1].stats if stats else None,
        "_tensor_ptr": _tensor_ptr,
        "_stochastic_bf16": _stochastic_bf16,
        "_to_dtype": _to_dtype,
    }
    exec(compile(source, filename, "exec"), namespace)
    name = f"_{kind}_{record.name}"
    kernel = triton.jit(do_not_specialize=[] if stats else ["_seed"])(namespace[name])
    _KERNELS[key] = kernel
    return kernel


def compiled_variants() -> int:
    """How many compiled variants the generated kernels hold (for recompilation checks;
    0 under the interpreter, which compiles nothing)."""
    total = 0
    for kernel in _KERNELS.values():
        for caches in getattr(kernel, "device_caches", {}).values():
            total += len(caches[0])
    return total


# ------------------------------------------------------------------------------------------
# the launch
# ------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """Cached device metadata of one list of tensors."""

    table: Tensor
    chunks: Tensor
    n_chunks: int
    aligned: bool
    #: dtypes of (param, state...) when every param and state tensor is one the kernel takes
    #: (fp32/bf16/fp16, contiguous) with one dtype per column; else None
    dtypes: tuple[torch.dtype, ...] | None
    grad_key: tuple[int, ...] = ()
    grad_table: Tensor | None = None
    grad_aligned: bool = False


def _device_int64(values: Sequence[int], device: torch.device) -> Tensor:
    host = torch.tensor(values, dtype=torch.int64)
    if device.type == "cpu":
        return host
    # pinned + non_blocking: no host-device synchronisation (the caching host allocator keeps
    # the pinned block alive until the copy has run).
    return host.pin_memory().to(device, non_blocking=True)


def _plan(
    optimizer: Any,
    params: list[Tensor],
    states: list[list[Tensor]],
    grads: list[Tensor],
    chunk: int,
) -> _Plan:
    columns = [params, *states]
    addresses = tuple(itertools.chain.from_iterable(map(Tensor.data_ptr, c) for c in columns))
    numels = tuple(map(Tensor.numel, params))
    key = (chunk, len(columns), addresses, numels)
    plans = optimizer.__dict__.setdefault("_fused_plans", {})
    plan = plans.get(key)
    device = params[0].device
    if plan is None:
        if len(plans) >= _MAX_PLANS:
            plans.clear()
        n = len(params)
        rows = [[addresses[c * n + i] for c in range(len(columns))] + [numels[i]] for i in range(n)]
        chunks = [(i, k) for i, numel in enumerate(numels) for k in range(-(-numel // chunk))]
        dtypes = tuple(column[0].dtype for column in columns)
        uniform = all(
            t.dtype == dtype and _kernel_ok(t)
            for column, dtype in zip(columns, dtypes)
            for t in column
        )
        plan = _Plan(
            table=_device_int64(list(itertools.chain.from_iterable(rows)), device),
            chunks=_device_int64(list(itertools.chain.from_iterable(chunks)), device),
            n_chunks=len(chunks),
            aligned=all(a % 16 == 0 for a in addresses),
            dtypes=dtypes if uniform else None,
        )
        plans[key] = plan
    grad_key = tuple(map(Tensor.data_ptr, grads))
    if grad_key != plan.grad_key:
        plan.grad_table = _device_int64(grad_key, device)
        plan.grad_key = grad_key
        plan.grad_aligned = all(a % 16 == 0 for a in grad_key)
    return plan


def _binding(
    record: FusedRule, hp: Mapping[str, Any], step: int, stats: int = 0
) -> tuple[dict[str, float], dict[str, Any]]:
    """Runtime scalars and compile-time flags of the rule (or of its reduction pass) for a
    group's hyperparameters."""
    sig = _signature(record, stats)
    values: dict[str, Any] = {"step": step}
    flags: dict[str, Any] = {}
    for key, value in hp.items():
        if isinstance(value, bool):
            flags[key] = value
        elif isinstance(value, (int, float)):
            values[key] = value
        elif key == "betas":
            values.update({f"beta{i + 1}": b for i, b in enumerate(value)})
    if record.scalars is not None:
        values.update(record.scalars(hp, step))
    if record.flags is not None:
        flags.update(record.flags(hp))
    for name in sig.scalars:  # 1 - x in double precision (in fp32, 1 - 0.999 loses 4 digits)
        base = name.removeprefix("one_minus_")
        if name not in values and base != name and base in values:
            values[name] = 1 - values[base]
    try:
        scalars = {name: float(values[name]) for name in sig.scalars}
        constants = {name: flags[name] for name in sig.flags}
    except KeyError as error:
        raise TypeError(
            f"fused rule {record.name}: no value for argument {error.args[0]!r} (not a "
            "hyperparameter, not from scalars(hp, step) or flags(hp))"
        ) from None
    return scalars, constants


def _kernel_ok(t: Tensor) -> bool:
    return t.dtype in _TL_DTYPES and t.is_contiguous()


def _fallback(optimizer: Any, p, g, state, step, hp, grad_scale) -> None:
    """The foreach rule for tensors the kernel does not take, prepared as the engine does."""
    if grad_scale is not None:
        g = TensorList(torch._foreach_div(g.tensors, grad_scale))
    g = optimizer._prepare_grad(p, g, hp)
    optimizer.update(p, g, state, step, hp)


def launch(
    optimizer: Any,
    param: TensorList,
    grad: TensorList,
    state: Mapping[str, TensorList],
    step: int,
    hp: Mapping[str, Any],
) -> None:
    """Update one bucket (same device, dtype, step) in place with the fused kernel."""
    cls = type(optimizer)
    record = rule_for(cls)
    if record is None:
        raise RuntimeError(f"{cls.__name__} has no fused kernel; use impl='foreach'")
    params, grads = param.tensors, grad.tensors
    device = params[0].device
    if device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"{cls.__name__}(impl='fused') runs on CUDA tensors (or, for tests, on the CPU "
            f"under TRITON_INTERPRET=1); got tensors on {device}"
        )
    if record.columns is not None and (record.supports is None or record.supports(hp)):
        original, state = state, record.columns(state)
    else:
        original = state
    present = tuple(name for name in record.state if name in state)
    per_tensor = record.reduction.tensor_state if record.reduction is not None else ()
    unknown = set(state) - set(present) - set(per_tensor)
    if unknown and (record.supports is None or record.supports(hp)):
        raise RuntimeError(f"fused rule {record.name} does not take state {sorted(unknown)}")
    grad_scale = getattr(optimizer, "grad_scale", None)
    if isinstance(grad_scale, (int, float)):
        grad_scale = torch.tensor(float(grad_scale), device=device)
    elif grad_scale is not None and grad_scale.device != device:
        grad_scale = grad_scale.to(device, non_blocking=True)

    if record.supports is not None and not record.supports(hp):
        # hyperparameters the kernel does not cover (e.g. a variant with per-tensor ranking)
        _fallback(optimizer, param, grad, dict(original), step, hp, grad_scale)
        return

    if not all(type(t) in _PLAIN for t in itertools.chain(params, grads)):
        # tensor subclasses (e.g. FSDP2's DTensor shards) have no single data pointer
        _fallback(optimizer, param, grad, dict(original), step, hp, grad_scale)
        return

    # The usual case: one launch for the bucket. (A gradient has its parameter's dtype and
    # shape, which torch enforces; only its strides need checking.)
    columns = [state[n].tensors for n in present]
    chunk = int(config["chunk"])
    plan = _plan(optimizer, params, columns, grads, chunk)
    if plan.dtypes is not None and all(map(Tensor.is_contiguous, grads)):
        dtypes = (grads[0].dtype, *plan.dtypes[1:])
        sub_s = dict(zip(present, columns))
        sub_s.update({n: state[n].tensors for n in per_tensor})
        _launch_one(
            optimizer, record, present, params, grads, sub_s, dtypes, step, hp, grad_scale, plan
        )
        return

    # Otherwise sub-buckets by the dtypes of (grad, state...); unsupported tensors apart.
    groups: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        tensors = [p, g, *(state[n].tensors[i] for n in present)]
        if all(_kernel_ok(t) for t in tensors) and g.shape == p.shape:
            groups.setdefault(tuple(t.dtype for t in tensors[1:]), []).append(i)
        else:
            groups.setdefault(("fallback",), []).append(i)
    for dtypes, index in groups.items():
        names = present + per_tensor
        if len(groups) == 1:
            sub_p, sub_g, sub_s = params, grads, {n: state[n].tensors for n in names}
        else:
            sub_p = [params[i] for i in index]
            sub_g = [grads[i] for i in index]
            sub_s = {n: [state[n].tensors[i] for i in index] for n in names}
        if dtypes == ("fallback",):
            views = {n: TensorList([original[n].tensors[i] for i in index]) for n in original}
            _fallback(optimizer, TensorList(sub_p), TensorList(sub_g), views, step, hp, grad_scale)
            continue
        _launch_one(optimizer, record, present, sub_p, sub_g, sub_s, dtypes, step, hp, grad_scale)


def _launch_one(
    optimizer: Any,
    record: FusedRule,
    present: tuple[str, ...],
    params: list[Tensor],
    grads: list[Tensor],
    states: dict[str, list[Tensor]],
    dtypes: tuple[torch.dtype, ...],
    step: int,
    hp: Mapping[str, Any],
    grad_scale: Tensor | None,
    plan: _Plan | None = None,
) -> None:
    chunk, block = int(config["chunk"]), int(config["block"])
    if chunk % block or block & (block - 1) or chunk % 16:
        raise ValueError(f"kernels.config: chunk {chunk} must be a multiple of block {block}")
    if plan is None:
        plan = _plan(optimizer, params, [states[n] for n in present], grads, chunk)
    if plan.n_chunks == 0:
        return
    kernel = kernel_for(record, present)
    scalars, flags = _binding(record, hp, step)
    # no decay term at all for weight_decay 0 (as the engine's _prepare_grad): the passes
    # then need not read the parameter for it, and an inf parameter gives no 0 * inf
    decays = float(hp.get("weight_decay", 0.0)) != 0
    mode = _WD_MODES[optimizer._weight_decay_mode(hp)] if decays else 0
    common = dict(
        _sign=-1.0 if hp.get("maximize", False) else 1.0,
        _weight_decay=float(hp.get("weight_decay", 0.0)),
        _decay=1.0 - hp["lr"] * float(hp.get("weight_decay", 0.0)) if "lr" in hp else 1.0,
    )
    rounding = bool(getattr(optimizer, "stochastic_rounding", False)) and (
        params[0].dtype == torch.bfloat16
    )
    seed = 0
    if rounding:
        calls = optimizer.__dict__.get("_fused_rounding_calls", 0) + 1
        optimizer._fused_rounding_calls = calls
        # 64-bit Philox key: this launch in the high bits, a per-run base in the low ones; the
        # kernel adds the tensor index, and each element's index is the Philox counter.
        seed = (1 << 62) + (calls << 24) + (torch.initial_seed() % (1 << 24))
    state_types = {f"_{n.upper()}_T": _TL_DTYPES[dt] for n, dt in zip(present, dtypes[1:])}
    device = params[0].device
    scale_arg = grad_scale if grad_scale is not None else plan.table
    num_warps = int(config["num_warps"])
    geometry = dict(
        _CHUNK=chunk,
        _BLOCK=block,
        _COLS=2 + len(present),
        _HAS_SCALE=grad_scale is not None,
        _WD_MODE=mode,
        _ALIGNED=plan.aligned and plan.grad_aligned,
        _PARAM_T=_TL_DTYPES[params[0].dtype],
        _GRAD_T=_TL_DTYPES[dtypes[0]],
        **state_types,
    )
    extra: dict[str, Any] = {}
    if record.reduction is not None:
        extra["_tscalars"] = _per_tensor_scalars(
            record,
            present,
            params,
            grads,
            grad_scale,
            states,
            step,
            hp,
            plan,
            scale_arg,
            common,
            geometry,
        )
    args = dict(
        **common,
        _seed=seed,
        **extra,
        **scalars,
        _ROUNDING=rounding,
        **geometry,
        **flags,
    )
    run = kernel[(plan.n_chunks,)]
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            run(plan.table, plan.grad_table, plan.chunks, scale_arg, **args, num_warps=num_warps)
    else:
        run(plan.table, plan.grad_table, plan.chunks, scale_arg, **args, num_warps=num_warps)


def _per_tensor_scalars(
    record: FusedRule,
    present: tuple[str, ...],
    params: list[Tensor],
    grads: list[Tensor],
    grad_scale: Tensor | None,
    states: dict[str, list[Tensor]],
    step: int,
    hp: Mapping[str, Any],
    plan: _Plan,
    scale_arg: Tensor,
    common: dict[str, Any],
    geometry: dict[str, Any],
) -> Tensor:
    """The reduction passes of ``record``, in chain order: per-chunk sums (one read of what
    ``stats`` uses), reduced per tensor on the device, then ``finish``; each pass sees the
    per-tensor scalars of those before it. Returns the ``(n, outputs)`` fp32 table."""
    device = params[0].device
    table = torch.empty((len(params), 0), device=device, dtype=torch.float32)
    for level, reduction in enumerate(_chain(record), start=1):
        sums = None
        if reduction.runs(hp):
            kernel = kernel_for(record, present, stats=level)
            scalars, flags = _binding(record, hp, step, stats=level)
            shape = (plan.n_chunks, reduction.count)
            partials = torch.empty(shape, device=device, dtype=torch.float32)
            extra = {"_tscalars": table} if table.shape[1] else {}
            args = dict(**common, _partials=partials, **extra, **scalars, **geometry, **flags)
            _run(kernel, plan, scale_arg, args, device)
            owner = plan.chunks.view(-1, 2)[:, 0]  # the tensor of each chunk
            sums = torch.zeros((len(params), reduction.count), device=device, dtype=torch.float32)
            for k in range(reduction.count):
                if reduction.kind(k) == "max":
                    sums[:, k] = -math.inf
                    sums[:, k].scatter_reduce_(0, owner, partials[:, k], "amax")
                else:
                    sums[:, k].index_add_(0, owner, partials[:, k])
        inputs = ReductionInputs(
            params=params,
            grads=grads,
            tensor_state={name: states[name] for name in reduction.tensor_state},
            hp=hp,
            step=step,
            grad_scale=grad_scale,
            previous=table,
        )
        result = reduction.finish(sums, inputs).to(device=device, dtype=torch.float32)
        table = torch.cat([table, result.reshape(len(params), -1)], dim=1).contiguous()
    return table


def _run(kernel: Any, plan: _Plan, scale_arg: Tensor, args: dict, device: torch.device) -> None:
    run = kernel[(plan.n_chunks,)]
    num_warps = int(config["num_warps"])
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):
            run(plan.table, plan.grad_table, plan.chunks, scale_arg, **args, num_warps=num_warps)
    else:
        run(plan.table, plan.grad_table, plan.chunks, scale_arg, **args, num_warps=num_warps)
