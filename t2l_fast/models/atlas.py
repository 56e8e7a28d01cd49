"""Layered atlases of a video as t2l_fast uses them: :class:`AtlasData` (per-pixel UVs, alpha, the
two discretised atlas images) and its texel geometry.

A video is decomposed into a background atlas and a foreground atlas (2D images) plus, for every pixel
p = (x, y, t), a background UV, a foreground UV and a foreground opacity. NLA checkpoints are read and
evaluated once over the whole video by :mod:`t2l_fast.models.nla`; the rest of t2l_fast sees only an
:class:`AtlasData`, which does not depend on NLA: atlases from other sources (the fit of
:mod:`t2l_fast.fit`, analytic test scenes) plug in by building an :class:`AtlasData` directly.

Discretisation: texel (row v, col u) of an R×R grid holds atlas coordinate (u/R + s, v/R + s), with
s = -1 for the background and 0 for the foreground, so atlas coordinate x lies at (fractional) texel
index (x - s)·R. The stored image is the crop [u0, u0 + w) × [v0, v0 + h) that holds every bilinear tap
of every UV the video uses (u0 = floor of the smallest index, u0 + w - 1 = ceil of the largest), so
texel index p in the crop is (x - s)·R - u0. ``grid_sample(align_corners=False)`` samples pixel index p
at normalised g = (2p + 1)/w - 1 (texel centres, the half texel): :meth:`AtlasData.to_grid`.
(The reference Text2LIVE code used g = 2p/w - 1 and so sampled half a texel off; this module does not.)
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F

from t2l_fast.io import InputError, atomic_path

log = logging.getLogger(__name__)

LAYERS = ("background", "foreground")
#: Atlas-coordinate offset s of each layer: texel (v, u) holds (u/R + s, v/R + s).
LAYER_OFFSET = {"background": -1.0, "foreground": 0.0}

#: Identifies files written by :meth:`AtlasData.save`.
ATLAS_FORMAT = "t2l_fast.atlas"
ATLAS_FORMAT_VERSION = 1


class AtlasCheckpointError(InputError):
    """An atlas file or NLA checkpoint that is missing, unreadable or of the wrong format (one-line
    message)."""


# ----------------------------------------------------------------------------------------------
# Internal representation
# ----------------------------------------------------------------------------------------------


class TexelBox(NamedTuple):
    """A crop of the R×R texel grid: columns [u0, u0 + width), rows [v0, v0 + height)."""

    u0: int
    v0: int
    width: int
    height: int


class AtlasLayer(NamedTuple):
    """One layer of an atlas as an edit sees it (:meth:`AtlasData.layer`).

    atlas    (3, h, w)    the discretised (cropped) atlas image in [0, 1]
    uv       (T, H, W, 2) per-pixel atlas coordinates (u, v)
    texels   (T, H, W, 2) the same positions as fractional texel indices into ``atlas`` (u then v)
    opacity  (T, H, W)    the layer's opacity in the frames: the NLA alpha A for the foreground,
                          1 - A for the background (the object occludes it). An edit sampled into the
                          frames is multiplied by it; the video is ``A·fg + (1 - A)·bg``.
    """

    name: str
    atlas: torch.Tensor
    uv: torch.Tensor
    texels: torch.Tensor
    opacity: torch.Tensor

    def grid(self, index: slice = slice(None)) -> torch.Tensor:
        """``grid_sample`` coordinates into ``atlas`` of the frames ``index``: (t, H, W, 2)."""
        h, w = self.atlas.shape[-2:]
        return texels_to_grid(self.texels[index], (0, 0), (w, h))


def _check_layer(name: str) -> float:
    if name not in LAYER_OFFSET:
        raise ValueError(f"unknown atlas layer {name!r}; expected one of {LAYERS}")
    return LAYER_OFFSET[name]


def texel_box(uv: torch.Tensor, layer: str, grid: int) -> TexelBox:
    """Smallest texel crop holding every bilinear tap of ``uv`` (…, 2) of ``layer`` on an R×R grid."""
    s = _check_layer(layer)
    flat = uv.reshape(-1, 2)
    if flat.shape[0] == 0:
        raise ValueError("no UVs to bound")
    lo = ((flat.amin(dim=0).float() - s) * grid).floor()
    hi = ((flat.amax(dim=0).float() - s) * grid).ceil()
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError(f"{layer} UVs are not finite")
    u0, v0 = int(lo[0]), int(lo[1])
    return TexelBox(u0, v0, int(hi[0]) - u0 + 1, int(hi[1]) - v0 + 1)


def texels_to_grid(
    texels: torch.Tensor, origin: tuple[float, float], size: tuple[float, float]
) -> torch.Tensor:
    """Fractional texel indices (…, 2) -> ``grid_sample`` coordinates (x then y, align_corners=False)
    of the crop of ``size`` (width, height) starting at texel ``origin`` (u0, v0): index p maps to
    (2(p - origin) + 1)/size - 1, so texel centres are hit exactly (mind the half texel)."""
    u = (2 * (texels[..., 0] - origin[0]) + 1) / size[0] - 1
    v = (2 * (texels[..., 1] - origin[1]) + 1) / size[1] - 1
    return torch.stack([u, v], dim=-1)


def texel_coords(box: TexelBox, layer: str, grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Atlas coordinates of the texel centres of ``box``: (height, width, 2), [..., 0] = u, [..., 1] = v."""
    s = _check_layer(layer)
    u = torch.arange(box.u0, box.u0 + box.width, device=device).float() / grid + s  # (w,)
    v = torch.arange(box.v0, box.v0 + box.height, device=device).float() / grid + s  # (h,)
    return torch.stack(torch.meshgrid(u, v, indexing="xy"), dim=-1)  # (h, w, 2)


