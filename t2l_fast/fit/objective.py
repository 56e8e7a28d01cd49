"""The atlas fit's objective: the video on the device (:class:`FitData`) and the losses of one step
(:func:`step_losses`), as listed in :mod:`t2l_fast.fit.fit`."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from t2l_fast.config import FitConfig

from .flow import FlowField
from .model import LayeredGridModel

#: Weight of the NLA rigidity term when J is a rotation: |I|_F + |I|_F = 2√2 (subtracted for display).
_RIGID_MIN = 2.0 * math.sqrt(2.0)


def as_float(frames: torch.Tensor) -> torch.Tensor:
    return frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()


def as_uint8(frames: torch.Tensor) -> torch.Tensor:
    if frames.dtype == torch.uint8:
        return frames
    return (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)


def psnr_db(mse: float) -> float:
    return 10.0 * math.log10(1.0 / max(mse, 1e-12))


class FitData:
    """The video on the device in the layouts a step gathers from."""

    def __init__(self, frames: torch.Tensor, masks: torch.Tensor | None, flow: FlowField, device) -> None:
        self.device = torch.device(device)
        self.frames = as_float(frames).to(device).permute(0, 2, 3, 1).contiguous()  # (T, H, W, 3)
        self.t, self.h, self.w = self.frames.shape[:3]
        self.masks = None if masks is None else (masks > 0.5).float().to(device)  # (T, H, W)
        fl = flow.to(device)
        self.fwd, self.bwd = fl.forward, fl.backward  # (T-1, H, W, 2)
        self.fwd_ok, self.bwd_ok = fl.forward_ok.float(), fl.backward_ok.float()  # (T-1, H, W)
        self.fg_index = None
        if self.masks is not None:
            grown = F.max_pool2d(self.masks[:, None], kernel_size=9, stride=1, padding=4)[:, 0]
            self.fg_index = torch.nonzero(grown.flatten() > 0).flatten()  # flat (t, y, x) indices


def _rigidity(m0: torch.Tensor, mx: torch.Tensor, my: torch.Tensor, px_per_m: float) -> torch.Tensor:
    """NLA's rigidity of a mapping from 1-pixel differences -> (N,), 0 for a rotation.

    m0, mx, my (N, 2): M at p, p + x̂, p + ŷ; J = [M(p+x̂) - M(p), M(p+ŷ) - M(p)] in pixels per pixel.
    """
    j = torch.stack([mx - m0, my - m0], dim=-1) * px_per_m  # (N, 2, 2): columns ∂/∂x, ∂/∂y
    jtj = j.transpose(1, 2) @ j
    a, b = jtj[:, 0, 0] + 1e-3, jtj[:, 0, 1]
    c, d = jtj[:, 1, 0], jtj[:, 1, 1] + 1e-3
    det = (a * d - b * c).clamp_min(1e-8)
    norm = (a.square() + b.square() + c.square() + d.square()).sqrt()
    return norm + norm / det - _RIGID_MIN  # |JᵀJ|_F + |(JᵀJ)⁻¹|_F (the inverse has the same entries / det)


class _Samples(NamedTuple):
    """A step's pixels p = (x, y, t) and the points the model is evaluated at."""

    t: torch.Tensor  # (n,) frame
    y: torch.Tensor  # (n,) row
    x: torch.Tensor  # (n,) column
    xp: torch.Tensor  # (n,) x + 1 (clamped)
    yp: torch.Tensor  # (n,) y + 1 (clamped)
    ok_f: torch.Tensor  # (n,) the forward flow at p is usable
    ok_b: torch.Tensor  # (n,) the backward flow at p is usable
    pts: torch.Tensor  # (5n, 3): p, p + x̂, p + ŷ, p + forward flow, p + backward flow


