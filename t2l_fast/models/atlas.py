"""Layered neural atlases (NLA, Kasten et al. 2021): checkpoint I/O, per-pixel UVs, discretised atlases.

A video is decomposed into a background atlas and a foreground atlas (2D images) plus, for every pixel
p = (x, y, t), a background UV, a foreground UV and a foreground opacity. This module reads the
original NLA checkpoint format, evaluates its networks once over the whole video (:func:`precompute_atlas`)
and hands the rest of t2l_fast an :class:`AtlasData`, which does not depend on NLA: atlases from other
sources (hash-grid successors, analytic test scenes) plug in by building an :class:`AtlasData` directly.

Networks (all :class:`NLAMLP`: ReLU between linear layers, tanh at the end; a skip layer concatenates the
encoded input to its input; positional encoding is, for k in 0..F-1, sin(2^k π x_d) for every input d,
then cos(2^k π x_d) for every d, the raw input not included)

    foreground mapping M_f  (x, y, t) -> 2   width 256, 6 layers, no encoding
    background mapping M_b  (x, y, t) -> 2   width 256, 4 layers, no encoding
    atlas              A    (u, v)    -> 3   width 256, 8 layers, 10 frequencies, skips at layers 4 and 7
    alpha              M_a  (x, y, t) -> 1   width 256, 8 layers, 5 frequencies

Widths, depths, encodings and skip layers are inferred from the state-dict shapes when loading.

Coordinates (the original's): pixel column x and row y are divided by max(W, H)/2 and shifted by -1
(x/384 - 1, y/384 - 1 for 768x432 frames); frame t becomes t/(T/2) - 1 with T the number of frames the
atlas was *trained* on. Background UV = 0.5·M_b - 0.5 (in [-1, 0]²), foreground UV = 0.5·M_f + 0.5
(in [0, 1]²), both of the same atlas MLP; alpha = 0.99·0.5·(M_a + 1) + 0.001; colour = (A + 1)/2.

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
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from t2l_fast.io import InputError, atomic_path

log = logging.getLogger(__name__)

LAYERS = ("background", "foreground")
#: Atlas-coordinate offset s of each layer: texel (v, u) holds (u/R + s, v/R + s).
LAYER_OFFSET = {"background": -1.0, "foreground": 0.0}

KEY_FOREGROUND_MAPPING = "model_F_mapping1_state_dict"
KEY_BACKGROUND_MAPPING = "model_F_mapping2_state_dict"
KEY_ATLAS = "F_atlas_state_dict"
KEY_ALPHA = "model_F_alpha_state_dict"
#: The four network entries of an NLA checkpoint, with (input dims, output dims) of each network.
MODEL_KEYS = {
    KEY_FOREGROUND_MAPPING: (3, 2),
    KEY_BACKGROUND_MAPPING: (3, 2),
    KEY_ATLAS: (2, 3),
    KEY_ALPHA: (3, 1),
}


#: Identifies files written by :meth:`AtlasData.save`.
ATLAS_FORMAT = "t2l_fast.atlas"
ATLAS_FORMAT_VERSION = 1


class AtlasCheckpointError(InputError):
    """An NLA checkpoint that is missing, unreadable or of the wrong format (one-line message)."""


# ----------------------------------------------------------------------------------------------
# Networks
# ----------------------------------------------------------------------------------------------


def positional_encoding(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """NLA positional encoding.

    Args:
        x: (N, d) coordinates.
        freqs: (F,) angular frequencies 2^k·π.
    Returns:
        (N, 2·d·F): for each k, [sin(f_k x_0) .. sin(f_k x_{d-1}), cos(f_k x_0) .. cos(f_k x_{d-1})].
    """
    proj = x.unsqueeze(1) * freqs.view(1, -1, 1)  # (N, F, d)
    return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1).reshape(x.shape[0], -1)  # (N, F·2d)


class NLAMLP(nn.Module):
    """The NLA coordinate MLP: optional positional encoding, ReLU MLP with skip inputs, tanh output.

    State-dict keys are ``hidden.{i}.weight`` / ``hidden.{i}.bias`` as in the original checkpoints (the
    frequency table is a non-persistent buffer, so it is not saved).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        width: int = 256,
        num_layers: int = 8,
        pe_freqs: int = 0,
        skip_layers: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        bad = [i for i in skip_layers if not 0 < i < num_layers]
        if bad:
            raise ValueError(f"skip layers {bad} outside 1..{num_layers - 1}")
        self.in_dim, self.out_dim, self.width = in_dim, out_dim, width
        self.num_layers, self.pe_freqs = num_layers, pe_freqs
        self.skip_layers = tuple(sorted(set(skip_layers)))
        freqs = torch.tensor([(2.0**k) * math.pi for k in range(pe_freqs)], dtype=torch.float32)
        self.register_buffer("freqs", freqs, persistent=False)
        enc = self.encoding_dim
        self.hidden = nn.ModuleList()
        for i in range(num_layers):
            fan_in = enc if i == 0 else width + (enc if i in self.skip_layers else 0)
            fan_out = out_dim if i == num_layers - 1 else width
            self.hidden.append(nn.Linear(fan_in, fan_out))

    @property
    def encoding_dim(self) -> int:
        """Size of the encoded input: 2·in_dim·F with positional encoding, in_dim without."""
        return 2 * self.in_dim * self.pe_freqs if self.pe_freqs else self.in_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, encoding_dim)."""
        return positional_encoding(x, self.freqs) if self.pe_freqs else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim) in [-1, 1]."""
        enc = self.encode(x)
        h = enc
        for i, layer in enumerate(self.hidden):
            if i > 0:
                h = F.relu(h)
            if i in self.skip_layers:
                h = torch.cat([h, enc], dim=1)
            h = layer(h)
        return torch.tanh(h)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, width={self.width}, "
            f"num_layers={self.num_layers}, pe_freqs={self.pe_freqs}, skip_layers={self.skip_layers}"
        )

    @classmethod
    def from_state_dict(cls, state: dict, in_dim: int, out_dim: int, name: str = "state_dict") -> NLAMLP:
        """Build the network whose architecture the shapes of ``state`` imply, and load it.

        Raises :class:`AtlasCheckpointError` naming ``name`` and the offending key for a missing key, an
        unexpected key or a shape that fits no NLA architecture with these input/output sizes.
        """
        if not isinstance(state, dict):
            raise AtlasCheckpointError(f"{name} is a {type(state).__name__}, not a state dict")
        indices = [
            int(m.group(1)) for k in state if (m := re.fullmatch(r"hidden\.(\d+)\.(?:weight|bias)", str(k)))
        ]
        num_layers = max(indices, default=0) + 1  # a gap in the numbering is reported as missing keys
        expected = {f"hidden.{i}.{p}" for i in range(num_layers) for p in ("weight", "bias")}
        missing = sorted(expected - state.keys())
        if missing:
            raise AtlasCheckpointError(f"{name} is missing key(s) {', '.join(repr(k) for k in missing)}")
        unexpected = sorted(state.keys() - expected)
        if unexpected:
            raise AtlasCheckpointError(
                f"{name} has unexpected key(s) {', '.join(repr(k) for k in unexpected)}"
            )
        for key in sorted(expected):
            if not isinstance(state[key], torch.Tensor):
                raise AtlasCheckpointError(f"{name}: '{key}' is a {type(state[key]).__name__}, not a tensor")

        def shape_error(key: str, want: str) -> AtlasCheckpointError:
            return AtlasCheckpointError(
                f"{name}: '{key}' has shape {tuple(state[key].shape)}, expected {want}"
            )

        w0 = state["hidden.0.weight"]
        if w0.dim() != 2:
            raise shape_error("hidden.0.weight", "a 2-D weight")
        enc = w0.shape[1]
        if enc == in_dim:
            pe_freqs = 0
        elif enc % (2 * in_dim) == 0:
            pe_freqs = enc // (2 * in_dim)
        else:
            raise shape_error("hidden.0.weight", f"(width, {in_dim}) or (width, 2·{in_dim}·frequencies)")
        width = w0.shape[0] if num_layers > 1 else 0
        skips = []
        for i in range(num_layers):
            wkey, bkey = f"hidden.{i}.weight", f"hidden.{i}.bias"
            fan_out = out_dim if i == num_layers - 1 else width
            if i == 0:
                fan_ins: tuple[int, ...] = (enc,)
            else:
                fan_ins = (width, width + enc)
            w, b = state[wkey], state[bkey]
            if w.dim() != 2 or w.shape[0] != fan_out or w.shape[1] not in fan_ins:
                want = " or ".join(str((fan_out, f)) for f in fan_ins)
                raise shape_error(wkey, want)
            if tuple(b.shape) != (fan_out,):
                raise shape_error(bkey, str((fan_out,)))
            if i > 0 and w.shape[1] == width + enc:
                skips.append(i)
        net = cls(
            in_dim,
            out_dim,
            width=max(width, 1),
            num_layers=num_layers,
            pe_freqs=pe_freqs,
            skip_layers=tuple(skips),
        )
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return net


