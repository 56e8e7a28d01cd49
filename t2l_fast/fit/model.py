"""The layered atlas model that :func:`t2l_fast.fit.fit_atlas` optimises: dense multiresolution grids in
plain PyTorch (``grid_sample``), no MLPs, no compiled extensions.

For each layer L (background, and foreground when masks are given) and pixel p = (x, y) of frame t:

    mapping   M_L(p, t) = s_L · (G_L,t · [x_n, y_n, 1] - c_L) + Σ_levels R_L(x, y, t)     in [-1, 1]²
    UV        uv_L = 0.5 · M_L - 0.5 (background, in [-1, 0]²),  0.5 · M_L + 0.5 (foreground, in [0, 1]²)
    colour    C_L(M) = 0.5 + Σ_levels texture_L(M)                                      (3 channels)
    alpha     A(p, t) = 0.001 + 0.99 · sigmoid(Σ_levels logit(x, y, t))                 (foreground only)
    frame     I(p, t) = A · C_fg(M_fg) + (1 - A) · C_bg(M_bg)

with x_n = x/(S/2) - 1, y_n = y/(S/2) - 1, S = max(W, H) (the NLA normalisation). G_L,t (T, 2, 3) is a
learnable per-frame affine transform initialised by chaining flow-fitted similarities
(:func:`~t2l_fast.fit.flow.chain_similarities`), s_L and c_L a fixed scale and centre that put every frame
inside the layer's square; R_L are residual displacement grids over (x, y, t) (zero at start), the
textures are image pyramids over the layer's [-1, 1]² and the alpha logits grids over (x, y, t), whose
finest level is per pixel. The 3D grids are sampled trilinearly with align_corners=True, so an integer
frame index hits its own slice exactly; the textures bilinearly with align_corners=False.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from t2l_fast.models.atlas import LAYER_OFFSET, AtlasData, texel_box, texel_coords


def _grid_size(n: int, cell: float) -> int:
    """Nodes of a grid with cell size ``cell`` px spanning ``n`` pixels (align_corners=True)."""
    return max(2, math.ceil((n - 1) / cell) + 1)


class LayeredGridModel(nn.Module):
    """Two-layer (or background-only) video decomposition on dense grids.

    Args:
        num_frames, height, width: the video (T, H, W).
        transforms: layer -> (T, 2, 3) initial G_t (normalised coordinates).
        with_foreground: fit a foreground layer and alpha (needs masks).
        residual_cells: cell sizes (px) of the residual mapping grids, coarse to fine.
        alpha_cells: cell sizes (px) of the alpha logit grids, coarse to fine (1 = per pixel).
        texture_levels: number of texture pyramid levels (each 4x coarser than the previous).
        init_alpha: (T, H, W) in [0, 1], the initial opacity (e.g. the masks), or None (0.5).
    """

    def __init__(
        self,
        num_frames: int,
        height: int,
        width: int,
        transforms: dict[str, torch.Tensor],
        with_foreground: bool,
        residual_cells: tuple[float, ...] = (64.0, 16.0),
        alpha_cells: tuple[float, ...] = (16.0, 4.0, 1.0),
        texture_levels: int = 3,
        init_alpha: torch.Tensor | None = None,
        max_scale: float = 0.8,
    ) -> None:
        super().__init__()
        self.num_frames, self.height, self.width = num_frames, height, width
        self.half = max(width, height) / 2.0
        self.layers = ("background", "foreground") if with_foreground else ("background",)
        self.affine = nn.ParameterDict()
        self.residual = nn.ModuleDict()
        self.texture = nn.ModuleDict()
        self.scales: dict[str, float] = {}
        for layer in self.layers:
            g = transforms[layer].float()
            if tuple(g.shape) != (num_frames, 2, 3):
                raise ValueError(f"{layer} transforms must be {(num_frames, 2, 3)}, got {tuple(g.shape)}")
            lo, hi = self._extent(g)
            extent = float((hi - lo).max())
            scale = min(max_scale, 1.9 / max(extent, 1e-6))
            self.scales[layer] = scale
            self.register_buffer(f"centre_{layer}", (lo + hi) / 2, persistent=True)
            self.register_buffer(f"scale_{layer}", torch.tensor(scale), persistent=True)
            self.affine[layer] = nn.Parameter(g.clone())
            self.residual[layer] = nn.ParameterList(
                nn.Parameter(torch.zeros(1, 2, num_frames, _grid_size(height, c), _grid_size(width, c)))
                for c in residual_cells
            )
            finest = math.ceil(2.0 * self.half / scale)  # texels across [-1, 1] ≈ one per pixel
            self.texture[layer] = nn.ParameterList(
                nn.Parameter(torch.zeros(1, 3, max(4, finest // 4**k), max(4, finest // 4**k)))
                for k in reversed(range(texture_levels))
            )
        self.alpha_logits = nn.ParameterList()
        if with_foreground:
            for c in alpha_cells:
                self.alpha_logits.append(
                    nn.Parameter(torch.zeros(1, 1, num_frames, _grid_size(height, c), _grid_size(width, c)))
                )
            if init_alpha is not None:
                p = init_alpha.float().clamp(0.1, 0.9)
                p = (p - 0.001) / 0.99
                logit = torch.log(p / (1 - p))  # (T, H, W)
                finest = self.alpha_logits[-1]
                if tuple(finest.shape[2:]) == tuple(logit.shape):
                    finest.data.copy_(logit[None, None])
                else:
                    finest.data.copy_(F.interpolate(logit[None], size=finest.shape[3:], mode="area")[None])

    def _extent(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Bounding box (lo (2,), hi (2,)) of every frame's corners under g (T, 2, 3)."""
        xs = torch.tensor([0.0, self.width - 1, 0.0, self.width - 1]) / self.half - 1
        ys = torch.tensor([0.0, 0.0, self.height - 1, self.height - 1]) / self.half - 1
        corners = torch.stack([xs, ys, torch.ones(4)], dim=0)  # (3, 4)
        pts = g @ corners  # (T, 2, 4)
        return pts.amin(dim=(0, 2)), pts.amax(dim=(0, 2))

    def scale(self, layer: str) -> float:
        """s_L: normalised-coordinate units of M per unit of x_n at the start (M units per S/2 px)."""
        return self.scales[layer]

    def px_per_m(self, layer: str) -> float:
        """Pixels per unit of M at the start (converts mapping differences to pixels)."""
        return self.half / self.scales[layer]

    # -- evaluation ----------------------------------------------------------------------------
    def _grid3(self, pts: torch.Tensor) -> torch.Tensor:
        """(N, 3) pixel x, y and frame t -> (1, 1, 1, N, 3) grid_sample coordinates (align_corners=True)."""
        x = pts[:, 0] * (2.0 / max(self.width - 1, 1)) - 1
        y = pts[:, 1] * (2.0 / max(self.height - 1, 1)) - 1
        t = pts[:, 2] * (2.0 / max(self.num_frames - 1, 1)) - 1
        return torch.stack([x, y, t], dim=-1).view(1, 1, 1, -1, 3)

    @staticmethod
    def _sample3(grids: nn.ParameterList, g: torch.Tensor) -> torch.Tensor:
        """Σ over levels of trilinear samples -> (N, C)."""
        out = None
        for vol in grids:
            s = F.grid_sample(vol, g, mode="bilinear", padding_mode="border", align_corners=True)
            out = s if out is None else out + s
        return out.flatten(2)[0].t()  # (1, C, 1, 1, N) -> (N, C)

    def mapping(self, layer: str, pts: torch.Tensor, g3: torch.Tensor | None = None) -> torch.Tensor:
        """M_L at ``pts`` (N, 3) = (x px, y px, t frame; x, y may be fractional) -> (N, 2) (≈ [-1, 1])."""
        g3 = self._grid3(pts) if g3 is None else g3
        t0 = pts[:, 2].floor().clamp(0, self.num_frames - 1)
        w = (pts[:, 2] - t0).unsqueeze(-1).unsqueeze(-1)  # fractional frames blend the two transforms
        aff = self.affine[layer]
        t0l = t0.long()
        g = aff[t0l] * (1 - w) + aff[(t0l + 1).clamp(max=self.num_frames - 1)] * w  # (N, 2, 3)
        xn = pts[:, 0] / self.half - 1
        yn = pts[:, 1] / self.half - 1
        base = g[:, :, 0] * xn[:, None] + g[:, :, 1] * yn[:, None] + g[:, :, 2]  # (N, 2)
        centre = getattr(self, f"centre_{layer}")
        return (base - centre) * self.scales[layer] + self._sample3(self.residual[layer], g3)

    def alpha(self, pts: torch.Tensor, g3: torch.Tensor | None = None) -> torch.Tensor:
        """Foreground opacity at ``pts`` (N, 3) -> (N,) in [0.001, 0.991]; zeros without a foreground."""
        if len(self.alpha_logits) == 0:
            return torch.zeros(pts.shape[0], device=pts.device)
        g3 = self._grid3(pts) if g3 is None else g3
        return 0.001 + 0.99 * torch.sigmoid(self._sample3(self.alpha_logits, g3)[:, 0])

    def colour(self, layer: str, m: torch.Tensor) -> torch.Tensor:
        """Atlas colour of ``layer`` at mapping coordinates ``m`` (N, 2) -> (N, 3) (≈ [0, 1], unclamped)."""
        g = m.view(1, 1, -1, 2)
        out = 0.5
        for tex in self.texture[layer]:
            out = out + F.grid_sample(tex, g, mode="bilinear", padding_mode="border", align_corners=False)
        return out[0, :, 0].t()  # (1, 3, 1, N) -> (N, 3)

    # -- export --------------------------------------------------------------------------------
    def frame_points(self, t: int, device: torch.device) -> torch.Tensor:
        """Every pixel of frame ``t``: (H·W, 3) row-major."""
        ys, xs = torch.meshgrid(
            torch.arange(self.height, device=device, dtype=torch.float32),
            torch.arange(self.width, device=device, dtype=torch.float32),
            indexing="ij",
        )
        ts = torch.full_like(xs, float(t))
        return torch.stack([xs, ys, ts], dim=-1).view(-1, 3)

    @torch.no_grad()
    def export(self, grid: int, chunk: int = 1 << 18) -> AtlasData:
        """Evaluate over every pixel and discretise both atlases on an R×R grid (R = ``grid``).

        Without a foreground layer, alpha is 0 everywhere, every pixel's foreground UV is the centre
        (0.5, 0.5) and the foreground atlas is a blank 2×2 crop.
        """
        dev = self.affine["background"].device
        t_, h, w = self.num_frames, self.height, self.width
        uv = {name: torch.empty(t_, h, w, 2, device=dev) for name in ("background", "foreground")}
        alpha = torch.zeros(t_, h, w, device=dev)
        for t in range(t_):
            pts = self.frame_points(t, dev)
            for layer in self.layers:
                m = torch.cat([self.mapping(layer, p) for p in pts.split(chunk)]).clamp(-1.0, 1.0)
                uv[layer][t] = (0.5 * m + 0.5 + LAYER_OFFSET[layer]).view(h, w, 2)  # M -> atlas coordinates
            if "foreground" in self.layers:
                alpha[t] = torch.cat([self.alpha(p) for p in pts.split(chunk)]).view(h, w)
        if "foreground" not in self.layers:
            uv["foreground"].fill_(0.5)
        images, boxes = {}, {}
        for layer in ("background", "foreground"):
            box = texel_box(uv[layer], layer, grid)
            if layer in self.layers:
                coords = texel_coords(box, layer, grid, dev).view(-1, 2)  # (h·w, 2) atlas coordinates
                m = 2.0 * (coords - LAYER_OFFSET[layer]) - 1.0  # uv -> M in [-1, 1]
                rgb = torch.cat([self.colour(layer, c) for c in m.split(chunk)])
                img = rgb.clamp(0, 1).t().reshape(3, box.height, box.width).contiguous()
            else:
                img = torch.zeros(3, box.height, box.width, device=dev)
            images[layer], boxes[layer] = img, box
        return AtlasData.from_layers(uv, alpha, images, boxes, grid)
