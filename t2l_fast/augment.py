"""Batched, on-device augmentations: the internal dataset's training examples and CLIP's views.

One mechanism serves both: every geometric augmentation (crop, resize, flip, affine, perspective)
is a 3x3 homography from output to input coordinates in the [-1, 1] convention of
``grid_sample`` (align_corners=False); a batch of views is one ``grid_sample``. A CLIP view is a
crop and, about it, two warps in the original's order (perspective of the flipped and affine-warped
crop), with fill wherever either warp reaches outside (see :func:`warp`). Colour jitter and
greyscale act per view with vectorised random factors. All random draws come from a
``torch.Generator`` on the CPU (same results on any device), then move to the images' device.

Colour jitter differs from torchvision's in two documented ways: the four operations run in a fixed
order (brightness, contrast, saturation, hue), and the hue shift is a rotation of the chroma plane
in YIQ space instead of a shift in HSV.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import DataConfig, ViewConfig

LUMA = (0.299, 0.587, 0.114)


def full_precision(fn):
    """Run ``fn`` with autocast off (CUDA and CPU): grids, colour and losses stay fp32 under the fast
    path's bf16 autocast; only the generator and CLIP run in reduced precision."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
            return fn(*args, **kwargs)

    return wrapper


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


def crop_cover(grid: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w, 2) positions in a crop's [-1, 1] coordinates -> (N, 1, h, w) the share of each
    bilinear sample that falls inside the crop resampled to ``size`` (h, w) pixels (what sampling a
    tensor of ones with zero padding gives: 1 inside, a one-pixel ramp at the border, 0 outside).
    Positions are fp32: the ramp is shifted out by 1/1000 px so that the border pixels' own centres
    count as fully inside."""
    h, w = size
    inside = (0.501 + (1 - grid.abs()) * grid.new_tensor([w / 2, h / 2])).clamp(0, 1)
    return (inside[..., 0] * inside[..., 1]).unsqueeze(1)


@full_precision
def warp(
    images: torch.Tensor,
    homography: torch.Tensor,
    size: tuple[int, int],
    fill: float | None = None,
    crop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Resample ``images`` (N or 1, C, H, W) through per-view homographies (N, 3, 3) to (N, C, h, w).

    Bilinear; outside the input the value is ``fill`` (blended by coverage, so it stays
    differentiable), or zero when ``fill`` is None.

    With ``crop`` (N, 3, 3) (:func:`crop_matrix`): the original's order (crop, resized to the
    output size, then warped about the crop). ``homography`` (N, 3, 3), or a chain (N, S, 3, 3) of
    warps applied in turn (stage 0 first: the original's last warp), maps the output to the crop's
    coordinates and ``crop`` maps those to the input; ``fill`` covers every point that leaves the
    output's rectangle at any stage (each of the original's warps fills what it moves in from
    outside), with the bilinear coverage of a ``size`` image (see :func:`crop_cover`).
    """
    chain = homography if homography.dim() == 4 else homography[:, None]
    n = chain.shape[0]
    h, w = size
    images = images.float()  # sampling positions and values in fp32 (a bf16 grid moves pixels)
    dev = images.device  # the grid is built where the images are: no host-built copy
    ys = (torch.arange(h, dtype=torch.float32, device=dev) * 2 + 1) / h - 1
    xs = (torch.arange(w, dtype=torch.float32, device=dev) * 2 + 1) / w - 1
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    pts = torch.stack([gx, gy, torch.ones_like(gx)], dim=-1).view(1, h * w, 3)
    cover = torch.ones((), device=dev)
    for stage in chain.to(dev, torch.float32).unbind(1):
        mapped = pts @ stage.transpose(1, 2)  # (N, h*w, 3)
        grid = mapped[..., :2] / mapped[..., 2:]
        pts = torch.cat([grid, torch.ones_like(grid[..., :1])], dim=-1)
        if crop is not None:
            cover = cover * crop_cover(grid.view(n, h, w, 2), size)
    grid = grid.view(n, h, w, 2)
    if images.shape[0] == 1 and n > 1:
        images = images.expand(n, -1, -1, -1)
    if crop is not None:
        c = crop.to(dev, torch.float32)  # axis-aligned: a scale and a centre per view
        scale = torch.diagonal(c[:, :2, :2], dim1=1, dim2=2)
        grid = grid * scale.view(n, 1, 1, 2) + c[:, :2, 2].view(n, 1, 1, 2)
        out = F.grid_sample(
            images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
        )
        cover = cover.to(out.dtype)
        return out * cover + (1 - cover) * (0.0 if fill is None else fill)
    if fill is None:
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    ones = torch.ones_like(images[:, :1])
    out = F.grid_sample(
        torch.cat([images, ones], 1),
        grid,
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


def host_side(fn):
    """Marks work on host tensors (the random draws) in profiles as ``t2l_fast.host``: on a GPU it
    launches nothing (benchmarks/compile_plan.py counts device ops outside it)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function("t2l_fast.host"):
            return fn(*args, **kwargs)

    return wrapper


@host_side
def _packed(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])


class Staging:
    """Fixed host buffers (pinned on CUDA) that the step's draws are sent from, reused in turn: no
    ``pin_memory()`` (a fresh page-locked allocation) per transfer. A buffer is written again only
    after the copy out of it has finished (its event, recorded ``slots`` transfers earlier: the host
    may run that many transfers ahead of the device before it waits). Every copy is a new device
    tensor (``copy=True``), so nothing sent aliases a buffer."""

    def __init__(self, slots: int = 32):
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self._events: list = [None] * slots
        self._next = 0

    def send(self, flat: torch.Tensor, device: torch.device) -> torch.Tensor:
        i = self._next
        self._next = (i + 1) % len(self.buffers)
        cuda = device.type == "cuda"
        if self._events[i] is not None:
            self._events[i].synchronize()  # the copy out of this slot, long done in a steady run
        buf = self.buffers[i]
        if buf is None or buf.numel() < flat.numel():
            buf = torch.empty(max(flat.numel(), 256), dtype=flat.dtype, pin_memory=cuda)
            self.buffers[i] = buf
        _staged(buf, flat)
        out = buf[: flat.numel()].to(device, non_blocking=True, copy=True)
        if cuda:
            self._events[i] = torch.cuda.Event()
            self._events[i].record()
        return out


@host_side
def _staged(buf: torch.Tensor, flat: torch.Tensor) -> None:
    buf[: flat.numel()].copy_(flat)


_STAGING: dict[torch.device, Staging] = {}


def to_device(tensors: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor]:
    """Host tensors -> ``device`` in ONE copy (from a fixed pinned buffer, :class:`Staging`, sent
    non-blocking on CUDA), so the random parameters of a step cost one transfer and no sync. Packed
    as float32 on the host (float64 arrives as float32, exact for integers below 2**24): floats
    arrive as views of the one buffer; bool and integer dtypes are kept (one conversion each)."""
    device = torch.device(device)
    if not tensors:
        return []
    flat = _packed(tensors)
    if device.type == "cpu":
        sent = flat.to(device, non_blocking=True)  # already there (and a fresh tensor)
    else:
        sent = _STAGING.setdefault(device, Staging()).send(flat, device)
    out, start = [], 0
    for t in tensors:
        part = sent[start : start + t.numel()].view(t.shape)
        start += t.numel()
        if t.dtype == torch.bool:
            out.append(part > 0.5)
        elif t.is_floating_point():
            out.append(part)
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


@full_precision
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
    view 0 of every example is the whole image (no crop). As the original: a crop first, resized
    to the view's size, then flip, affine and perspective about the crop (fill outside the crop)."""

    geometry: torch.Tensor  # (N, 2, 3, 3) output -> crop coordinates: perspective, flip + affine
    crop: torch.Tensor  # (N, 3, 3) crop -> input coordinates (crop_matrix)
    colour: ColourParams
    size: tuple[int, int]

    def __len__(self) -> int:
        return self.geometry.shape[0]

    def __getitem__(self, index: slice) -> ViewParams:
        return ViewParams(
            self.geometry[index], self.crop[index], self.colour.map(lambda t: t[index]), self.size
        )

    def tensors(self) -> list[torch.Tensor]:
        return [self.geometry, self.crop, *self.colour.tensors()]

    @staticmethod
    def from_tensors(tensors: list[torch.Tensor], size: tuple[int, int]) -> ViewParams:
        return ViewParams(tensors[0], tensors[1], ColourParams(*tensors[2:]), size)

    def to(self, device: torch.device | str) -> ViewParams:
        return ViewParams.from_tensors(to_device(self.tensors(), device), self.size)

    @staticmethod
    def cat(parts: list[ViewParams]) -> ViewParams:
        if any(p.size != parts[0].size for p in parts):  # no set: sizes may be symbolic (compiled)
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
        crop = crop_matrix(s, s, cx, cy)
        flip = flip_matrix(_bernoulli(n, cfg.flip_p, gen))
        affine_on = _bernoulli(n, cfg.affine_p, gen)
        zeros = torch.zeros(n, dtype=torch.float64)
        angle = torch.where(affine_on, _uniform(n, -cfg.degrees, cfg.degrees, gen), zeros)
        tx = torch.where(affine_on, _uniform(n, -cfg.translate, cfg.translate, gen), zeros)
        ty = torch.where(affine_on, _uniform(n, -cfg.translate, cfg.translate, gen), zeros)
        affine = flip @ affine_matrix(angle, tx, ty, *size)
        persp_on = _bernoulli(n, cfg.perspective_p, gen)
        shifts = torch.rand(n, 4, 2, generator=gen, dtype=torch.float64) * cfg.distortion
        shifts = torch.where(persp_on.view(n, 1, 1), shifts, torch.zeros_like(shifts))
        # two stages, as the original warps twice: what the perspective moves in from outside the
        # affine's output is filled too (one composed homography would miss it)
        geometry = torch.stack([perspective_matrix(shifts), affine], dim=1)
        colour = ColourParams.draw(n, cfg.jitter_p, cfg.jitter, cfg.grayscale_p, gen)
        return ViewParams(geometry, crop, colour, size)


def _resampled(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``images`` resampled to ``size``, bilinear and antialiased; themselves at their own size (the
    same values: resampling to the same size is the identity). Under torch.compile it always runs,
    so that a graph has no branch on sizes."""
    if torch.compiler.is_compiling() or tuple(size) != tuple(images.shape[-2:]):
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return images


def resample_size(image_hw: tuple[int, int], view_hw: tuple[int, int], min_cover: float) -> tuple[int, int]:
    """The size :func:`make_views` first resamples an (h, w) image to, antialiased, so that the
    smallest crop is resampled at about 1:1 (bilinear warping alone would alias); (h, w) itself
    (resampling to the same size is the identity, exactly) when that would not downscale."""
    (h, w), (vh, vw) = image_hw, view_hw
    base = (max(vh, round(vh / min_cover)), max(vw, round(vw / min_cover)))
    return base if base[0] < h or base[1] < w else (h, w)


@full_precision
def make_views(
    images: torch.Tensor,
    params: ViewParams,
    fill: float,
    min_cover: float,
    base: tuple[int, int] | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B*n, 3, h, w) augmented views in [0, 1], where ``params`` holds
    n views per example in example order (CLIP normalises inside).

    The images are first resampled to ``base`` (default :func:`resample_size`; given, it is decided
    on the host and the resampling always runs: no branch on sizes in a compiled graph).
    """
    b = images.shape[0]
    if len(params) % b:
        raise ValueError(f"{len(params)} views do not split evenly over {b} images")
    h, w = images.shape[-2:]
    if base is None:
        base = resample_size((h, w), params.size, min_cover)
    images = _resampled(images, base)
    if b > 1:
        images = images.repeat_interleave(len(params) // b, dim=0)
    views = warp(images, params.geometry, params.size, fill=fill, crop=params.crop)
    # several RGB images stacked on the channels (B, 3k, H, W) share one warp; colour per image
    return torch.cat([apply_colour(v, params.colour) for v in views.split(3, dim=1)], dim=1)


@full_precision
def resize_view(image: torch.Tensor, short: int, max_long: int) -> torch.Tensor:
    """The un-augmented view (structure loss): (B, 3, H, W) -> (B, 3, h, w) at :func:`view_size`,
    bilinear and not antialiased, as the original's ``T.Resize`` on tensors (torchvision 0.11)."""
    size = view_size(*image.shape[-2:], short, max_long)
    return F.interpolate(image, size=size, mode="bilinear", antialias=False, align_corners=False)


# ---------------------------------------------------------------------------------------------------
# Internal dataset (training examples from the one input)
# ---------------------------------------------------------------------------------------------------
def _bucket(side: float, multiple: int, min_side: int) -> int:
    """Round to the nearest multiple (fixed shapes for compiled graphs), at least ``min_side``."""
    side = max(float(min_side), side)
    if multiple <= 1:
        return round(side)
    return max(-(-min_side // multiple) * multiple, round(side / multiple) * multiple)


@dataclass
class CropDraw:
    """A training crop's random parameters (:class:`ViewParams`: flip, crop box, colour; its size is
    the crop's) and the size the image is first resampled to, antialiased (the image's own size
    when the crop does not downscale: resampling to the same size is the identity, exactly)."""

    params: ViewParams
    resample: tuple[int, int]

    def to(self, device: torch.device | str) -> CropDraw:
        return CropDraw(self.params.to(device), self.resample)  # one transfer


@host_side
def draw_crop(
    hw: tuple[int, int], cfg: DataConfig, gen: torch.Generator, min_side: int, multiple: int = 1
) -> CropDraw:
    """The random choices of :func:`draw_example` for an (h, w) image, on the host."""
    h, w = hw
    scale = float(_uniform(1, cfg.scale_min, cfg.scale_max, gen))
    cover = _uniform(1, cfg.crop_min_cover, 1.0, gen)
    out_h = _bucket(h * scale * float(cover), multiple, min_side)
    out_w = _bucket(w * scale * float(cover), multiple, min_side)
    cy = (1 - cover) * _uniform(1, -1, 1, gen)
    cx = (1 - cover) * _uniform(1, -1, 1, gen)
    crop, flip = crop_matrix(cover, cover, cx, cy), flip_matrix(_bernoulli(1, cfg.flip_p, gen))
    colour = ColourParams.draw(1, cfg.jitter_p, 0.1, 0.0, gen)
    resample = (h, w)
    if out_h < h * float(cover) or out_w < w * float(cover):  # downscaling: antialias first
        resample = (max(out_h, round(out_h / float(cover))), max(out_w, round(out_w / float(cover))))
    return CropDraw(ViewParams(flip, crop, colour, (out_h, out_w)), resample)


@full_precision
def render_crop(image: torch.Tensor, crop: CropDraw) -> torch.Tensor:
    """The training crop ``crop`` (parameters on the image's device) of ``image`` (1, 3, H, W). No
    branch on sizes when compiled: the resampling always runs there."""
    p = crop.params
    return apply_colour(warp(_resampled(image, crop.resample), p.geometry, p.size, crop=p.crop), p.colour)


def draw_example(
    image: torch.Tensor,
    cfg: DataConfig,
    gen: torch.Generator,
    min_side: int,
    multiple: int = 1,
    render=render_crop,
) -> torch.Tensor:
    """One augmented training example from ``image`` (1, 3, H, W): colour jitter, flip, random
    scale, random crop covering ``crop_min_cover``..1 of the scaled image (one cover for both sides,
    as the original's ``RandomSizeCrop``). Sides stay >= ``min_side`` and, with ``multiple`` > 1, the
    crop is resampled to the nearest multiple of it on each side (a few fixed shapes for the fast
    path). The draws on the host (:func:`draw_crop`), then ``render`` (:func:`render_crop`, or a
    compiled version of it) on the image's device."""
    crop = draw_crop(tuple(image.shape[-2:]), cfg, gen, min_side, multiple)
    return render(image, crop.to(image.device))
