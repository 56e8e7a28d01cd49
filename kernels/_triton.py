"""Triton import shim: the kernel modules import from here so that they stay importable without Triton.

Without Triton, ``jit`` leaves the kernel functions as plain (never called) Python functions and the
dispatcher (``_dispatch.triton_blockers``) reports why the Triton path cannot run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except Exception:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

    def jit(fn: Callable[..., Any]) -> Callable[..., Any]:
        return fn


def acc_dtype(dtype: torch.dtype) -> Any:
    """Arithmetic dtype inside the kernels: fp64 for fp64 inputs (gradcheck), fp32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def on_interpreter(t: torch.Tensor) -> bool:
    """True when a launch on ``t`` runs in the Triton interpreter (CPU tensor): favour big blocks there,
    because the interpreter runs programs one after the other with a large per-program cost."""
    return t.device.type != "cuda"


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
