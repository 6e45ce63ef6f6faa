"""The engine: everything every optimkit optimizer shares, written once.

An optimizer in optimkit is a subclass of :class:`Optimizer` that declares

* ``hyperparams``: name -> :class:`Hyper` (default value and allowed range),
* ``state_buffers(hp)``: the names of its parameter-shaped state tensors,
* ``update(p, grad, state, step, hp)``: its update rule, written once.

The engine owns validation, param groups, lazy state, grouping tensors by device and dtype,
``maximize``, complex parameters (as real views), coupled or decoupled weight decay, closures,
skipping parameters without gradients, sparse-gradient errors, checkpoints, and the choice of
path:

* ``impl="reference"``: a loop over tensors; ``update`` receives plain :class:`torch.Tensor`.
* ``impl="foreach"`` (default): tensors grouped by device, dtype and step count; ``update``
  receives :class:`TensorList` objects whose methods mirror the tensor methods but run
  ``torch._foreach_*`` multi-tensor kernels. Because both paths run the same ``update``
  function, the two cannot drift apart.
* ``impl="fused"``: reserved for GPU kernels; an optimizer advertises it in ``impls``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from operator import is_
from typing import Any, ClassVar, Union

import torch
from torch import Tensor

__all__ = [
    "Hyper",
    "Interval",
    "Flag",
    "Choice",
    "Betas",
    "Optimizer",
    "TensorList",
    "maximum_",
    "minimum_",
    "IMPLS",
]

IMPLS = ("reference", "foreach", "fused")

Scalar = Union[float, int]


# --------------------------------------------------------------------------------------------
# Hyperparameter specifications
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Interval:
    """A real (or integer) value in an interval; ``tensor=True`` also admits a one-element
    tensor (as torch does for ``lr``)."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False
    tensor: bool = False

    def describe(self) -> str:
        left = "(" if self.low_open or self.low == -math.inf else "["
        right = ")" if self.high_open or self.high == math.inf else "]"
        kind = "an integer" if self.integer else "a number"
        return f"{kind} in {left}{_fmt(self.low)}, {_fmt(self.high)}{right}"

    def check(self, owner: str, name: str, value: Any) -> None:
        if isinstance(value, Tensor):
            if not self.tensor:
                raise ValueError(f"{owner}: {name} must be {self.describe()}, got a tensor")
            if value.numel() != 1:
                raise ValueError(f"{owner}: a tensor {name} must have one element")
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{owner}: {name} must be {self.describe()}, got {value!r}")
        if self.integer and not float(value).is_integer():
            raise ValueError(f"{owner}: {name} must be {self.describe()}, got {value!r}")
        too_low = value <= self.low if self.low_open else value < self.low
        too_high = value >= self.high if self.high_open else value > self.high
        if math.isnan(value) or too_low or too_high:
            raise ValueError(f"{owner}: invalid {name} = {value!r}; allowed: {self.describe()}")


@dataclass(frozen=True)
class Flag:
    """A boolean."""

    def describe(self) -> str:
        return "True or False"

    def check(self, owner: str, name: str, value: Any) -> None:
        if not isinstance(value, bool):
            raise ValueError(f"{owner}: {name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class Choice:
    """One of a fixed set of values."""

    options: tuple[Any, ...]

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)

    def check(self, owner: str, name: str, value: Any) -> None:
        if value not in self.options:
            raise ValueError(f"{owner}: invalid {name} = {value!r}; allowed: {self.describe()}")


@dataclass(frozen=True)
class Betas:
    """A tuple of coefficients, each in its own interval (default ``[0, 1)``)."""

    count: int = 2
    interval: Interval = Interval(0.0, 1.0, high_open=True)

    def describe(self) -> str:
        return f"a tuple of {self.count} numbers, each {self.interval.describe()}"

    def check(self, owner: str, name: str, value: Any) -> None:
        if not isinstance(value, (tuple, list)) or len(value) != self.count:
            raise ValueError(f"{owner}: {name} must be {self.describe()}, got {value!r}")
        for i, item in enumerate(value):
            self.interval.check(owner, f"{name}[{i}]", item)


