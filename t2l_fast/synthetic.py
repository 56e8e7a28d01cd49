"""Synthetic inputs with known ground truth: the scenes of tests and benchmarks (not for real edits),
and the sample clip with masks that ships in t2l_fast/samples/clip."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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


# ---------------------------------------------------------------------------------------------------
# The sample clip (t2l_fast/samples/clip): a short video with exact object masks, from the two CC0
# sample photographs. The camera pans across the cat (background) while the cup and saucer slide in
# front of it (foreground); the mask is the object's shape, so frames and masks agree by construction.
# ---------------------------------------------------------------------------------------------------
SAMPLES = Path(__file__).resolve().parent / "samples"
# the object in coffee.jpg (450x300) as two ellipses (centre x, centre y, radius x, radius y): saucer, cup
CUP = ((208.0, 178.0, 150.0, 112.0), (218.0, 112.0, 92.0, 100.0))


def _photo(name: str) -> torch.Tensor:
    with Image.open(SAMPLES / name) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255


def _sample(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Bilinear samples (3, H, W) of ``image`` at pixel positions x, y (pixel centres at integers)."""
    h, w = image.shape[-2:]
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], dim=-1)[None]
    return F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


def sample_clip(
    num_frames: int = 24, size: tuple[int, int] = (768, 432)
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample clip: frames (T, 3, H, W) float in [0, 1] and object masks (T, H, W) bool."""
    width, height = size
    cat, cup = _photo("chelsea.jpg"), _photo("coffee.jpg")
    yy, xx = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    frames, masks = [], []
    for t in range(num_frames):
        s = t / max(1, num_frames - 1)
        # background: a 16:9 window of the cat, 88 % of its width, panning left to right
        win_w = 0.88 * cat.shape[-1]
        scale = win_w / width
        x0, y0 = s * (cat.shape[-1] - win_w), 0.5 * (cat.shape[-2] - height * scale) * (1 - 0.3 * s)
        background = _sample(cat, x0 + (xx + 0.5) * scale - 0.5, y0 + (yy + 0.5) * scale - 0.5)
        # foreground: the cup at 0.75 of its size, sliding right with a slight bob
        zoom = 0.75
        ox = -40 + s * (width - 260)
        oy = height - 300 * zoom - 10 + 12 * math.sin(2 * math.pi * s)
        cx, cy = (xx - ox) / zoom, (yy - oy) / zoom  # positions in coffee.jpg
        mask = torch.zeros_like(xx, dtype=torch.bool)
        for ex, ey, rx, ry in CUP:
            mask |= ((cx - ex) / rx) ** 2 + ((cy - ey) / ry) ** 2 <= 1
        foreground = _sample(cup, cx, cy)
        frames.append(torch.where(mask, foreground, background))
        masks.append(mask)
    return torch.stack(frames).clamp(0, 1), torch.stack(masks)


def write_sample_clip(folder: str | os.PathLike, num_frames: int = 24) -> None:
    """Write the sample clip as ``folder/frames/NNNNN.jpg`` (quality 90) and ``folder/masks/NNNNN.png``
    (255 = object). ``python -m t2l_fast.synthetic FOLDER`` makes t2l_fast/samples/clip."""
    frames, masks = sample_clip(num_frames)
    folder = Path(folder)
    for sub in ("frames", "masks"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i, (frame, mask) in enumerate(zip(frames, masks, strict=True)):
        rgb = (frame.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        Image.fromarray(rgb).save(folder / "frames" / f"{i:05d}.jpg", quality=90)
        Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(folder / "masks" / f"{i:05d}.png")


if __name__ == "__main__":  # pragma: no cover
    import sys

    write_sample_clip(sys.argv[1])
