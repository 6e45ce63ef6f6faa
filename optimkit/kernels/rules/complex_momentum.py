"""Fused rule of ComplexMomentum (:mod:`optimkit.optimizers.momentum`).

The complex buffer is stored as one ``(2, *shape)`` tensor (real and imaginary halves); the
kernel takes the two halves as parameter-shaped views (``columns``) and writes through them, so
the state layout and checkpoints are those of the other paths.
"""

import math

import triton
import triton.language as tl  # noqa: F401 (the interpreter needs it visible)

from optimkit.engine import TensorList
from optimkit.kernels.registry import register_fused
from optimkit.optimizers.momentum import ComplexMomentum


@triton.jit
def complex_momentum(param, grad, momentum_real, momentum_imag, lr, beta_real, beta_imag):
    rotated = momentum_real * beta_imag  # beta_imag * a, before a changes
    momentum_real = momentum_real * beta_real - beta_imag * momentum_imag - grad
    momentum_imag = momentum_imag * beta_real + rotated
    param = param + lr * momentum_real
    return param, momentum_real, momentum_imag


def _halves(state):
    buffers = state["momentum_buffer"].tensors
    return {
        "momentum_real": TensorList([b[0] for b in buffers]),
        "momentum_imag": TensorList([b[1] for b in buffers]),
    }


def _complex_scalars(hp, step):
    return {
        "beta_real": hp["momentum"] * math.cos(hp["momentum_phase"]),
        "beta_imag": hp["momentum"] * math.sin(hp["momentum_phase"]),
    }


register_fused(
    ComplexMomentum,
    rule=complex_momentum,
    state=("momentum_real", "momentum_imag"),
    scalars=_complex_scalars,
    columns=_halves,
)
