"""Which optimizer has a fused kernel, and how its hyperparameters reach the kernel.

An elementwise optimizer gets a fused path from two things, kept in a module of
:mod:`optimkit.kernels.rules` (imported only when a fused step first runs, so importing optimkit
never imports Triton):

1. its rule, a small ``@triton.jit`` function whose argument names are those of the Python rule
   (``param``, ``grad``, the state buffers, the hyperparameters); it receives fp32 blocks and
   fp32 scalars, and returns ``param`` followed by every state argument, in signature order;
2. a call of :func:`register_fused` naming the optimizer classes it serves.

Each argument of the rule is bound by name: ``param`` and ``grad``; a state buffer (one of
``state``; a buffer absent for the group's hyperparameters is passed as ``0.0`` and its result
dropped); a constexpr (annotated ``tl.constexpr``) from ``flags(hp)`` or a boolean
hyperparameter of that name; any other argument is a runtime fp32 scalar from
``scalars(hp, step)``, a numeric hyperparameter of that name, ``beta1``/``beta2``/... from
``betas``, ``step``, or ``one_minus_<any of these>`` (``1 - x`` computed in double precision
on the host: in fp32, ``1 - beta2`` for ``beta2 = 0.999`` keeps only four correct digits).
Runtime scalars are kernel arguments, so a learning-rate schedule or param groups with
different values never recompile a kernel.

The engine's work before the rule (GradScaler unscaling, ``maximize``, coupled or decoupled
weight decay) is done by the launch machinery (:mod:`optimkit.kernels.multi_tensor`) in the
same pass, exactly as :meth:`optimkit.engine.Optimizer._prepare_grad` does it.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FusedRule",
    "Reduction",
    "ReductionInputs",
    "register_fused",
    "rule_for",
    "registered",
    "load_rules",
]

ScalarFn = Callable[[Mapping[str, Any], int], Mapping[str, float]]
FlagFn = Callable[[Mapping[str, Any]], Mapping[str, Any]]
SupportsFn = Callable[[Mapping[str, Any]], bool]


FinishFn = Callable[..., Any]


@dataclass(frozen=True)
class ReductionInputs:  # noqa: D101 (documented below)
    """What ``Reduction.finish`` may use besides the sums: the bucket's tensors (gradients as
    ``p.grad`` holds them: not yet unscaled by ``grad_scale`` nor negated for ``maximize``),
    its 0-d per-tensor state entries, the group's hyperparameters and the step."""

    params: list[Any]
    grads: list[Any]
    tensor_state: dict[str, list[Any]]
    hp: Mapping[str, Any]
    step: int
    grad_scale: Any = None
    #: the per-tensor scalars of the reductions before this one in a chain, ``(n, k)``
    previous: Any = None


@dataclass(frozen=True)
class Reduction:
    """Per-tensor reductions a rule needs before its elementwise pass (LAMB's trust ratio,
    LARS's norms): one extra read-only pass.

    * ``stats``: a ``@triton.jit`` function bound like a rule (``param``, ``grad``, state
      buffers, scalars, flags; the state as it is *before* the step) that returns the
      ``count`` per-element quantities to reduce over each tensor (one value when ``count``
      is 1, else a tuple); ``kinds`` says for each whether it is summed (``"sum"``) or its
      maximum taken (``"max"``). With ``count`` 0 there is no extra pass (``stats`` None);
    * ``finish(sums, inputs)``: from the reductions (an fp32 ``(n, count)`` tensor, one row
      per tensor of the bucket; None when ``count`` is 0) and :class:`ReductionInputs`, the
      per-tensor scalars the rule reads, as an ``(n, len(outputs))`` tensor, with torch
      operations on the device (no host synchronisation); it may update ``tensor_state``
      (name -> list of 0-d state tensors, e.g. NovoGrad's per-tensor second moment) in place.
      Write it with the same helpers as the Python rule, so the two cannot drift apart;
    * ``outputs``: the names under which the rule receives those scalars.
    """

    stats: Any
    finish: FinishFn
    outputs: tuple[str, ...]
    count: int
    tensor_state: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    #: ``hp -> bool``: whether the group needs the reduction pass (else ``sums`` is None)
    needed: SupportsFn | None = None
    #: a second reduction whose ``stats`` takes this one's outputs (per-tensor scalars) as
    #: arguments (e.g. a norm of the gradient after a clipping that needs a maximum)
    then: Reduction | None = None

    def chain(self) -> list[Reduction]:
        """This reduction and the ones after it, in order."""
        return [self] + (self.then.chain() if self.then is not None else [])

    @property
    def all_outputs(self) -> tuple[str, ...]:
        """The per-tensor scalars of the whole chain, in order (what the rule may take)."""
        return tuple(name for r in self.chain() for name in r.outputs)

    def runs(self, hp: Mapping[str, Any]) -> bool:
        """Whether the extra pass runs for a group with these hyperparameters."""
        return bool(self.count) and (self.needed is None or self.needed(hp))

    def kind(self, k: int) -> str:
        """``"sum"`` or ``"max"``: how quantity ``k`` is reduced."""
        return self.kinds[k] if self.kinds else "sum"


