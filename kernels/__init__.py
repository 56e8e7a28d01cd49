"""Fused ops of t2l_fast (installed as ``t2l_fast.kernels``).

Each op lives in its own file with its torch reference (specification, CPU fallback and test
oracle) and its Triton implementation; the public functions below dispatch between them
(see ``_dispatch``). This package knows nothing of the rest of t2l_fast.
"""

from ._dispatch import KernelUnavailable, implementation, triton_blockers, use_triton
from .atlas_sample import AtlasSampleOut, sample_atlas, sample_atlas_reference
from .composite import GREEN, CompositeOut, composite_rgba, composite_rgba_reference
from .self_similarity import (
    self_similarity,
    self_similarity_mse,
    self_similarity_mse_reference,
    self_similarity_reference,
)

__all__ = [
    "GREEN",
    "AtlasSampleOut",
    "CompositeOut",
    "KernelUnavailable",
    "composite_rgba",
    "implementation",
    "composite_rgba_reference",
    "sample_atlas",
    "sample_atlas_reference",
    "self_similarity",
    "self_similarity_mse",
    "self_similarity_mse_reference",
    "self_similarity_reference",
    "triton_blockers",
    "use_triton",
]