@dataclass
class NLAModels:
    """The four NLA networks. Any module mapping (N, in) -> (N, out) in [-1, 1] fits a slot (tests put
    analytic functions there); loading and saving need :class:`NLAMLP` state dicts."""

    foreground_mapping: nn.Module  # (N, 3) xyt -> (N, 2)
    background_mapping: nn.Module  # (N, 3) xyt -> (N, 2)
    atlas: nn.Module  # (N, 2) uv -> (N, 3)
    alpha: nn.Module  # (N, 3) xyt -> (N, 1)

    @classmethod
    def create(cls, width: int = 256, seed: int | None = None) -> NLAModels:
        """Randomly initialised networks with the original architectures (for tests and synthetic scenes)."""
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            models = cls(
                foreground_mapping=NLAMLP(3, 2, width, num_layers=6),
                background_mapping=NLAMLP(3, 2, width, num_layers=4),
                atlas=NLAMLP(2, 3, width, num_layers=8, pe_freqs=10, skip_layers=(4, 7)),
                alpha=NLAMLP(3, 1, width, num_layers=8, pe_freqs=5),
            )
        return models.eval()

    def modules(self) -> dict[str, nn.Module]:
        """Checkpoint key -> network."""
        return {
            KEY_FOREGROUND_MAPPING: self.foreground_mapping,
            KEY_BACKGROUND_MAPPING: self.background_mapping,
            KEY_ATLAS: self.atlas,
            KEY_ALPHA: self.alpha,
        }

    def to(self, device: torch.device | str) -> NLAModels:
        """Move every network to ``device`` (in place); returns self."""
        for m in self.modules().values():
            m.to(device)
        return self

    def eval(self) -> NLAModels:
        """Eval mode, no gradients (in place); returns self."""
        for m in self.modules().values():
            m.eval().requires_grad_(False)
        return self

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for parameter-free modules)."""
        for m in self.modules().values():
            for t in list(m.parameters()) + list(m.buffers()):
                return t.device
        return torch.device("cpu")


def load_nla_checkpoint(path: str | os.PathLike, device: torch.device | str = "cpu") -> NLAModels:
    """Load an original NLA checkpoint (``torch.save`` dict) safely (``weights_only=True``).

    Only the four network entries are required; ``iteration`` and ``optimizer_all_state_dict`` are
    ignored if present (checkpoints stripped of the optimiser load too). Raises
    :class:`AtlasCheckpointError` (an :class:`~t2l_fast.io.InputError`) with a one-line message for a
    missing file, a file that is not a checkpoint, missing keys and mismatched shapes.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AtlasCheckpointError(f"NLA checkpoint not found: {path}")
    if os.path.isdir(path):
        raise AtlasCheckpointError(f"NLA checkpoint path is a folder, expected a file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip / EOF errors all mean "not a checkpoint we can read"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AtlasCheckpointError(
            f"not a readable NLA checkpoint (torch.save dict of tensors): {path} ({first[:200]})"
        ) from e
    if not isinstance(ckpt, dict):
        raise AtlasCheckpointError(f"not an NLA checkpoint: {path} holds a {type(ckpt).__name__}, not a dict")
    missing = [k for k in MODEL_KEYS if k not in ckpt]
    if missing:
        raise AtlasCheckpointError(f"NLA checkpoint {path} is missing key(s) {', '.join(missing)}")
    nets = {
        key: NLAMLP.from_state_dict(ckpt[key], in_dim, out_dim, name=key)
        for key, (in_dim, out_dim) in MODEL_KEYS.items()
    }
    log.info("loaded NLA checkpoint %s (iteration %s)", path, ckpt.get("iteration", "unknown"))
    models = NLAModels(
        foreground_mapping=nets[KEY_FOREGROUND_MAPPING],
        background_mapping=nets[KEY_BACKGROUND_MAPPING],
        atlas=nets[KEY_ATLAS],
        alpha=nets[KEY_ALPHA],
    )
    return models.eval().to(device)


