"""Batched, on-device augmentations: the internal dataset's training examples and CLIP's views.

One mechanism serves both: every geometric augmentation (crop, resize, flip, affine, perspective)
is a 3x3 homography from output to input coordinates in the [-1, 1] convention of
``grid_sample`` (align_corners=False); a batch of views is one ``grid_sample``. Colour jitter and
greyscale act per view with vectorised random factors. All random draws come from a
``torch.Generator`` on the CPU (same results on any device), then move to the images' device.

Colour jitter differs from torchvision's in two documented ways: the four operations run in a fixed
order (brightness, contrast, saturation, hue), and the hue shift is a rotation of the chroma plane
in YIQ space instead of a shift in HSV.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DataConfig, ViewConfig

LUMA = (0.299, 0.587, 0.114)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)


def _bernoulli(n: int, p: float, gen: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=gen, dtype=torch.float64) < p


def _eye(n: int) -> torch.Tensor:
    return torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)


def crop_matrix(
    scale_x: torch.Tensor, scale_y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor
) -> torch.Tensor:
    """Output [-1,1]^2 -> input box of half-extent (scale_x, scale_y) centred at (cx, cy)."""
    m = _eye(len(scale_x))
    m[:, 0, 0], m[:, 1, 1], m[:, 0, 2], m[:, 1, 2] = scale_x, scale_y, cx, cy
    return m


def flip_matrix(flip: torch.Tensor) -> torch.Tensor:
    m = _eye(len(flip))
    m[:, 0, 0] = torch.where(flip, -1.0, 1.0).double()
    return m


def affine_matrix(
    angle_deg: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, h: int, w: int
) -> torch.Tensor:
    """Rotation by ``angle`` about the centre and a translation (fractions of the size), in pixel
    geometry (so rotations stay rigid on non-square views), as an output -> input map."""
    n = len(angle_deg)
    a = torch.deg2rad(angle_deg)
    d = torch.diag(torch.tensor([w / 2.0, h / 2.0, 1.0], dtype=torch.float64))
    rot = _eye(n)
    rot[:, 0, 0], rot[:, 0, 1], rot[:, 1, 0], rot[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    shift = _eye(n)
    shift[:, 0, 2], shift[:, 1, 2] = -tx * w, -ty * h
    return torch.linalg.inv(d) @ rot @ shift @ d


def homography_from_points(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """(N, 4, 2) point pairs -> (N, 3, 3) H with H @ [src, 1] ~ [dst, 1] (direct linear transform)."""
    n = src.shape[0]
    x, y = src[..., 0], src[..., 1]
    u, v = dst[..., 0], dst[..., 1]
    zeros, ones = torch.zeros_like(x), torch.ones_like(x)
    rows_u = torch.stack([x, y, ones, zeros, zeros, zeros, -u * x, -u * y], dim=-1)
    rows_v = torch.stack([zeros, zeros, zeros, x, y, ones, -v * x, -v * y], dim=-1)
    a = torch.cat([rows_u, rows_v], dim=1)  # (N, 8, 8)
    b = torch.cat([u, v], dim=1)  # (N, 8)
    h = torch.linalg.solve(a, b)
    return torch.cat([h, torch.ones(n, 1, dtype=h.dtype)], dim=1).view(n, 3, 3)


CORNERS = ((-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0))


def perspective_matrix(shifts: torch.Tensor) -> torch.Tensor:
    """Corners moved inwards by ``shifts`` (N, 4, 2) in [0, distortion]; output -> input map that
    takes the moved corners (where the image lands) back to the original corners."""
    corners = torch.tensor(CORNERS, dtype=torch.float64).expand(len(shifts), 4, 2)
    moved = corners - corners.sign() * shifts
    return homography_from_points(moved, corners)


def warp(
    images: torch.Tensor, homography: torch.Tensor, size: tuple[int, int], fill: float | None = None
) -> torch.Tensor:
    """Resample ``images`` (N or 1, C, H, W) through per-view homographies (N, 3, 3) to (N, C, h, w).

    Bilinear; outside the input the value is ``fill`` (blended by coverage, so it stays
    differentiable), or zero when ``fill`` is None.
    """
    n = homography.shape[0]
    h, w = size
    dev = images.device  # the grid is built where the images are: no host-built copy
    ys = (torch.arange(h, dtype=torch.float32, device=dev) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=torch.float32, device=dev) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, h * w, 3)
    mapped = pts @ homography.to(dev, torch.float32).transpose(1, 2)  # (N, h*w, 3)
    grid = (mapped[..., :2] / mapped[..., 2:]).view(n, h, w, 2)
    if images.shape[0] == 1 and n > 1:
        images = images.expand(n, -1, -1, -1)
    if fill is None:
        return F.grid_sample(
            images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
        )
    ones = torch.ones_like(images[:, :1])
    out = F.grid_sample(
        torch.cat([images, ones], 1),
        grid.to(images.dtype),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )
    cover = out[:, -1:]
    return out[:, :-1] + (1 - cover) * fill


# ---------------------------------------------------------------------------------------------------
# Colour
# ---------------------------------------------------------------------------------------------------
YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


def hue_matrices(hue: torch.Tensor) -> torch.Tensor:
    """(N,) hue shifts (fractions of a turn) -> (N, 3, 3) RGB matrices rotating the chroma (I, Q)
    plane of YIQ. Made on the host, at draw time (then sent with the other parameters)."""
    to_yiq = torch.tensor(YIQ, dtype=torch.float64)
    ang = 2 * math.pi * hue.double().cpu()
    rot = _eye(len(hue))
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = ang.cos(), -ang.sin(), ang.sin(), ang.cos()
    return torch.linalg.inv(to_yiq) @ rot @ to_yiq  # on the host


def to_device(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Host tensors -> ``device`` in ONE copy (a pinned buffer sent non-blocking on CUDA), so the
    random parameters of a step cost one transfer and no sync. float64 arrives as float32; bool
    and integer dtypes are kept."""
    device = torch.device(device)
    if not tensors:
        return []
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    out, start = [], 0
    for t in tensors:
        part = flat[start : start + t.numel()].view(t.shape)
        start += t.numel()
        if t.dtype == torch.bool:
            out.append(part > 0.5)
        elif t.dtype == torch.float64:
            out.append(part.float())
        else:
            out.append(part.to(t.dtype))
    return out


