"""Synthetic inputs with known ground truth, for tests, benchmarks and demos (not for real edits)."""

from __future__ import annotations

import math

import torch

from t2l_fast.models.atlas import AtlasData, TexelBox


def texture(u: torch.Tensor, v: torch.Tensor, seed: float = 0.0) -> torch.Tensor:
    """A smooth colourful texture (3, ...) of texel positions."""
    return torch.stack(
        [
            0.5 + 0.4 * torch.sin(0.21 * u + 0.13 * v + seed),
            0.5 + 0.4 * torch.cos(0.17 * u - 0.11 * v + 2 * seed),
            0.5 + 0.4 * torch.sin(0.07 * u * 0.9 + 0.19 * v + 3 * seed),
        ]
    )


def two_layer_scene(
    t: int = 8, h: int = 64, w: int = 96, grid: int = 128, pan: float = 1.5, sprite: int = 20
) -> tuple[AtlasData, torch.Tensor]:
    """Background panning ``pan`` texels per frame; a ``sprite``-px square moving right over it.

    Returns the atlas and the true frames (T, 3, H, W) = A·fg + (1 - A)·bg.
    """
    tt, yy, xx = torch.meshgrid(
        torch.arange(t).float(), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"
    )
    bu, bv = xx + pan * tt + 3, yy + 2  # background texel positions in the full grid
    sx, sy = 10 + 6 * tt, torch.full_like(tt, 20.0)  # sprite's top-left corner per frame
    fu, fv = xx - sx + 4, yy - sy + 4  # foreground texel positions (sprite texture at 4..4+sprite)
    inside = (fu >= 4) & (fu < 4 + sprite) & (fv >= 4) & (fv < 4 + sprite)
    alpha = torch.where(inside, 0.99, 0.001)
    fu, fv = fu.clamp(0, sprite + 8), fv.clamp(0, sprite + 8)

    def box(pu, pv):
        u0, v0 = int(math.floor(pu.min())) - 1, int(math.floor(pv.min())) - 1
        return TexelBox(u0, v0, int(math.ceil(pu.max())) - u0 + 2, int(math.ceil(pv.max())) - v0 + 2)

    def image(b: TexelBox, seed: float) -> torch.Tensor:
        tv, tu = torch.meshgrid(
            torch.arange(b.height).float() + b.v0, torch.arange(b.width).float() + b.u0, indexing="ij"
        )
        return texture(tu, tv, seed)

    bbox, fbox = box(bu, bv), box(fu, fv)
    data = AtlasData(
        uv_background=torch.stack([bu / grid - 1.0, bv / grid - 1.0], dim=-1),
        uv_foreground=torch.stack([fu / grid, fv / grid], dim=-1),
        alpha=alpha,
        background_atlas=image(bbox, 0.0),
        foreground_atlas=image(fbox, 1.0),
        background_box=bbox,
        foreground_box=fbox,
        grid=grid,
    )
    bg = texture(bu, bv, 0.0).permute(1, 0, 2, 3)
    fg = texture(fu, fv, 1.0).permute(1, 0, 2, 3)
    a = alpha[:, None]
    return data, a * fg + (1 - a) * bg
