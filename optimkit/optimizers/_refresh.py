"""Diagnostics shared by the matrix optimizers whose preconditioners are refreshed every few
steps (SOAP, Shampoo)."""

from __future__ import annotations


class RefreshCounts:
    """``opt.refresh_counts``: counters of what the refreshes did, e.g. SOAP's
    ``cholesky_fallbacks`` and ``householder_fallbacks`` (matrices its Gram-Schmidt or
    Cholesky QR could not factor) or Shampoo's
    ``root_matmul_flops`` (the FLOPs of its Newton roots); kept on the optimizer object, not in
    checkpoints, and read by ``optimkit bench speed-matrix``."""

    @property
    def refresh_counts(self) -> dict[str, float]:
        return self.__dict__.setdefault("_refresh_counts", {})
