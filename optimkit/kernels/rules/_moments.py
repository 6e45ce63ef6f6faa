"""Pieces shared by several fused rules (not a rule module: ``load_rules`` skips it)."""

import triton
import triton.language as tl  # noqa: F401 (the interpreter needs it visible)


@triton.jit
def adam_moments(grad, exp_avg, exp_avg_sq, one_minus_beta1, beta2, one_minus_beta2):
    """Adam's moments, as :func:`optimkit.optimizers.adam.adam_moments_`:
    ``exp_avg.lerp_(grad, 1 - beta1)``, ``exp_avg_sq * beta2 + (1 - beta2) grad^2``."""
    exp_avg = exp_avg + one_minus_beta1 * (grad - exp_avg)
    exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * grad * grad
    return exp_avg, exp_avg_sq
