"""Shared set-up of the fused-kernel tests: on a machine without a GPU the kernels run in
Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here, before any test module imports
Triton); ``OPTIMKIT_TEST_DEVICE=cuda`` runs the same tests on a GPU with compiled kernels."""

from __future__ import annotations

import os

import pytest

DEVICE = os.environ.get("OPTIMKIT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def small_chunks():
    """On the interpreter, chunks of 64 elements in blocks of 16 (tensors span several chunks,
    with full blocks and a masked tail); the defaults on a GPU."""
    from optimkit import kernels

    saved = dict(kernels.config)
    if DEVICE == "cpu":
        kernels.config.update(chunk=64, block=16)
    yield
    kernels.config.update(saved)