Spec = Union[Interval, Flag, Choice, Betas]


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its default, its allowed values, and where the default comes from."""

    default: Any
    spec: Spec
    source: str = ""


def _fmt(x: float) -> str:
    if x in (math.inf, -math.inf):
        return "inf" if x > 0 else "-inf"
    return f"{x:g}"


# Common hyperparameters -----------------------------------------------------------------------
NON_NEGATIVE = Interval(0.0)
POSITIVE = Interval(0.0, low_open=True)
UNIT = Interval(0.0, 1.0)
COEFFICIENT = Interval(0.0, 1.0, high_open=True)


def lr_hyper(default: float, source: str = "") -> Hyper:
    """The learning rate: a non-negative number or one-element tensor."""
    return Hyper(default, Interval(0.0, tensor=True), source)


def weight_decay_hyper(default: float = 0.0, source: str = "") -> Hyper:
    return Hyper(default, NON_NEGATIVE, source)


MAXIMIZE = Hyper(False, Flag(), "torch.optim convention")


# --------------------------------------------------------------------------------------------
# TensorList: the multi-tensor twin of a Tensor
# --------------------------------------------------------------------------------------------
def _raw(x: Any) -> Any:
    return x.tensors if isinstance(x, TensorList) else x


class TensorList:
    """A list of tensors with the in-place and out-of-place methods of :class:`torch.Tensor`
    that update rules use, each running one ``torch._foreach_*`` multi-tensor kernel.

    Operands are another :class:`TensorList` of the same length or a Python scalar.
    """

    __slots__ = ("tensors",)

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        self.tensors = list(tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def __iter__(self):
        return iter(self.tensors)

    def __getitem__(self, i: int) -> Tensor:
        return self.tensors[i]

    def __repr__(self) -> str:
        return f"TensorList({len(self.tensors)} tensors)"

    # out of place ------------------------------------------------------------------------
    def __neg__(self) -> TensorList:
        return TensorList(torch._foreach_neg(self.tensors))

    def __add__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_add(self.tensors, _raw(other)))

    __radd__ = __add__

    def __sub__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_sub(self.tensors, _raw(other)))

    def __rsub__(self, other: Scalar) -> TensorList:
        out = torch._foreach_neg(self.tensors)
        torch._foreach_add_(out, other)
        return TensorList(out)

    def __mul__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_mul(self.tensors, _raw(other)))

    __rmul__ = __mul__

    def __truediv__(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_div(self.tensors, _raw(other)))

    def __rtruediv__(self, other: Scalar) -> TensorList:
        out = torch._foreach_reciprocal(self.tensors)
        torch._foreach_mul_(out, other)
        return TensorList(out)

    def add(self, other: Any, alpha: Scalar = 1) -> TensorList:
        if isinstance(other, TensorList):
            return TensorList(torch._foreach_add(self.tensors, other.tensors, alpha=alpha))
        return TensorList(torch._foreach_add(self.tensors, other * alpha))

    def mul(self, other: Any) -> TensorList:
        return self * other

    def div(self, other: Any) -> TensorList:
        return self / other

    def sqrt(self) -> TensorList:
        return TensorList(torch._foreach_sqrt(self.tensors))

    def abs(self) -> TensorList:
        return TensorList(torch._foreach_abs(self.tensors))

    def sign(self) -> TensorList:
        return TensorList(torch._foreach_sign(self.tensors))

    def neg(self) -> TensorList:
        return -self

    def exp(self) -> TensorList:
        return TensorList(torch._foreach_exp(self.tensors))

    def reciprocal(self) -> TensorList:
        return TensorList(torch._foreach_reciprocal(self.tensors))

    def pow(self, exponent: Scalar) -> TensorList:
        return TensorList(torch._foreach_pow(self.tensors, exponent))

    def clone(self) -> TensorList:
        return TensorList([t.clone() for t in self.tensors])

    def lerp(self, end: TensorList, weight: Scalar) -> TensorList:
        return TensorList(torch._foreach_lerp(self.tensors, end.tensors, weight))

    def maximum(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_maximum(self.tensors, _raw(other)))

    def minimum(self, other: Any) -> TensorList:
        return TensorList(torch._foreach_minimum(self.tensors, _raw(other)))

    def clamp_min(self, value: Scalar) -> TensorList:
        return TensorList(torch._foreach_clamp_min(self.tensors, value))

    def clamp_max(self, value: Scalar) -> TensorList:
        return TensorList(torch._foreach_clamp_max(self.tensors, value))

    def norm(self, p: Scalar = 2) -> TensorList:
        """Per-tensor norms, as a list of 0-d tensors."""
        return TensorList(torch._foreach_norm(self.tensors, p))

    # in place ----------------------------------------------------------------------------
    def add_(self, other: Any, alpha: Scalar = 1) -> TensorList:
        if isinstance(other, TensorList):
            torch._foreach_add_(self.tensors, other.tensors, alpha=alpha)
        else:
            torch._foreach_add_(self.tensors, other * alpha if alpha != 1 else other)
        return self

    def sub_(self, other: Any, alpha: Scalar = 1) -> TensorList:
        if isinstance(other, TensorList):
            torch._foreach_sub_(self.tensors, other.tensors, alpha=alpha)
        else:
            torch._foreach_sub_(self.tensors, other * alpha if alpha != 1 else other)
        return self

    def mul_(self, other: Any) -> TensorList:
        torch._foreach_mul_(self.tensors, _raw(other))
        return self

    def div_(self, other: Any) -> TensorList:
        torch._foreach_div_(self.tensors, _raw(other))
        return self

    def addcmul_(self, tensor1: TensorList, tensor2: TensorList, value: Scalar = 1) -> TensorList:
        torch._foreach_addcmul_(self.tensors, tensor1.tensors, tensor2.tensors, value=value)
        return self

    def addcdiv_(self, tensor1: TensorList, tensor2: TensorList, value: Scalar = 1) -> TensorList:
        torch._foreach_addcdiv_(self.tensors, tensor1.tensors, tensor2.tensors, value=value)
        return self

    def lerp_(self, end: TensorList, weight: Scalar) -> TensorList:
        torch._foreach_lerp_(self.tensors, end.tensors, weight)
        return self

    def copy_(self, src: TensorList) -> TensorList:
        torch._foreach_copy_(self.tensors, src.tensors)
        return self

    def zero_(self) -> TensorList:
        torch._foreach_zero_(self.tensors)
        return self

    def sqrt_(self) -> TensorList:
        torch._foreach_sqrt_(self.tensors)
        return self

    def abs_(self) -> TensorList:
        torch._foreach_abs_(self.tensors)
        return self

    def sign_(self) -> TensorList:
        torch._foreach_sign_(self.tensors)
        return self

    def neg_(self) -> TensorList:
        torch._foreach_neg_(self.tensors)
        return self

    def reciprocal_(self) -> TensorList:
        torch._foreach_reciprocal_(self.tensors)
        return self

    def clamp_min_(self, value: Scalar) -> TensorList:
        torch._foreach_clamp_min_(self.tensors, value)
        return self

    def clamp_max_(self, value: Scalar) -> TensorList:
        torch._foreach_clamp_max_(self.tensors, value)
        return self


TensorLike = Union[Tensor, TensorList]


def maximum_(out: TensorLike, other: TensorLike) -> TensorLike:
    """Elementwise ``out = max(out, other)`` in place, for a tensor or a :class:`TensorList`."""
    if isinstance(out, TensorList):
        torch._foreach_maximum_(out.tensors, _raw(other))
    else:
        torch.maximum(out, other, out=out)
    return out


def minimum_(out: TensorLike, other: TensorLike) -> TensorLike:
    """Elementwise ``out = min(out, other)`` in place, for a tensor or a :class:`TensorList`."""
    if isinstance(out, TensorList):
        torch._foreach_minimum_(out.tensors, _raw(other))
    else:
        torch.minimum(out, other, out=out)
    return out


# --------------------------------------------------------------------------------------------
# The optimizer base class
# --------------------------------------------------------------------------------------------
#: elements per chunk of the CPU foreach path: the chunk's parameters, gradients, state and
#: temporaries stay in the last-level cache while the rule's operations run over them in turn,
#: instead of streaming every operation over all parameters through main memory.
CPU_CHUNK_NUMEL = 1 << 18


_PLAIN = (Tensor, torch.nn.Parameter)  # not tensor subclasses such as DTensor shards
#: parameter dtypes that ``kahan`` compensates.
_KAHAN_DTYPES = (torch.bfloat16, torch.float16)
#: dtypes ``state_precision`` may name.
_STATE_PRECISIONS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def cache_sized_chunks(
    tensor_lists: list[list[Tensor]], limit: int, cut: bool = True
) -> list[list[list[Tensor]]]:
    """Split aligned lists (parameters, gradients, each state buffer) into chunks of at most
    about ``limit`` elements. With ``cut`` (elementwise rules only), a tensor larger than
    ``limit`` whose aligned tensors are all plain, contiguous tensors is cut into flat views;
    every other tensor is packed whole (a tensor larger than ``limit`` is a chunk of its own)."""
    chunks: list[list[list[Tensor]]] = []
    current: list[list[Tensor]] = [[] for _ in tensor_lists]
    size = 0

    def flush() -> None:
        nonlocal current, size
        if size:
            chunks.append(current)
            current, size = [[] for _ in tensor_lists], 0

    for j in range(len(tensor_lists[0])):
        aligned = [tl[j] for tl in tensor_lists]
        numel = aligned[0].numel()
        if cut and numel > limit and all(type(t) in _PLAIN and t.is_contiguous() for t in aligned):
            flush()
            flats = [t.view(-1) for t in aligned]
            for start in range(0, numel, limit):
                chunks.append([[f[start : start + limit]] for f in flats])
            continue
        for column, t in zip(current, aligned):
            column.append(t)
        size += max(numel, 1)
        if size >= limit:
            flush()
    flush()
    return chunks


def _real_view(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _buckets(params: list[Tensor], steps: list[float]) -> dict[tuple, list[int]]:
    """Indices of ``params`` grouped by (device, dtype, step): the tensors one call of a rule
    may take together."""
    first = params[0]
    if steps.count(steps[0]) == len(steps):  # the usual case: one step value
        device, dtype = first.device, first.dtype
        if all(p.device == device and p.dtype == dtype for p in params):
            return {(device, dtype, steps[0]): list(range(len(params)))}
    buckets: dict[tuple, list[int]] = {}
    for i, (p, s) in enumerate(zip(params, steps)):
        buckets.setdefault((p.device, p.dtype, s), []).append(i)
    return buckets


def _unscale(grad: TensorLike, grad_scale: Tensor | None) -> TensorLike:
    """``grad / grad_scale`` (torch.amp.GradScaler's scale) as new tensors; ``p.grad`` is kept."""
    if grad_scale is None:
        return grad
    if isinstance(grad, TensorList):
        scale = grad_scale.to(grad.tensors[0].device, non_blocking=True)
        return TensorList(torch._foreach_div(grad.tensors, scale))
    return grad / grad_scale.to(grad.device, non_blocking=True)


def _auto_impl(cls: type, device: torch.device) -> str:
    """``impl=None``: "fused" for a CUDA bucket when the class has a kernel and Triton imports."""
    if device.type != "cuda":
        return "foreach"
    from optimkit.kernels import default_impl

    return default_impl(cls, device)


class Optimizer(torch.optim.Optimizer):
    """Base class of every optimkit optimizer (a drop-in :class:`torch.optim.Optimizer`).

    Args:
        params: an iterable of tensors or of dicts defining parameter groups.
        lr: the learning rate (may also be given as a keyword; a one-element tensor is allowed).
        impl: ``"reference"``, ``"foreach"`` or ``"fused"``; ``None`` picks the fastest path
            available for each group of tensors (``"foreach"`` on CPU).
        state_precision: the dtype of the parameter-shaped state of floating-point parameters
            (e.g. ``torch.float32`` for bf16 parameters, or ``torch.bfloat16`` to halve the
            state of fp32 parameters); ``None`` (default) follows each parameter's dtype, as
            torch does. Updates are then computed in the wider of the two dtypes and rounded
            once into the parameter (and the state); checkpoints keep this dtype.
        kahan: Kahan-compensated updates of bf16/fp16 parameters: the rounding error of each
            parameter is kept in a buffer of the parameter's dtype (``state["kahan_comp"]``,
            2 bytes per bf16 parameter) and added back before the next update, so updates
            smaller than half a unit in the last place accumulate instead of being lost.
            Computed in fp32. The fused kernels do not implement it: a fused bucket with
            ``kahan`` runs the foreach path. No effect on fp32/fp64 parameters.
        **hyperparams: the optimizer's hyperparameters (see ``hyperparams`` of each class).
            Unknown names raise :class:`TypeError`; values outside their range raise
            :class:`ValueError` naming the parameter and the allowed values.
    """

    #: name -> Hyper; set by each subclass.
    hyperparams: ClassVar[dict[str, Hyper]] = {}
    #: paths this optimizer implements.
    impls: ClassVar[tuple[str, ...]] = ("reference", "foreach")
    supports_complex: ClassVar[bool] = True
    supports_sparse: ClassVar[bool] = False
    needs_closure: ClassVar[bool] = False
    #: True when the update of each element depends only on that element (no norms, no
    #: shapes): the engine may then cut tensors into pieces (cache-sized chunks on the CPU,
    #: fused kernels on the GPU).
    elementwise: ClassVar[bool] = False
    #: True when ``update`` treats each tensor on its own (per-tensor norms allowed, nothing
    #: across tensors): the engine may then run it on any subset of a bucket (on the CPU, on
    #: cache-sized packs of whole tensors). Implied by ``elementwise``.
    tensorwise: ClassVar[bool] = False
    #: how the engine applies ``weight_decay``: "coupled" (added to the gradient),
    #: "decoupled" (``p *= 1 - lr * weight_decay``), "hyper" (chosen by the group's
    #: ``decoupled_weight_decay`` flag) or None (the update rule handles it itself).
    weight_decay_mode: ClassVar[str | None] = "coupled"

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """True when the engine's step is in use: then torch.amp.GradScaler hands it
        ``grad_scale`` and ``found_inf`` (as to torch's fused optimizers) instead of unscaling
        the gradients itself; a subclass replacing ``step`` or ``_step_group`` keeps the usual
        GradScaler path."""
        return self._uses_engine_step()

    @classmethod
    def _uses_engine_step(cls) -> bool:
        """Whether this class steps through the engine's ``step`` and ``_step_group``."""
        unwrap = inspect.unwrap  # torch.optim wraps step() with its hooks
        return unwrap(cls.step) is unwrap(Optimizer.step) and (
            cls._step_group is Optimizer._step_group
        )

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor | None = None,
        *,
        impl: str | None = None,
        state_precision: torch.dtype | None = None,
        kahan: bool = False,
        **hyperparams: Any,
    ) -> None:
        name = type(self).__name__
        if state_precision is not None:
            if state_precision not in _STATE_PRECISIONS:
                raise ValueError(
                    f"{name}: invalid state_precision = {state_precision!r}; allowed: None (the "
                    "parameter's dtype) or one of " + ", ".join(map(str, _STATE_PRECISIONS))
                )
            if not self._uses_engine_step():
                raise TypeError(
                    f"{name}: state_precision is not supported (this optimizer runs its own "
                    "step and keeps its statistics in its own precision; see its docstring)"
                )
        if lr is not None:
            hyperparams["lr"] = lr
        unknown = sorted(set(hyperparams) - set(self.hyperparams))
        if unknown:
            raise TypeError(
                f"{name}: unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(sorted(self.hyperparams))}, impl"
            )
        if impl is not None and impl not in self.impls:
            raise ValueError(
                f"{name}: invalid impl = {impl!r}; allowed: None (automatic) or "
                + ", ".join(repr(i) for i in self.impls)
            )
        defaults = self.with_defaults(hyperparams)
        self._validate(defaults)
        self.impl = impl
        if not isinstance(kahan, bool):
            raise TypeError(f"{name}: kahan must be True or False, got {kahan!r}")
        if kahan and not self._uses_engine_step():
            raise TypeError(f"{name}: kahan is not supported (this optimizer runs its own step)")
        self.state_precision = state_precision
        self.kahan = kahan
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------------
    # declarations a subclass provides
    # ------------------------------------------------------------------------------------
    @classmethod
    def state_buffers(cls, hp: Mapping[str, Any]) -> tuple[str, ...]:
        """Names of the parameter-shaped state tensors for a group's hyperparameters."""
        return ()

    def init_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        """A new state buffer (zeros by default)."""
        return torch.zeros_like(param, memory_format=torch.preserve_format)

    def update(
        self,
        param: TensorLike,
        grad: TensorLike,
        state: Mapping[str, TensorLike],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        """Apply the update rule in place. ``step`` is 1 on the first update."""
        raise NotImplementedError

    @classmethod
    def with_defaults(cls, hp: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every hyperparameter: the defaults, updated with ``hp``."""
        return {**{key: hyper.default for key, hyper in cls.hyperparams.items()}, **(hp or {})}

    @classmethod
    def state_bytes_per_param(
        cls, hp: Mapping[str, Any] | None = None, dtype: torch.dtype = torch.float32
    ) -> float:
        """Optimizer-state bytes per parameter element (scalar step counters excluded)."""
        full = cls.with_defaults(hp)
        itemsize = torch.empty((), dtype=dtype).element_size()
        return len(cls.state_buffers(full)) * itemsize

    # ------------------------------------------------------------------------------------
    # validation and param groups
    # ------------------------------------------------------------------------------------
    def _validate(self, values: Mapping[str, Any]) -> None:
        name = type(self).__name__
        for key, hyper in self.hyperparams.items():
            if key in values:
                hyper.spec.check(name, key, values[key])
        self.check_combination(values)

    def check_combination(self, hp: Mapping[str, Any]) -> None:
        """Reject combinations of hyperparameters that are invalid together (ValueError)."""

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate(group)
        for p in group["params"]:
            if p.is_complex() and not self.supports_complex:
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters; "
                    "pass torch.view_as_real(param) views or use an optimizer that does"
                )

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("state_precision", None)  # pickled by an older optimkit
        self.__dict__.setdefault("kahan", False)
        for group in self.param_groups:
            for key, hyper in self.hyperparams.items():
                group.setdefault(key, hyper.default)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint (also one written by the torch.optim twin of this algorithm).

        Floating-point state is cast to its parameter's device and dtype, except entries for
        which :meth:`state_dtype` names a dtype of their own (e.g. fp32 statistics of bf16
        parameters): those are taken from the checkpoint as saved, so they load back exactly.
        Step counters are kept on the CPU as float32 tensors (torch's convention for its
        non-fused paths)."""
        params_by_id = {
            saved_id: p
            for saved, group in zip(state_dict["param_groups"], self.param_groups)
            for saved_id, p in zip(saved["params"], group["params"])
        }
        own_dtype: dict[Any, dict[str, Tensor]] = {}
        rest: dict[Any, dict[str, Any]] = {}
        for saved_id, entry in state_dict["state"].items():
            p = params_by_id.get(saved_id)
            own_dtype[saved_id] = {
                key: value
                for key, value in entry.items()
                if p is not None
                and key != "step"
                and isinstance(value, Tensor)
                and self.state_dtype(key, p) is not None
            }
            rest[saved_id] = {k: v for k, v in entry.items() if k not in own_dtype[saved_id]}
        super().load_state_dict({**state_dict, "state": rest})
        for saved_id, entries in own_dtype.items():
            p = params_by_id[saved_id]
            for key, value in entries.items():
                dtype = self.state_dtype(key, p)
                self.state[p][key] = value.to(device=p.device, dtype=dtype, copy=True)
        self._validate_groups()
        for state in self.state.values():
            for key in [k for k, v in state.items() if v is None]:
                del state[key]
            step = state.get("step")
            if isinstance(step, Tensor):
                if step.device.type != "cpu" or step.dtype != torch.float32:
                    state["step"] = step.detach().to("cpu", torch.float32)
            elif step is not None:
                state["step"] = torch.tensor(float(step), dtype=torch.float32)
            self._upgrade_state(state)

    def state_dtype(self, key: str, param: Tensor) -> torch.dtype | None:
        """The dtype that the state tensor ``key`` of ``param`` keeps, or None to follow torch's
        rule (every tensor cast to a floating parameter's dtype). An optimizer that keeps
        statistics in fp32 for bf16 parameters, or a boolean mask, returns that dtype here, and
        checkpoints keep it. By default: the ``state_precision`` given to the constructor, for
        floating-point parameters."""
        precision = self.state_precision
        if precision is not None and param.is_floating_point() and key != "kahan_comp":
            return precision
        return None

    def _new_buffer(self, name: str, param: Tensor, hp: Mapping[str, Any]) -> Tensor:
        """``init_buffer``, in the dtype :meth:`state_dtype` names when ``state_precision`` is
        set."""
        buffer = self.init_buffer(name, param, hp)
        if self.state_precision is None or not buffer.is_floating_point():
            return buffer
        dtype = self.state_dtype(name, param)
        if dtype is not None and dtype.is_floating_point and dtype != buffer.dtype:
            buffer = buffer.to(dtype)
        return buffer

    def _validate_groups(self) -> None:
        for group in self.param_groups:
            self._validate(group)

    def _upgrade_state(self, state: dict[str, Any]) -> None:
        """Complete a loaded state written by another library (e.g. add a missing step)."""
        if "step" not in state:
            raise ValueError(f"{type(self).__name__}: a loaded parameter state has no 'step'")

    # ------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the
        loss (required when ``needs_closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        elif self.needs_closure:
            raise RuntimeError(f"{type(self).__name__}.step() requires a closure")
        found_inf = getattr(self, "found_inf", None)  # set by torch.amp.GradScaler
        if found_inf is not None and found_inf.item():
            return loss  # non-finite gradients: skip the step (state and step counts untouched)
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def param_group_index(self) -> dict[int, dict[str, Any]]:
        """``id(param) -> the param group holding it``, for every parameter of the optimizer:
        built once and rebuilt only when the groups or their ``params`` lists change (a new
        group, a loaded checkpoint's groups, a list of another length), so looking a
        parameter's group up is O(1) instead of a scan over every group's parameters."""
        signature = tuple((id(g), id(g["params"]), len(g["params"])) for g in self.param_groups)
        cached = self.__dict__.get("_param_group_index")
        if cached is None or cached[0] != signature:
            # the cache holds the groups it was built from, so their ids are not reused
            index = {id(p): g for g in self.param_groups for p in g["params"]}
            cached = self.__dict__["_param_group_index"] = (signature, index)
        return cached[1]

    def group_hyperparams(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The group's hyperparameters as Python values (a tensor ``lr`` becomes a float)."""
        hp = {key: group[key] for key in self.hyperparams}
        lr = hp.get("lr")
        if isinstance(lr, Tensor):
            hp["lr"] = lr.item()
        return hp

    def _collect(self, group: dict[str, Any], hp: Mapping[str, Any]):
        buffers = self.state_buffers(hp)
        needed = {"step", *buffers}
        params, grads, states = [], [], []
        state_of, refuse_sparse = self.state, not self.supports_sparse
        kahan = self.kahan
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if refuse_sparse and grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients; "
                    "use torch.optim.SparseAdam or a dense gradient"
                )
            state = state_of[p]
            if not needed <= state.keys():
                if "step" not in state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                for name in buffers:
                    if name not in state:
                        state[name] = self._new_buffer(name, p, hp)
            if kahan and "kahan_comp" not in state and p.dtype in _KAHAN_DTYPES:
                state["kahan_comp"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(grad)
            states.append(state)
        return buffers, params, grads, states

    def _step_group(self, group: dict[str, Any]) -> None:
        hp = self.group_hyperparams(group)
        buffers, params, grads, states = self._collect(group, hp)
        if not params:
            return
        step_values = self._advance_steps(group, states)
        impl = self.impl or "foreach"
        grad_scale = getattr(self, "grad_scale", None)  # set by torch.amp.GradScaler
        if impl == "reference":
            for p, g, state, s in zip(params, grads, states, step_values):
                p, g = _real_view(p), _real_view(g)
                views = {name: _real_view(state[name]) for name in buffers}
                compute = self._compute_dtype(p.dtype)
                if compute is not None:
                    columns = [[p], [g], *([views[name]] for name in buffers)]
                    if "kahan_comp" in state and self.kahan:
                        columns.append([state["kahan_comp"]])
                    self._step_widened(columns, buffers, compute, int(s), hp, grad_scale, impl)
                    continue
                g = self._prepare_grad(p, _unscale(g, grad_scale), hp)
                self.update(p, g, views, int(s), hp)
            return
        for (device, dtype, s), index in _buckets(params, step_values).items():
            path = self.impl or _auto_impl(type(self), device)
            kahan = self.kahan and dtype in _KAHAN_DTYPES
            if kahan and path == "fused":
                path = "foreach"  # the kernels have no compensated variant
            if dtype.is_complex:  # as real views (gradients and state share the dtype)
                tensors = [[_real_view(params[i]) for i in index]]
                tensors.append([_real_view(grads[i]) for i in index])
                tensors += [[_real_view(states[i][name]) for i in index] for name in buffers]
            else:
                tensors = [[params[i] for i in index], [grads[i] for i in index]]
                tensors += [[states[i][name] for i in index] for name in buffers]
            if kahan:
                tensors.append([states[i]["kahan_comp"] for i in index])
            if path == "foreach" and device.type == "cpu" and (self.elementwise or self.tensorwise):
                pieces = cache_sized_chunks(tensors, CPU_CHUNK_NUMEL, cut=self.elementwise)
            else:
                pieces = [tensors]
            compute = self._compute_dtype(dtype) if path != "fused" else None
            for piece in pieces:
                if compute is not None:  # the kernels mix dtypes themselves
                    self._step_widened(piece, buffers, compute, int(s), hp, grad_scale, path)
                    continue
                p, g = TensorList(piece[0]), TensorList(piece[1])
                if path != "fused":  # the fused kernels unscale, maximize and decay themselves
                    g = self._prepare_grad(p, _unscale(g, grad_scale), hp)
                views = {name: TensorList(piece[2 + k]) for k, name in enumerate(buffers)}
                self.dispatch(path, p, g, views, int(s), hp)

    def _compute_dtype(self, dtype: torch.dtype) -> torch.dtype | None:
        """The dtype a bucket of ``dtype`` parameters is updated in when ``state_precision``
        differs from it (the wider of the two) or with ``kahan`` (fp32 at least), else None."""
        if not dtype.is_floating_point:
            return None
        precision = self.state_precision
        if self.kahan and dtype in _KAHAN_DTYPES:
            return torch.promote_types(torch.float32, precision or dtype)
        if precision is None or precision == dtype:
            return None
        return torch.promote_types(dtype, precision)

    def _step_widened(
        self,
        piece: list[list[Tensor]],
        buffers: tuple[str, ...],
        compute: torch.dtype,
        step: int,
        hp: Mapping[str, Any],
        grad_scale: Tensor | None,
        path: str,
    ) -> None:
        """Run the rule on copies in ``compute`` dtype of the tensors that are narrower, then
        round the results back once (parameters and state). With a Kahan column (after the
        state buffers), each parameter's copy starts from ``param + compensation``, and the
        new compensation is what rounding the result into the parameter lost."""
        columns = 2 + len(buffers)
        comps = piece[columns] if len(piece) > columns else None
        piece = piece[:columns]
        wide = [[t if t.dtype == compute else t.to(compute) for t in column] for column in piece]
        if comps is not None:
            for c, comp in zip(wide[0], comps):
                c.add_(comp)
        wrap = (lambda ts: ts[0]) if path == "reference" else TensorList  # one tensor, or a list
        p, g = wrap(wide[0]), wrap(wide[1])
        g = self._prepare_grad(p, _unscale(g, grad_scale), hp)
        views = {name: wrap(wide[2 + k]) for k, name in enumerate(buffers)}
        if path == "reference":
            self.update(p, g, views, step, hp)
        else:
            self.dispatch(path, p, g, views, step, hp)
        for k, (column, copies) in enumerate(zip(piece, wide)):
            if k == 1:
                continue  # the gradient is never written back
            for t, c in zip(column, copies):
                if c is not t:
                    t.copy_(c)
        if comps is not None:
            for t, c, comp in zip(piece[0], wide[0], comps):
                comp.copy_(c.sub_(t))  # the exact fp32 value minus its rounding

    def _advance_steps(self, group: Mapping[str, Any], states: list[dict[str, Any]]) -> list[float]:
        """Add 1 to the step counter of each parameter in ``states`` and return the new values.

        Each counter stays a 0-d float32 CPU tensor in its parameter's state (torch's
        convention, so checkpoints are interchangeable), but the counters of a group's
        parameters are made views into one vector the first time they step together: then one
        ``add_`` advances them all and one ``tolist`` reads them (with thousands of small
        tensors a per-tensor increment would dominate the step). A counter replaced from
        outside (a loaded checkpoint, a reset) or a change in which parameters have gradients
        is noticed by identity and the vector is rebuilt from the current values."""
        steps = [state["step"] for state in states]
        cache = self.__dict__.setdefault("_packed_steps", {})
        packed = cache.get(id(group))
        if packed is None or len(packed[1]) != len(steps) or not all(map(is_, packed[1], steps)):
            if len(cache) > len(self.param_groups):
                cache.clear()
            vector = torch.stack([s.detach().to("cpu", torch.float32).reshape(()) for s in steps])
            views = vector.unbind()
            for state, counter in zip(states, views):
                state["step"] = counter
            packed = cache[id(group)] = (vector, views)
        packed[0].add_(1.0)
        return packed[0].tolist()

    def dispatch(
        self,
        impl: str,
        param: TensorList,
        grad: TensorList,
        state: Mapping[str, TensorList],
        step: int,
        hp: Mapping[str, Any],
    ) -> None:
        """Run one bucket of same-device, same-dtype tensors through the chosen path.

        For ``"fused"``, ``grad`` is the raw gradient (see :mod:`optimkit.kernels`)."""
        if impl == "fused":
            from optimkit.kernels import fused_update

            fused_update(self, param, grad, state, step, hp)
            return
        self.update(param, grad, state, step, hp)

    def _weight_decay_mode(self, hp: Mapping[str, Any]) -> str | None:
        mode = self.weight_decay_mode
        if mode == "hyper":
            return "decoupled" if hp["decoupled_weight_decay"] else "coupled"
        return mode

    def _prepare_grad(self, param: TensorLike, grad: TensorLike, hp: Mapping[str, Any]):
        """``maximize`` and weight decay; never modifies ``p.grad``."""
        if hp.get("maximize", False):
            grad = -grad
        weight_decay = hp.get("weight_decay", 0.0)
        if weight_decay != 0:
            mode = self._weight_decay_mode(hp)
            if mode == "coupled":
                grad = grad.add(param, alpha=weight_decay)
            elif mode == "decoupled":
                param.mul_(1.0 - hp["lr"] * weight_decay)
        return grad


def param_count(params: Sequence[Tensor]) -> int:
    """Number of scalar elements in a list of tensors."""
    return sum(p.numel() for p in params)
