"""Fused rule of AdaGrad-Norm (:mod:`optimkit.optimizers.adagrad`): one step size for the whole
param group, computed by the engine's group statistic (``GroupNormOptimizer.group_step``, a
0-d tensor on the device) and handed to the kernel as a per-tensor scalar without a host
synchronisation. 12 bytes per fp32 parameter (no state)."""

import triton
import triton.language as tl  # noqa: F401 (the interpreter needs it visible)

from optimkit.kernels.registry import Reduction, register_fused
from optimkit.optimizers.adagrad import AdaGradNorm


@triton.jit
def adagrad_norm(param, grad, step_size):
    param = param - grad * step_size
    return param


def _group_step_size(sums, inputs):
    step_size = inputs.hp["step_size"]
    return step_size.reshape(1, 1).expand(len(inputs.params), 1)


register_fused(
    AdaGradNorm,
    rule=adagrad_norm,
    reduction=Reduction(None, _group_step_size, outputs=("step_size",), count=0),
)