@dataclass
class AtlasData:
    """A video's two atlases and per-pixel mappings, independent of how they were obtained.

    Fields (float32, all on one device):
        uv_background    (T, H, W, 2)  background atlas coordinates (u, v) of every pixel
        uv_foreground    (T, H, W, 2)  foreground atlas coordinates of every pixel
        alpha            (T, H, W)     foreground opacity A; a frame is A·fg + (1 - A)·bg
        background_atlas (3, hb, wb)   discretised background atlas in [0, 1], cropped to background_box
        foreground_atlas (3, hf, wf)   discretised foreground atlas in [0, 1], cropped to foreground_box
        background_box / foreground_box  the crops' texel boxes (width = w, height = h of the image)
        grid             R: texel (v, u) of the full grid holds (u/R + s, v/R + s), s = -1 bg, 0 fg
        meta             JSON-serialisable information on the atlas's origin (e.g. ``trained_frames``,
                         ``source``, fit statistics); kept by :meth:`save` / :meth:`load`

    Saved with :meth:`save` as safetensors (the five tensors) with the boxes, grid, frame size and
    ``meta`` as JSON in the header; :meth:`load` reads it back.
    """

    uv_background: torch.Tensor
    uv_foreground: torch.Tensor
    alpha: torch.Tensor
    background_atlas: torch.Tensor
    foreground_atlas: torch.Tensor
    background_box: TexelBox
    foreground_box: TexelBox
    grid: int = 2000
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.background_box = TexelBox(*self.background_box)
        self.foreground_box = TexelBox(*self.foreground_box)
        if self.uv_background.dim() != 4 or self.uv_background.shape[-1] != 2:
            raise ValueError(f"uv_background must be (T, H, W, 2), got {tuple(self.uv_background.shape)}")
        t, h, w, _ = self.uv_background.shape
        if tuple(self.uv_foreground.shape) != (t, h, w, 2):
            raise ValueError(f"uv_foreground must be {(t, h, w, 2)}, got {tuple(self.uv_foreground.shape)}")
        if tuple(self.alpha.shape) != (t, h, w):
            raise ValueError(f"alpha must be {(t, h, w)}, got {tuple(self.alpha.shape)}")
        for name in LAYERS:
            img, box = self.atlas_image(name), self.box(name)
            if img.dim() != 3 or tuple(img.shape[1:]) != (box.height, box.width):
                raise ValueError(
                    f"{name}_atlas must be (C, {box.height}, {box.width}) to match its box, "
                    f"got {tuple(img.shape)}"
                )
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")

    # -- shapes -------------------------------------------------------------------------------
    @property
    def num_frames(self) -> int:
        return self.uv_background.shape[0]

    @property
    def height(self) -> int:
        return self.uv_background.shape[1]

    @property
    def width(self) -> int:
        return self.uv_background.shape[2]

    @property
    def device(self) -> torch.device:
        return self.uv_background.device

    @staticmethod
    def from_layers(
        uv: dict[str, torch.Tensor],
        alpha: torch.Tensor,
        images: dict[str, torch.Tensor],
        boxes: dict[str, TexelBox],
        grid: int,
        meta: dict | None = None,
    ) -> AtlasData:
        """An atlas from per-layer dicts ({"background": ..., "foreground": ...}) of UVs, atlas images
        and texel boxes."""
        return AtlasData(
            uv_background=uv["background"],
            uv_foreground=uv["foreground"],
            alpha=alpha,
            background_atlas=images["background"],
            foreground_atlas=images["foreground"],
            background_box=boxes["background"],
            foreground_box=boxes["foreground"],
            grid=grid,
            meta=meta or {},
        )

    def to(self, device: torch.device | str) -> AtlasData:
        """A copy with every tensor on ``device``."""
        return AtlasData(
            self.uv_background.to(device),
            self.uv_foreground.to(device),
            self.alpha.to(device),
            self.background_atlas.to(device),
            self.foreground_atlas.to(device),
            self.background_box,
            self.foreground_box,
            self.grid,
            dict(self.meta),
        )

    # -- saving and loading -------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write the atlas to ``path`` (``.safetensors``), atomically (temp file + rename).

        Tensors: ``uv_background``, ``uv_foreground`` (T, H, W, 2) float32, ``alpha`` (T, H, W) float16
        (opacity needs no more), ``background_atlas`` / ``foreground_atlas`` (3, h, w) float32. Header
        metadata ``t2l_fast_atlas``: JSON with format version, grid, both boxes, frame size
        [width, height], frame count and ``meta``. Returns the path written.
        """
        from safetensors.torch import save_file

        tensors = {
            "uv_background": self.uv_background.detach().float().cpu().contiguous(),
            "uv_foreground": self.uv_foreground.detach().float().cpu().contiguous(),
            "alpha": self.alpha.detach().cpu().to(torch.float16).contiguous(),
            "background_atlas": self.background_atlas.detach().float().cpu().contiguous(),
            "foreground_atlas": self.foreground_atlas.detach().float().cpu().contiguous(),
        }
        header = {
            "format": ATLAS_FORMAT,
            "version": ATLAS_FORMAT_VERSION,
            "grid": int(self.grid),
            "background_box": list(self.background_box),
            "foreground_box": list(self.foreground_box),
            "frame_size": [self.width, self.height],
            "num_frames": self.num_frames,
            "meta": self.meta,
        }
        path = os.fspath(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"t2l_fast_atlas": json.dumps(header)})
        log.info("saved atlas (%d frames of %dx%d) to %s", self.num_frames, self.width, self.height, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> AtlasData:
        """Read an atlas written by :meth:`save` (float32 tensors on ``device``).

        Raises :class:`AtlasCheckpointError` (an :class:`~t2l_fast.io.InputError`) with a one-line
        message for a missing file, a file that is not a t2l_fast atlas, or inconsistent contents.
        """
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise AtlasCheckpointError(f"atlas file not found: {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                raw = (f.metadata() or {}).get("t2l_fast_atlas")
                names = set(f.keys())
                tensors = {k: f.get_tensor(k) for k in names}
        except (SafetensorError, OSError, ValueError) as e:
            raise AtlasCheckpointError(f"not a readable safetensors atlas: {path} ({e})") from e
        if raw is None:
            raise AtlasCheckpointError(f"{path} is a safetensors file but not a t2l_fast atlas (no header)")
        try:
            header = json.loads(raw)
        except json.JSONDecodeError as e:
            raise AtlasCheckpointError(f"{path}: atlas header is not valid JSON ({e})") from e
        if header.get("format") != ATLAS_FORMAT or int(header.get("version", -1)) > ATLAS_FORMAT_VERSION:
            raise AtlasCheckpointError(
                f"{path}: unsupported atlas format {header.get('format')!r} version {header.get('version')}"
            )
        required = {"uv_background", "uv_foreground", "alpha", "background_atlas", "foreground_atlas"}
        missing = sorted(required - names)
        if missing:
            raise AtlasCheckpointError(f"{path}: atlas is missing tensor(s) {', '.join(missing)}")
        try:
            atlas = cls(
                uv_background=tensors["uv_background"].float(),
                uv_foreground=tensors["uv_foreground"].float(),
                alpha=tensors["alpha"].float(),
                background_atlas=tensors["background_atlas"].float(),
                foreground_atlas=tensors["foreground_atlas"].float(),
                background_box=TexelBox(*header["background_box"]),
                foreground_box=TexelBox(*header["foreground_box"]),
                grid=int(header["grid"]),
                meta=dict(header.get("meta") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise AtlasCheckpointError(f"{path}: inconsistent atlas ({e})") from e
        return atlas.to(device)

    # -- frames -------------------------------------------------------------------------------
    def frames(self, index: slice) -> AtlasData:
        """The same atlas over the frames ``index`` (the atlas images and metadata are shared)."""
        return replace(
            self,
            uv_background=self.uv_background[index],
            uv_foreground=self.uv_foreground[index],
            alpha=self.alpha[index],
        )

    def chunks(self, size: int = 8) -> Iterator[slice]:
        """Slices of at most ``size`` frames covering the video: bounds the memory of per-pixel work."""
        for t0 in range(0, self.num_frames, size):
            yield slice(t0, min(self.num_frames, t0 + size))

    # -- per layer ----------------------------------------------------------------------------
    def atlas_image(self, layer: str) -> torch.Tensor:
        """The cropped atlas image of ``layer``: (3, h, w)."""
        _check_layer(layer)
        return self.background_atlas if layer == "background" else self.foreground_atlas

    def box(self, layer: str) -> TexelBox:
        _check_layer(layer)
        return self.background_box if layer == "background" else self.foreground_box

    def uv(self, layer: str) -> torch.Tensor:
        """Per-pixel atlas coordinates of ``layer``: (T, H, W, 2)."""
        _check_layer(layer)
        return self.uv_background if layer == "background" else self.uv_foreground

    def to_texel(self, uv: torch.Tensor, layer: str) -> torch.Tensor:
        """Atlas coordinates (…, 2) -> fractional texel indices (…, 2) in the crop: (x - s)·R - (u0, v0)."""
        s, box = _check_layer(layer), self.box(layer)
        origin = torch.tensor([box.u0, box.v0], dtype=torch.float32, device=uv.device)
        return (uv.float() - s) * self.grid - origin

    def to_grid(self, uv: torch.Tensor, layer: str) -> torch.Tensor:
        """Atlas coordinates (…, 2) -> ``grid_sample`` coordinates (…, 2) of the cropped atlas image.

        x then y in [-1, 1] with align_corners=False: texel index p maps to (2p + 1)/size - 1, so texel
        centres are hit exactly (mind the half texel).
        """
        box = self.box(layer)
        return texels_to_grid(self.to_texel(uv, layer), (0, 0), (box.width, box.height))

    def texel_coords(self, layer: str) -> torch.Tensor:
        """Atlas coordinates of the texel centres of the cropped atlas image: (h, w, 2)."""
        return texel_coords(self.box(layer), layer, self.grid, self.device)

    def layer(self, name: str) -> AtlasLayer:
        """Atlas image, UVs, texel indices and opacity of ``name`` (see :class:`AtlasLayer`)."""
        uv = self.uv(name)
        opacity = self.alpha if name == "foreground" else 1 - self.alpha
        return AtlasLayer(name, self.atlas_image(name), uv, self.to_texel(uv, name), opacity)

    @torch.no_grad()
    def sample(
        self, layer: str, image: torch.Tensor | None = None, frames_per_chunk: int = 8
    ) -> torch.Tensor:
        """Sample an atlas-aligned image (default: the layer's atlas) at every pixel's UV.

        Args:
            layer: "background" or "foreground".
            image: (C, h, w) aligned with the layer's crop (e.g. an edited atlas); bilinear, zero padding.
            frames_per_chunk: frames per ``grid_sample`` call (bounds the temporary memory).
        Returns:
            (T, C, H, W) float32. For the background atlas this is the NLA reconstruction of the video.
        """
        image = self.atlas_image(layer) if image is None else image
        box = self.box(layer)
        if image.dim() != 3 or tuple(image.shape[1:]) != (box.height, box.width):
            raise ValueError(f"image must be (C, {box.height}, {box.width}), got {tuple(image.shape)}")
        uv = self.uv(layer)
        out = torch.empty(
            (self.num_frames, image.shape[0], self.height, self.width), dtype=torch.float32, device=uv.device
        )
        img = image.float().to(uv.device).unsqueeze(0)
        for sl in self.chunks(frames_per_chunk):
            g = self.to_grid(uv[sl], layer)  # (n, H, W, 2)
            out[sl] = F.grid_sample(
                img.expand(g.shape[0], -1, -1, -1),
                g,
                mode="bilinear",
                padding_mode="zeros",
                align_corners=False,
            )
        return out

    def uv_mask(self, layer: str) -> torch.Tensor:
        """(h, w) bool: the texels of the cropped atlas that some pixel's bilinear taps touch."""
        box = self.box(layer)
        p = self.to_texel(self.uv(layer), layer).reshape(-1, 2)
        mask = torch.zeros(box.height * box.width, dtype=torch.bool, device=p.device)
        for fu in (torch.floor, torch.ceil):
            for fv in (torch.floor, torch.ceil):
                u = fu(p[:, 0]).long().clamp(0, box.width - 1)
                v = fv(p[:, 1]).long().clamp(0, box.height - 1)
                mask[v * box.width + u] = True
        return mask.view(box.height, box.width)

    def composite(self, foreground: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
        """A·fg + (1 - A)·bg for (T, C, H, W) layer renderings (e.g. each edit composited over the frames)."""
        a = self.alpha.unsqueeze(1).to(foreground.dtype)
        return a * foreground + (1.0 - a) * background

    def foreground_empty_frames(self, threshold: float = 0.95) -> list[int]:
        """Frames without a single pixel of alpha >= ``threshold`` (no foreground crop can be found there)."""
        has = (self.alpha >= threshold).flatten(1).any(dim=1)
        return [int(i) for i in torch.nonzero(~has).flatten()]

    def foreground_is_empty(self, threshold: float = 0.95) -> bool:
        """True when no pixel of any frame has alpha >= ``threshold`` (0.95: the reference's mask cut)."""
        return not bool((self.alpha >= threshold).any())