def save_nla_checkpoint(
    path: str | os.PathLike,
    models: NLAModels,
    iteration: int = 0,
    optimizer_state: dict | None = None,
) -> None:
    """Write ``models`` in the original NLA checkpoint format, atomically (temp file + rename).

    The dict holds the four ``*_state_dict`` entries (CPU tensors), ``iteration`` and
    ``optimizer_all_state_dict`` (``optimizer_state``, an empty dict by default).
    """
    ckpt: dict = {
        key: {k: v.detach().cpu() for k, v in module.state_dict().items()}
        for key, module in models.modules().items()
    }
    ckpt["iteration"] = int(iteration)
    ckpt["optimizer_all_state_dict"] = optimizer_state if optimizer_state is not None else {}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    log.info("saved NLA checkpoint %s", path)


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


# ----------------------------------------------------------------------------------------------
# Precomputation from NLA networks
# ----------------------------------------------------------------------------------------------


def _texel_chunk(
    box: TexelBox, layer: str, grid: int, i0: int, i1: int, device: torch.device
) -> torch.Tensor:
    """Atlas coordinates (i1 - i0, 2) of the texels with row-major indices [i0, i1) in ``box``."""
    s = LAYER_OFFSET[layer]
    idx = torch.arange(i0, i1, device=device)
    u = (idx % box.width + box.u0).float() / grid + s
    v = (idx // box.width + box.v0).float() / grid + s
    return torch.stack([u, v], dim=1)


@torch.no_grad()
def precompute_atlas(
    models: NLAModels,
    num_frames: int,
    height: int,
    width: int,
    grid: int = 2000,
    chunk: int = 65536,
    trained_frames: int | None = None,
    trained_size: tuple[int, int] | None = None,
) -> AtlasData:
    """Evaluate the NLA networks once over a whole video and discretise both atlases.

    The mapping and alpha networks run over all T·H·W pixels in chunks of ``chunk`` pixels, and the atlas
    network over each layer's cropped texel grid in chunks of ``chunk`` texels, so peak memory beyond the
    outputs is one chunk's activations whatever the frame count. Runs on the device of ``models``.

    Args:
        models: the networks (see :func:`load_nla_checkpoint`).
        num_frames, height, width: the frames to map (T, H, W); frame t is the checkpoint's frame t.
        grid: atlas resolution R (texels per unit of atlas coordinate; 2000 in the reference).
        chunk: points per network call.
        trained_frames: number of frames the atlas was trained on (the checkpoint does not store it);
            frame coordinates are t/(trained_frames/2) - 1. Defaults to ``num_frames``, i.e. the video is
            assumed to be the one the atlas was trained on, whole. Editing only the first frames of a
            longer atlas needs the true value, or every frame maps to the wrong time.
        trained_size: (width, height) of the frames the atlas was trained on (768×432 in the reference).
            Defaults to (width, height). When it differs, pixel centres are rescaled to the trained
            pixel grid before normalising (same aspect ratio expected).
    Returns:
        :class:`AtlasData` with tensors on the models' device.
    Raises:
        InputError: more frames requested than the atlas was trained on, or bad sizes.
    """
    if num_frames < 1 or height < 1 or width < 1:
        raise InputError(f"video size must be positive, got {num_frames} frames of {width}x{height}")
    trained_frames = num_frames if trained_frames is None else int(trained_frames)
    if num_frames > trained_frames:
        raise InputError(
            f"the video has {num_frames} frames but the atlas was trained on {trained_frames}; "
            f"use at most {trained_frames} frames (max_frames) or pass the right trained frame count"
        )
    if grid < 2 or chunk < 1:
        raise ValueError(f"grid must be >= 2 and chunk >= 1, got grid={grid}, chunk={chunk}")
    tw, th = (width, height) if trained_size is None else (int(trained_size[0]), int(trained_size[1]))
    if tw < 1 or th < 1:
        raise InputError(f"trained_size must be positive, got {trained_size}")
    device = models.device
    start = time.perf_counter()

    half = max(tw, th) / 2.0
    half_t = trained_frames / 2.0
    rescale = (tw, th) != (width, height)
    hw = height * width
    n = num_frames * hw

    def xyt(i0: int, i1: int) -> torch.Tensor:
        idx = torch.arange(i0, i1, device=device)
        t, rem = idx // hw, idx % hw
        y, x = rem // width, rem % width
        xf, yf = x.float(), y.float()
        if rescale:  # pixel centre of the requested grid -> pixel index on the trained grid
            xf = (xf + 0.5) * (tw / width) - 0.5
            yf = (yf + 0.5) * (th / height) - 0.5
        return torch.stack([xf / half - 1.0, yf / half - 1.0, t.float() / half_t - 1.0], dim=1)  # (n, 3)

    uv_bg = torch.empty((n, 2), dtype=torch.float32, device=device)
    uv_fg = torch.empty((n, 2), dtype=torch.float32, device=device)
    alpha = torch.empty((n, 1), dtype=torch.float32, device=device)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        c = xyt(i0, i1)
        uv_bg[i0:i1] = models.background_mapping(c).float() * 0.5 - 0.5
        uv_fg[i0:i1] = models.foreground_mapping(c).float() * 0.5 + 0.5
        alpha[i0:i1] = 0.99 * (0.5 * (models.alpha(c).float() + 1.0)) + 0.001
    uv_bg = uv_bg.view(num_frames, height, width, 2)
    uv_fg = uv_fg.view(num_frames, height, width, 2)
    alpha = alpha.view(num_frames, height, width)

    atlases, boxes = {}, {}
    for layer, uv in (("background", uv_bg), ("foreground", uv_fg)):
        box = texel_box(uv, layer, grid)
        n_tex = box.height * box.width
        rgb = torch.empty((n_tex, 3), dtype=torch.float32, device=device)
        for i0 in range(0, n_tex, chunk):
            i1 = min(n_tex, i0 + chunk)
            rgb[i0:i1] = models.atlas(_texel_chunk(box, layer, grid, i0, i1, device)).float()
        atlases[layer] = ((rgb + 1.0) * 0.5).view(box.height, box.width, 3).permute(2, 0, 1).contiguous()
        boxes[layer] = box
    log.info(
        "precomputed atlas for %d frames of %dx%d in %.1f s (crops: bg %dx%d, fg %dx%d, R=%d)",
        num_frames,
        width,
        height,
        time.perf_counter() - start,
        boxes["background"].width,
        boxes["background"].height,
        boxes["foreground"].width,
        boxes["foreground"].height,
        grid,
    )
    return AtlasData.from_layers({"background": uv_bg, "foreground": uv_fg}, alpha, atlases, boxes, grid)
