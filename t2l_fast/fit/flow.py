"""Optical flow for atlas fitting: OpenCV's DIS flow, forward and backward, with a consistency check;
and the per-frame similarity transforms chained from it that initialise the UV mappings.

Flow layout: ``forward[t]`` (H, W, 2) float32 moves pixel (x, y) of frame t to (x + u, y + v) in frame
t + 1 (u = [..., 0] along x, v = [..., 1] along y); ``backward[t]`` moves frame t + 1 to frame t. A
forward vector is *consistent* when following it and then the backward flow at its end returns to the
start: |f(p) + b(p + f(p))|² <= rel·(|f(p)|² + |b(p + f(p))|²) + abs_px² (Sundaram et al. 2010), and its
end lies inside the frame. Only consistent vectors feed the flow losses.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from t2l_fast.io import InputError

log = logging.getLogger(__name__)


def _cv2():
    try:
        import cv2
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "atlas fitting needs OpenCV's DIS optical flow: pip install opencv-python-headless"
        ) from e
    return cv2


@dataclass
class FlowField:
    """Forward/backward flow between consecutive frames and their consistency masks.

    forward, backward  (T-1, H, W, 2) float32, pixels
    forward_ok, backward_ok  (T-1, H, W) bool
    """

    forward: torch.Tensor
    backward: torch.Tensor
    forward_ok: torch.Tensor
    backward_ok: torch.Tensor
    seconds: float = 0.0

    def to(self, device: torch.device | str) -> FlowField:
        return FlowField(
            self.forward.to(device),
            self.backward.to(device),
            self.forward_ok.to(device),
            self.backward_ok.to(device),
            self.seconds,
        )

    @property
    def consistent_fraction(self) -> float:
        return float(torch.cat([self.forward_ok.flatten(), self.backward_ok.flatten()]).float().mean())


def _gray(frame: torch.Tensor) -> np.ndarray:
    """(3, H, W) uint8 RGB -> (H, W) uint8 grey (BT.601)."""
    f = frame.float()
    g = 0.299 * f[0] + 0.587 * f[1] + 0.114 * f[2]
    return g.round().clamp(0, 255).to(torch.uint8).cpu().numpy()


def dis_flow(a: np.ndarray, b: np.ndarray, preset: str = "medium") -> np.ndarray:
    """DIS optical flow from grey image ``a`` to ``b`` ((H, W) uint8) -> (H, W, 2) float32 pixels."""
    cv2 = _cv2()
    presets = {
        "ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST,
        "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
        "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM,
    }
    if preset not in presets:
        raise ValueError(f"unknown DIS preset {preset!r}; expected one of {sorted(presets)}")
    dis = cv2.DISOpticalFlow_create(presets[preset])
    return dis.calc(a, b, None).astype(np.float32)


def warp_backward(field: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Sample ``field`` (N, C, H, W) at p + flow(p) (bilinear, border) -> (N, C, H, W); flow (N, H, W, 2)."""
    n, _, h, w = field.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=flow.device),
        torch.arange(w, dtype=torch.float32, device=flow.device),
        indexing="ij",
    )
    x = xs + flow[..., 0]  # (N, H, W)
    y = ys + flow[..., 1]
    grid = torch.stack([2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(field, grid, mode="bilinear", padding_mode="border", align_corners=True)


def consistency(
    forward: torch.Tensor, backward: torch.Tensor, rel: float = 0.01, abs_px: float = 0.5
) -> torch.Tensor:
    """Forward-backward check of ``forward`` (N, H, W, 2) against ``backward`` (N, H, W, 2).

    Returns (N, H, W) bool: True where |f + b(p + f)|² <= rel·(|f|² + |b(p + f)|²) + abs_px² and
    p + f lies inside the frame.
    """
    _, h, w, _ = forward.shape
    b_at = warp_backward(backward.permute(0, 3, 1, 2), forward).permute(0, 2, 3, 1)  # (N, H, W, 2)
    err = (forward + b_at).square().sum(-1)
    bound = rel * (forward.square().sum(-1) + b_at.square().sum(-1)) + abs_px**2
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=forward.device),
        torch.arange(w, dtype=torch.float32, device=forward.device),
        indexing="ij",
    )
    x, y = xs + forward[..., 0], ys + forward[..., 1]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return (err <= bound) & inside