@dataclass(frozen=True)
class FusedRule:
    """A fused update rule and how to bind its arguments."""

    rule: Any
    state: tuple[str, ...]
    scalars: ScalarFn | None = None
    flags: FlagFn | None = None
    optimizers: tuple[type, ...] = field(default=())
    supports: SupportsFn | None = None
    reduction: Reduction | None = None
    columns: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None

    @property
    def name(self) -> str:
        fn = getattr(self.rule, "fn", self.rule)
        return getattr(fn, "__name__", repr(fn))


_RULES: dict[type, FusedRule] = {}
_LOADED = False


def register_fused(
    *optimizers: type,
    rule: Any,
    state: tuple[str, ...] = (),
    scalars: ScalarFn | None = None,
    flags: FlagFn | None = None,
    supports: SupportsFn | None = None,
    reduction: Reduction | None = None,
    columns: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> FusedRule:
    """Register ``rule`` (a ``@triton.jit`` function) as the fused kernel of ``optimizers``.

    Args:
        optimizers: the classes it serves (exactly these; a subclass is not served unless
            named, since it may change the rule).
        rule: the ``@triton.jit`` rule.
        state: every state buffer the rule may take (the names ``state_buffers`` returns for
            any hyperparameters).
        scalars: ``(hp, step) -> {name: float}``: derived runtime scalars (e.g. bias
            corrections computed in double precision on the host).
        flags: ``hp -> {name: value}``: compile-time constants of the rule.
        supports: ``hp -> bool``: whether the rule covers a group with these
            hyperparameters; a group it declines runs the class's foreach rule (prepared as
            the engine prepares it) on the same tensors.
        reduction: per-tensor sums computed in one extra read-only pass before the rule
            (:class:`Reduction`).
        columns: ``state -> state``: parameter-shaped views of state entries that are not
            parameter-shaped themselves (e.g. the two halves of a ``(2, *shape)`` buffer),
            under the names the rule takes; the kernel writes through the views.
    """
    if not optimizers:
        raise ValueError("register_fused needs at least one optimizer class")
    record = FusedRule(
        rule, tuple(state), scalars, flags, tuple(optimizers), supports, reduction, columns
    )
    for cls in optimizers:
        if cls in _RULES:
            raise ValueError(f"{cls.__name__} already has a fused rule ({_RULES[cls].name})")
        _RULES[cls] = record
    return record


def load_rules() -> None:
    """Import every module of :mod:`optimkit.kernels.rules` (this imports Triton)."""
    global _LOADED
    if _LOADED:
        return
    from optimkit.kernels import rules

    for info in sorted(pkgutil.iter_modules(rules.__path__), key=lambda m: m.name):
        if not info.name.startswith("_"):
            importlib.import_module(f"{rules.__name__}.{info.name}")
    _LOADED = True


def rule_for(cls: type) -> FusedRule | None:
    """The fused rule registered for exactly this class, or None (loads the rules)."""
    load_rules()
    return _RULES.get(cls)


def registered() -> dict[type, FusedRule]:
    """Every registered fused rule, by optimizer class (loads the rules)."""
    load_rules()
    return dict(_RULES)
