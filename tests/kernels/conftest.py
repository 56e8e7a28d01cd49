"""Shared fixtures for the kernel tests.

The Triton kernels run on CUDA or, on CPU, in the Triton interpreter, which must be switched on before
Python starts: run the suite as ``TRITON_INTERPRET=1 python -m pytest``. Without either, the kernel tests
fail (not skip) with that instruction, so a green run always means the kernels were exercised.
"""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the Triton kernels can run: CUDA, else CPU under TRITON_INTERPRET=1."""
    interpreter = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpreter:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.fail("the Triton kernel tests need CUDA or TRITON_INTERPRET=1 set before Python starts")
