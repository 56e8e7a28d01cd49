"""Fitting layered atlases to videos in minutes (``t2l-fast atlas``): DIS optical flow, a dense-grid
two-layer model and NLA's losses. The result is an :class:`~t2l_fast.models.atlas.AtlasData`.

>>> from t2l_fast.fit import fit_atlas  # doctest: +SKIP
>>> atlas, stats = fit_atlas(frames, masks)  # doctest: +SKIP
>>> atlas.save("out/atlas.safetensors")  # doctest: +SKIP
"""

from .fit import (
    CHECKPOINT_NAME,
    FitConfig,
    FitResult,
    FitStats,
    check_inputs,
    fit_atlas,
    reconstruct,
    reconstruction_psnr,
)
from .flow import FlowField, chain_similarities, compute_flow, consistency
from .masks import read_masks

__all__ = [
    "CHECKPOINT_NAME",
    "FitConfig",
    "FitResult",
    "FitStats",
    "FlowField",
    "chain_similarities",
    "check_inputs",
    "compute_flow",
    "consistency",
    "fit_atlas",
    "read_masks",
    "reconstruct",
    "reconstruction_psnr",
]
