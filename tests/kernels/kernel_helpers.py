"""Helpers shared by the kernel tests (imported as a plain module: tests/ has no packages, and a
``tests.kernels`` package would be shadowed by the repository's own ``kernels`` folder)."""

from __future__ import annotations

import torch

# Per-dtype tolerances (atol, rtol) for a kernel run in that dtype against the fp32 reference.
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float64: (1e-6, 1e-6),  # the references compute in fp32
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> None:
    """Compare in fp64 at the tolerance of ``dtype``; ``scale`` widens atol for large-magnitude values."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol * scale, rtol=rtol
    )