def _sample(data: FitData, cfg: FitConfig, n: int) -> _Samples:
    """Draw ``n`` pixels (a ``foreground_samples`` share from around the masks) and their neighbours
    and flow ends."""
    dev = data.frames.device
    t_, h, w = data.t, data.h, data.w
    n_fg = int(n * cfg.foreground_samples) if data.fg_index is not None else 0
    flat = torch.randint(0, t_ * h * w, (n - n_fg,), device=dev)
    if n_fg:
        pick = torch.randint(0, data.fg_index.numel(), (n_fg,), device=dev)
        flat = torch.cat([flat, data.fg_index[pick]])
    t, rem = flat // (h * w), flat % (h * w)
    y, x = rem // w, rem % w
    xp, yp = (x + 1).clamp(max=w - 1), (y + 1).clamp(max=h - 1)
    tf = t.clamp(max=t_ - 2)  # forward flow t -> t+1 (invalid for the last frame)
    tb = (t - 1).clamp(min=0)  # backward flow t -> t-1 is bwd[t-1] (invalid for frame 0)
    f = data.fwd[tf, y, x]  # (n, 2)
    b = data.bwd[tb, y, x]
    ok_f = data.fwd_ok[tf, y, x] * (t < t_ - 1).float()
    ok_b = data.bwd_ok[tb, y, x] * (t > 0).float()
    tfl, xf, yf = t.float(), x.float(), y.float()
    pts = torch.cat(
        [
            torch.stack([xf, yf, tfl], 1),
            torch.stack([xp.float(), yf, tfl], 1),
            torch.stack([xf, yp.float(), tfl], 1),
            torch.stack([xf + f[:, 0], yf + f[:, 1], (t + 1).clamp(max=t_ - 1).float()], 1),
            torch.stack([xf + b[:, 0], yf + b[:, 1], tb.float()], 1),
        ]
    )  # (5n, 3): p, p + x̂, p + ŷ, p + forward flow, p + backward flow
    return _Samples(t, y, x, xp, yp, ok_f, ok_b, pts)


def step_losses(
    model: LayeredGridModel, data: FitData, cfg: FitConfig, n: int, w_boot: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sample ``n`` pixels, evaluate every loss; returns (total, parts incl. 'mse')."""
    dev = data.frames.device
    h, w = data.h, data.w
    t, y, x, xp, yp, ok_f, ok_b, pts = _sample(data, cfg, n)
    g3 = model._grid3(pts)
    target = data.frames[t, y, x]  # (n, 3)
    dx_gt = data.frames[t, y, xp] - target
    dy_gt = data.frames[t, yp, x] - target
    maps = {layer: model.mapping(layer, pts, g3) for layer in model.layers}
    has_fg = "foreground" in model.layers
    alpha = model.alpha(pts, g3) if has_fg else None  # (5n,)

    c_bg = model.colour("background", maps["background"][: 3 * n])  # (3n, 3)
    if has_fg:
        c_fg = model.colour("foreground", maps["foreground"][: 3 * n])
        a3 = alpha[: 3 * n, None]
        rec = a3 * c_fg + (1 - a3) * c_bg
    else:
        rec = c_bg
    r0, rx, ry = rec[:n], rec[n : 2 * n], rec[2 * n :]
    parts: dict[str, torch.Tensor] = {}
    mse = (r0 - target).square().sum(-1).mean()
    parts["rgb"] = mse
    parts["mse"] = mse.detach() / 3
    grad_x = ((rx - r0) - dx_gt).square().sum(-1).mean()
    parts["gradient"] = grad_x + ((ry - r0) - dy_gt).square().sum(-1).mean()

    inner = ((x < w - 1) & (y < h - 1)).float()
    okf_sum, okb_sum = ok_f.sum().clamp_min(1), ok_b.sum().clamp_min(1)
    flow_loss = torch.zeros((), device=dev)
    rigid = torch.zeros((), device=dev)
    a0 = alpha[:n] if has_fg else torch.zeros(n, device=dev)
    for layer, m in maps.items():
        m0, mx, my, mf, mb = m.split(n)
        weight = a0 if layer == "foreground" else 1 - a0
        scale = model.px_per_m(layer)
        ef = (mf - m0).norm(dim=-1) * scale
        eb = (mb - m0).norm(dim=-1) * scale
        flow_f = (ef * weight * ok_f).sum() / okf_sum
        flow_loss = flow_loss + 0.5 * (flow_f + (eb * weight * ok_b).sum() / okb_sum)
        rigid = rigid + (_rigidity(m0, mx, my, scale) * inner).sum() / inner.sum().clamp_min(1)
    parts["flow"] = flow_loss
    parts["rigidity"] = rigid
    if has_fg:
        _, _, _, af, ab = alpha.split(n)
        parts["alpha_flow"] = 0.5 * (
            ((af - a0).abs() * ok_f).sum() / okf_sum + ((ab - a0).abs() * ok_b).sum() / okb_sum
        )
        parts["sparsity"] = ((1 - a0) * c_fg[:n].square().sum(-1)).mean()
        mask = data.masks[t, y, x]
        parts["bootstrap"] = F.binary_cross_entropy(a0.clamp(1e-4, 1 - 1e-4), mask)
    total = (
        cfg.w_rgb * parts["rgb"]
        + cfg.w_gradient * parts["gradient"]
        + cfg.w_flow * parts["flow"]
        + cfg.w_rigidity * parts["rigidity"]
    )
    if has_fg:
        total = (
            total
            + cfg.w_alpha_flow * parts["alpha_flow"]
            + cfg.w_sparsity * parts["sparsity"]
            + w_boot * parts["bootstrap"]
        )
    return total, parts