@dataclass
class ColourParams:
    """Per-view colour factors (N,): identity values where the jitter was not drawn."""

    brightness: torch.Tensor
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor  # fraction of a full turn
    grayscale: torch.Tensor  # bool
    hue_matrix: torch.Tensor | None = None  # (N, 3, 3), made at draw time (see hue_matrices)

    FIELDS = ("brightness", "contrast", "saturation", "hue", "grayscale", "hue_matrix")

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f) if f != "hue_matrix" else self.matrix() for f in self.FIELDS]

    def matrix(self) -> torch.Tensor:
        return self.hue_matrix if self.hue_matrix is not None else hue_matrices(self.hue)

    def map(self, fn) -> ColourParams:
        """The same parameters with ``fn`` applied to each field tensor."""
        return ColourParams(*(fn(t) for t in self.tensors()))

    def to(self, device: torch.device | str) -> ColourParams:
        return ColourParams(*to_device(self.tensors(), device))

    @staticmethod
    def draw(n: int, p_jitter: float, strength: float, p_gray: float, gen: torch.Generator) -> ColourParams:
        on = _bernoulli(n, p_jitter, gen)
        one = torch.ones(n, dtype=torch.float64)

        def factor() -> torch.Tensor:
            return torch.where(on, _uniform(n, 1 - strength, 1 + strength, gen), one)

        b, c, s = factor(), factor(), factor()
        h = torch.where(on, _uniform(n, -strength, strength, gen), torch.zeros(n, dtype=torch.float64))
        return ColourParams(b, c, s, h, _bernoulli(n, p_gray, gen), hue_matrices(h))


def _luma(x: torch.Tensor) -> torch.Tensor:
    r, g, b = LUMA
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def apply_colour(x: torch.Tensor, p: ColourParams) -> torch.Tensor:
    """x (N, 3, H, W) in [0, 1] -> jittered (N, 3, H, W) in [0, 1]. The parameters should be on
    x's device already (see :meth:`ColourParams.to`)."""

    def col(t: torch.Tensor) -> torch.Tensor:
        return t.to(x.device, x.dtype).view(-1, 1, 1, 1)

    x = (x * col(p.brightness)).clamp(0, 1)
    mean = _luma(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * col(p.contrast) + mean).clamp(0, 1)
    gray = _luma(x)
    x = ((x - gray) * col(p.saturation) + gray).clamp(0, 1)
    m = p.matrix().to(x.device, x.dtype)  # hue: rotate the chroma (I, Q) plane of YIQ
    x = torch.einsum("ndc,nchw->ndhw", m, x).clamp(0, 1)
    return torch.where(p.grayscale.to(x.device).bool().view(-1, 1, 1, 1), _luma(x).expand_as(x), x)


