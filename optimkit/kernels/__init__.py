"""Fused multi-tensor GPU kernels (Triton) for elementwise optimizers: ``impl="fused"``.

One kernel launch updates a whole bucket of tensors (same device, dtype and step): a cached
chunk table maps each program to (tensor, chunk), and a cached pointer table gives each
program the addresses of its parameter, gradient and state tensors. Each optimizer contributes
only its update rule, a small ``@triton.jit`` function in :mod:`optimkit.kernels.rules`; see
:mod:`optimkit.kernels.registry` and ``docs/fused.md``.

This module never imports Triton at import time: CPU users need not install it. ``"fused"`` is
chosen automatically (``impl=None``) for a bucket on a CUDA device when the optimizer has a
fused kernel and Triton imports. Under ``TRITON_INTERPRET=1`` the same kernels run on CPU
tensors (slowly), which is how CI checks them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch

__all__ = [
    "triton_available",
    "triton_on",
    "interpreting",
    "default_impl",
    "fused_update",
    "set_stochastic_rounding",
    "config",
]

#: launch geometry: elements per program (``chunk``), per loop iteration (``block``), warps.
config: dict[str, int] = {"chunk": 65536, "block": 1024, "num_warps": 4}


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports (cached; imports it on the first call)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def triton_on(enabled: bool, tensor: torch.Tensor) -> bool:
    """Whether a Triton kernel switched on by ``enabled`` (a module flag that tests turn off)
    may run on ``tensor``: a CUDA tensor, and Triton importable (imported only then)."""
    return enabled and tensor.is_cuda and triton_available()


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def default_impl(cls: type, device: torch.device) -> str:
    """The path ``impl=None`` picks for a bucket on ``device``: ``"fused"`` on CUDA when the
    class advertises it, Triton imports and a rule is registered for exactly this class (a
    subclass that inherits ``impls`` but changes the rule gets ``"foreach"``)."""
    if device.type == "cuda" and "fused" in cls.impls and triton_available():
        from optimkit.kernels.registry import rule_for

        if rule_for(cls) is not None:
            return "fused"
    return "foreach"


def set_stochastic_rounding(optimizer: torch.optim.Optimizer, enabled: bool = True) -> None:
    """Round bf16 parameters stochastically when the fused path writes them (unbiased:
    E[round(x)] = x, so updates smaller than half a bf16 ulp are not lost). fp32 and fp16
    parameters are unaffected, as are the reference and foreach paths."""
    optimizer.stochastic_rounding = bool(enabled)


def fused_update(
    optimizer: Any,
    param: Any,
    grad: Any,
    state: Mapping[str, Any],
    step: int,
    hp: Mapping[str, Any],
) -> None:
    """Run one bucket (TensorLists) through the optimizer's fused kernel.

    ``grad`` is the raw gradient: unscaling (``optimizer.grad_scale``), ``maximize`` and weight
    decay happen inside the kernel. Tensors the kernel cannot take (float64, non-contiguous)
    go through the foreach rule instead, with the same preparation.
    """
    if not triton_available():
        raise RuntimeError(
            f"{type(optimizer).__name__}(impl='fused') needs Triton (pip install triton) and a "
            "CUDA device; use impl=None or 'foreach' on this machine"
        )
    from optimkit.kernels.multi_tensor import launch

    launch(optimizer, param, grad, state, step, hp)
