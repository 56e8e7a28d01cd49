"""Fitting layered atlases to videos in minutes (``t2l-fast atlas``): DIS optical flow, a dense-grid
two-layer model and NLA's losses. The result is an :class:`~t2l_fast.models.atlas.AtlasData`.

>>> from t2l_fast.fit import fit_atlas  # doctest: +SKIP
>>> atlas, stats = fit_atlas(frames, masks)  # doctest: +SKIP
>>> atlas.save("out/atlas.safetensors")  # doctest: +SKIP
>>> masks = masks_from_box(frames, (x, y, w, h), flow=flow)  # doctest: +SKIP
>>> masks = masks_from_motion(frames, flow=flow)  # no box: the object found from its motion  # doctest: +SKIP
"""

from t2l_fast.config import FitConfig

from .fit import (
    CHECKPOINT_NAME,
    FitResult,
    FitStats,
    check_inputs,
    fit_atlas,
    reconstruct,
    reconstruction_psnr,
)
from .flow import FlowField, chain_similarities, compute_flow, consistency
from .masks import read_masks
from .motion import motion_evidence
from .segment import (
    NoMovingObject,
    find_masks,
    masks_from_box,
    masks_from_motion,
    region_similarity,
    remove_shadows,
    write_masks,
)

__all__ = [
    "CHECKPOINT_NAME",
    "FitConfig",
    "FitResult",
    "FitStats",
    "FlowField",
    "NoMovingObject",
    "chain_similarities",
    "check_inputs",
    "compute_flow",
    "consistency",
    "fit_atlas",
    "masks_from_box",
    "masks_from_motion",
    "find_masks",
    "motion_evidence",
    "remove_shadows",
    "read_masks",
    "region_similarity",
    "reconstruct",
    "reconstruction_psnr",
    "write_masks",
]