# ---------------------------------------------------------------------------------------------------
# CLIP views
# ---------------------------------------------------------------------------------------------------
def view_size(h: int, w: int, short: int = 224, max_long: int = 320) -> tuple[int, int]:
    """The original's ``Resize(short, max_size=max_long)`` size for an (h, w) image: the short side
    becomes ``short`` and the long side follows the aspect ratio, unless it would pass ``max_long``;
    then the long side is ``max_long`` and the short side follows (torchvision's integer rounding).
    CLIP's patch embedding later drops the pixels past the last whole patch (:func:`whole_patches`)."""
    small, large = min(h, w), max(h, w)
    new_short, new_long = short, int(short * large / small)
    if new_long > max_long:
        new_short, new_long = int(max_long * new_short / new_long), max_long
    return (new_short, new_long) if h <= w else (new_long, new_short)


def whole_patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(..., h, w) -> the top-left (h // patch · patch, w // patch · patch): what CLIP's strided patch
    embedding reads (it never sees the pixels past the last whole patch). Contiguous: a compiled
    CLIP is specialised on its input's strides, and a view would recompile it."""
    h, w = images.shape[-2:]
    return images[..., : h // patch * patch, : w // patch * patch].contiguous()


@dataclass
class ViewParams:
    """Random parameters of the CLIP views of one or more examples (``n`` views each, in order);
    view 0 of every example is the whole image (no crop)."""

    geometry: torch.Tensor  # (N, 3, 3) output -> input homographies
    colour: ColourParams
    size: tuple[int, int]

    def __len__(self) -> int:
        return self.geometry.shape[0]

    def __getitem__(self, index: slice) -> ViewParams:
        return ViewParams(self.geometry[index], self.colour.map(lambda t: t[index]), self.size)

    def tensors(self) -> list[torch.Tensor]:
        return [self.geometry, *self.colour.tensors()]

    @staticmethod
    def from_tensors(tensors: list[torch.Tensor], size: tuple[int, int]) -> ViewParams:
        return ViewParams(tensors[0], ColourParams(*tensors[1:]), size)

    def to(self, device: torch.device | str) -> ViewParams:
        return ViewParams.from_tensors(to_device(self.tensors(), device), self.size)

    @staticmethod
    def cat(parts: list[ViewParams]) -> ViewParams:
        if len({p.size for p in parts}) != 1:
            raise ValueError("views of different sizes cannot be batched")
        columns = zip(*(p.tensors() for p in parts), strict=True)
        return ViewParams.from_tensors([torch.cat(c) for c in columns], parts[0].size)

    @staticmethod
    def draw(n: int, size: tuple[int, int], cfg: ViewConfig, gen: torch.Generator) -> ViewParams:
        """``n`` views of output ``size`` (h, w) (see :func:`view_size`) for one example."""
        s = _uniform(n, cfg.min_cover, 1.0, gen)
        s[0] = 1.0
        cx = (1 - s) * _uniform(n, -1, 1, gen)
        cy = (1 - s) * _uniform(n, -1, 1, gen)
        geometry = crop_matrix(s, s, cx, cy)
        geometry = geometry @ flip_matrix(_bernoulli(n, cfg.flip_p, gen))
        affine_on = _bernoulli(n, cfg.affine_p, gen)
        zeros = torch.zeros(n, dtype=torch.float64)
        angle = torch.where(affine_on, _uniform(n, -cfg.degrees, cfg.degrees, gen), zeros)
        tx = torch.where(affine_on, _uniform(n, -cfg.translate, cfg.translate, gen), zeros)
        ty = torch.where(affine_on, _uniform(n, -cfg.translate, cfg.translate, gen), zeros)
        geometry = geometry @ affine_matrix(angle, tx, ty, *size)
        persp_on = _bernoulli(n, cfg.perspective_p, gen)
        shifts = torch.rand(n, 4, 2, generator=gen, dtype=torch.float64) * cfg.distortion
        shifts = torch.where(persp_on.view(n, 1, 1), shifts, torch.zeros_like(shifts))
        geometry = geometry @ perspective_matrix(shifts)
        colour = ColourParams.draw(n, cfg.jitter_p, cfg.jitter, cfg.grayscale_p, gen)
        return ViewParams(geometry, colour, size)


def make_views(images: torch.Tensor, params: ViewParams, fill: float, min_cover: float) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B*n, 3, h, w) augmented views in [0, 1], where ``params`` holds
    n views per example in example order (CLIP normalises inside).

    The images are first downscaled once, antialiased, so that the smallest crop is resampled at
    about 1:1 (bilinear warping alone would alias).
    """
    b = images.shape[0]
    if len(params) % b:
        raise ValueError(f"{len(params)} views do not split evenly over {b} images")
    vh, vw = params.size
    h, w = images.shape[-2:]
    base = (max(vh, round(vh / min_cover)), max(vw, round(vw / min_cover)))
    if base[0] < h or base[1] < w:
        images = F.interpolate(images, size=base, mode="bilinear", antialias=True, align_corners=False)
    if b > 1:
        images = images.repeat_interleave(len(params) // b, dim=0)
    views = warp(images, params.geometry, params.size, fill=fill)
    # several RGB images stacked on the channels (B, 3k, H, W) share one warp; colour per image
    return torch.cat([apply_colour(v, params.colour) for v in views.split(3, dim=1)], dim=1)


def resize_view(image: torch.Tensor, short: int, max_long: int) -> torch.Tensor:
    """The un-augmented view (structure loss): (B, 3, H, W) -> (B, 3, h, w) at :func:`view_size`,
    antialiased."""
    size = view_size(*image.shape[-2:], short, max_long)
    return F.interpolate(image, size=size, mode="bilinear", antialias=True, align_corners=False)


# ---------------------------------------------------------------------------------------------------
# Internal dataset (training examples from the one input)
# ---------------------------------------------------------------------------------------------------
def _bucket(side: float, multiple: int, min_side: int) -> int:
    """Round to the nearest multiple (fixed shapes for compiled graphs), at least ``min_side``."""
    side = max(float(min_side), side)
    if multiple <= 1:
        return round(side)
    return max(-(-min_side // multiple) * multiple, round(side / multiple) * multiple)


def draw_example(
    image: torch.Tensor, cfg: DataConfig, gen: torch.Generator, min_side: int, multiple: int = 1
) -> torch.Tensor:
    """One augmented training example from ``image`` (1, 3, H, W): colour jitter, flip, random
    scale, random crop covering ``crop_min_cover``..1 of the scaled image (one cover for both sides,
    as the original's ``RandomSizeCrop``). Sides stay >= ``min_side`` and, with ``multiple`` > 1, the
    crop is resampled to the nearest multiple of it on each side (a few fixed shapes for the fast
    path)."""
    h, w = image.shape[-2:]
    scale = float(_uniform(1, cfg.scale_min, cfg.scale_max, gen))
    cover = _uniform(1, cfg.crop_min_cover, 1.0, gen)
    out_h = _bucket(h * scale * float(cover), multiple, min_side)
    out_w = _bucket(w * scale * float(cover), multiple, min_side)
    cy = (1 - cover) * _uniform(1, -1, 1, gen)
    cx = (1 - cover) * _uniform(1, -1, 1, gen)
    geometry = crop_matrix(cover, cover, cx, cy) @ flip_matrix(_bernoulli(1, cfg.flip_p, gen))
    colour = ColourParams.draw(1, cfg.jitter_p, 0.1, 0.0, gen)
    params = ViewParams(geometry, colour, (out_h, out_w)).to(image.device)  # one transfer
    if out_h < h * float(cover) or out_w < w * float(cover):  # downscaling: antialias first
        pre = (max(out_h, round(out_h / float(cover))), max(out_w, round(out_w / float(cover))))
        image = F.interpolate(image, size=pre, mode="bilinear", antialias=True, align_corners=False)
    example = warp(image, params.geometry, (out_h, out_w), fill=None)
    return apply_colour(example, params.colour)
