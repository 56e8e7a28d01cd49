"""Layered neural atlases (NLA, Kasten et al. 2021): the networks, the original checkpoint format, and
their evaluation over a whole video into an :class:`~t2l_fast.models.atlas.AtlasData`
(:func:`precompute_atlas`).

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
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from t2l_fast.io import InputError, atomic_path

from .atlas import LAYER_OFFSET, AtlasCheckpointError, AtlasData, TexelBox, texel_box

log = logging.getLogger(__name__)

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
    start = time.perf_counter()
    uv_bg, uv_fg, alpha = _map_pixels(models, (num_frames, height, width), trained_frames, (tw, th), chunk)
    uvs = {"background": uv_bg, "foreground": uv_fg}
    atlases, boxes = {}, {}
    for layer, uv in uvs.items():
        boxes[layer] = box = texel_box(uv, layer, grid)
        atlases[layer] = _discretise(models.atlas, box, layer, grid, chunk, models.device)
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
    return AtlasData.from_layers(uvs, alpha, atlases, boxes, grid)


def _map_pixels(
    models: NLAModels,
    shape: tuple[int, int, int],
    trained_frames: int,
    trained_size: tuple[int, int],
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The mapping and alpha networks over every pixel of the (T, H, W) video, ``chunk`` pixels a
    call -> background UVs (T, H, W, 2), foreground UVs (T, H, W, 2), alpha (T, H, W)."""
    num_frames, height, width = shape
    tw, th = trained_size
    device = models.device
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
    return (
        uv_bg.view(num_frames, height, width, 2),
        uv_fg.view(num_frames, height, width, 2),
        alpha.view(num_frames, height, width),
    )


def _discretise(
    atlas: nn.Module, box: TexelBox, layer: str, grid: int, chunk: int, device: torch.device
) -> torch.Tensor:
    """The atlas network over the texels of ``box``, ``chunk`` texels a call -> (3, h, w) in [0, 1]."""
    n_tex = box.height * box.width
    rgb = torch.empty((n_tex, 3), dtype=torch.float32, device=device)
    for i0 in range(0, n_tex, chunk):
        i1 = min(n_tex, i0 + chunk)
        rgb[i0:i1] = atlas(_texel_chunk(box, layer, grid, i0, i1, device)).float()
    return ((rgb + 1.0) * 0.5).view(box.height, box.width, 3).permute(2, 0, 1).contiguous()