def compute_flow(frames: torch.Tensor, preset: str = "medium") -> FlowField:
    """DIS flow between every pair of consecutive frames, both directions, with consistency masks.

    Args:
        frames: (T, 3, H, W) uint8 RGB (T >= 2), any device (flow runs on the CPU with OpenCV).
        preset: DIS preset: "ultrafast", "fast" or "medium".
    Returns:
        :class:`FlowField` on the CPU.
    """
    start = time.perf_counter()
    grey = [_gray(f) for f in frames]
    fwd = np.stack([dis_flow(grey[t], grey[t + 1], preset) for t in range(len(grey) - 1)])
    bwd = np.stack([dis_flow(grey[t + 1], grey[t], preset) for t in range(len(grey) - 1)])
    fwd_t, bwd_t = torch.from_numpy(fwd), torch.from_numpy(bwd)  # (T-1, H, W, 2)
    field = FlowField(fwd_t, bwd_t, consistency(fwd_t, bwd_t), consistency(bwd_t, fwd_t))
    field.seconds = time.perf_counter() - start
    log.info(
        "DIS flow (%s) for %d frame pairs in %.1f s, %.0f%% consistent",
        preset,
        len(grey) - 1,
        field.seconds,
        100 * field.consistent_fraction,
    )
    return field


def chain_similarities(
    flow: FlowField,
    region: torch.Tensor | None,
    scale: float,
    min_points: int = 12,
    max_points: int = 4000,
    seed: int = 0,
) -> torch.Tensor:
    """Per-frame 2D similarity transforms that map frame t's points into frame 0's coordinates.

    For each pair (t, t+1) a similarity p_{t+1} ≈ S_t p_t is fitted robustly (RANSAC,
    ``cv2.estimateAffinePartial2D``) to consistent forward-flow correspondences inside ``region``;
    then G_0 = I and G_{t+1} = G_t · S_t⁻¹. Where too few points exist the motion is taken as zero.

    Args:
        flow: the video's flow.
        region: (T, H, W) bool of the pixels to follow (e.g. the object mask), or None for all.
        scale: pixels per normalised unit (coordinates are x/scale - 1, y/scale - 1).
    Returns:
        (T, 2, 3) float32: G_t acting on normalised homogeneous coordinates (x_n, y_n, 1).
    """
    cv2 = _cv2()
    rng = np.random.default_rng(seed)
    steps = flow.forward.shape[0]
    mats = [np.eye(3)]
    for t in range(steps):
        ok = flow.forward_ok[t]
        if region is not None:
            ok = ok & region[t]
        ys, xs = torch.nonzero(ok, as_tuple=True)
        s = np.eye(3)
        if len(xs) >= min_points:
            idx = rng.choice(len(xs), size=min(max_points, len(xs)), replace=False)
            x, y = xs[idx].numpy().astype(np.float32), ys[idx].numpy().astype(np.float32)
            f = flow.forward[t][ys[idx], xs[idx]].numpy()
            src = np.stack([x, y], 1) / scale - 1.0
            dst = np.stack([x + f[:, 0], y + f[:, 1]], 1) / scale - 1.0
            m, _ = cv2.estimateAffinePartial2D(
                src, dst, method=cv2.RANSAC, ransacReprojThreshold=1.5 / scale, maxIters=500
            )
            if m is not None and np.all(np.isfinite(m)):
                s[:2] = m
        mats.append(mats[-1] @ np.linalg.inv(s))
    return torch.from_numpy(np.stack(mats)[:, :2]).float()


def flow_for(frames: torch.Tensor, flow: FlowField | None) -> FlowField:
    """``flow`` checked against the frames (T, 3, H, W), or computed from them when None."""
    if flow is None:
        f = frames if frames.dtype == torch.uint8 else (frames.float().clamp(0, 1) * 255).round().byte()
        return compute_flow(f.cpu())
    t, _, h, w = frames.shape
    if tuple(flow.forward.shape) != (t - 1, h, w, 2):
        raise InputError(
            f"flow is {tuple(flow.forward.shape)} but {t} frames of {w}x{h} need ({t - 1}, {h}, {w}, 2)"
        )
    return flow


def pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The pixel coordinates (x, y) of an (h, w) frame, float32 (H, W) each."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx, yy


def remap(field: np.ndarray, flow: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Sample ``field`` (H, W) float32 at p + flow(p) (bilinear; 0 outside the frame)."""
    cv2 = _cv2()
    return cv2.remap(
        field, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
