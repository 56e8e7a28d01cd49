"""Motion evidence: what moves differently from the camera, from the flow alone.

The camera's motion between consecutive frames is a homography fitted by RANSAC to the flow; what the
flow does differently (the residual, in pixels), and coherently (it follows the second motion found,
the object's), is object evidence; :func:`_carry` averages it along the flow over neighbouring frames.
:func:`~t2l_fast.fit.segment.masks_from_motion` turns it into masks.
"""

from __future__ import annotations

import numpy as np
import torch

from .flow import FlowField, _cv2, flow_for, pixel_grid, remap


def _homography_flow(hom: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The displacement (..., 2) the homography ``hom`` gives the points (x, y)."""
    den = hom[2, 0] * x + hom[2, 1] * y + hom[2, 2]
    den = np.where(np.abs(den) < 1e-6, 1e-6, den)
    hx = (hom[0, 0] * x + hom[0, 1] * y + hom[0, 2]) / den - x
    hy = (hom[1, 0] * x + hom[1, 1] * y + hom[1, 2]) / den - y
    return np.stack([hx, hy], -1).astype(np.float32)


def _residuals(flow: np.ndarray, ok: np.ndarray, xx: np.ndarray, yy: np.ndarray):
    """|flow - the camera's flow| and |flow - the object's flow| (H, W) in pixels (the second None when
    no second motion is found; both None when too few vectors are consistent).

    The camera's motion is a homography fitted by RANSAC to the consistent vectors on a grid (about 54
    rows); a second one is fitted to what the first leaves out; the camera's is the one of the two that
    explains more of the frame's border (its outer sixth: a large object can win the first fit), the
    other is the object's.
    """
    cv2 = _cv2()
    h, w = ok.shape
    step = max(2, min(h, w) // 54)
    gy, gx = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    sel = ok[gy, gx]
    if sel.sum() < 16:
        return None, None
    x, y = gx[sel].astype(np.float32), gy[sel].astype(np.float32)
    src = np.stack([x, y], 1)
    vec = flow[gy[sel], gx[sel]]
    ring = (x < w / 6) | (x > w * 5 / 6) | (y < h / 6) | (y > h * 5 / 6)
    fits = []  # (border points explained, homography)
    todo = np.ones(len(x), bool)
    for _ in range(2):
        if todo.sum() < max(16, 0.1 * len(x)):
            break
        hom, _ = cv2.findHomography(src[todo], src[todo] + vec[todo], cv2.RANSAC, 1.0, maxIters=500)
        if hom is None:
            break
        inlier = np.linalg.norm(vec - _homography_flow(hom, x, y), axis=1) < 1.0
        fits.append((float((inlier & ring).sum()), hom))
        todo &= ~inlier
    if not fits:
        return None, None
    fits.sort(key=lambda f: -f[0])
    res = [np.linalg.norm(flow - _homography_flow(h, xx, yy), axis=-1).astype(np.float32) for _, h in fits]
    return res[0], (res[1] if len(res) > 1 else None)


def motion_evidence(frames: torch.Tensor, flow: FlowField | None = None) -> torch.Tensor:
    """Per-pixel evidence in [0, 1] that a pixel moves differently from the camera, (T, H, W) float.

    For each pair of frames the camera's motion is a homography fitted by RANSAC to the flow; a pixel's
    residual r (pixels) counts as evidence (r - a) / (2a) clipped to [0, 1], a = max(0.5 px, 3 · the
    median residual of the camera's inliers) (1: clearly independent motion), times how well the
    pixel follows the second motion found (the object's: |flow - its homography| from 1.5a down to
    3a), when there is one. Each frame gets the mean evidence of its forward and backward flow where
    consistent (0 where neither is).
    """
    return torch.from_numpy(_evidence(frames, flow)[0])


def _evidence(frames: torch.Tensor, flow: FlowField | None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`motion_evidence` (T, H, W) and its weight: how many of the two flows were consistent."""
    flow = flow_for(frames, flow)
    fwd, bwd = flow.forward.numpy(), flow.backward.numpy()
    fok, bok = flow.forward_ok.numpy(), flow.backward_ok.numpy()
    steps, h, w, _ = fwd.shape
    xx, yy = pixel_grid(h, w)
    total = np.zeros((steps + 1, h, w), np.float32)
    weight = np.zeros((steps + 1, h, w), np.float32)
    for i in range(steps):
        for vec, ok, frame in ((fwd[i], fok[i], i), (bwd[i], bok[i], i + 1)):
            res, other = _residuals(vec, ok, xx, yy)
            if res is None:
                continue
            still = ok & (res < 1.0)  # the camera's inliers: their residual is the flow's noise
            a = max(0.5, 3.0 * float(np.median(res[still]))) if still.any() else 0.5
            ev = np.clip((res - a) / (2 * a), 0, 1)
            if other is not None:  # and it moves as the object does (not as, say, ripples on water)
                ev *= np.clip((3 * a - other) / (1.5 * a), 0, 1)
            total[frame] += np.where(ok, ev, 0)
            weight[frame] += ok
    return total / np.maximum(weight, 1e-6), weight


def _carry(evidence: np.ndarray, weight: np.ndarray, flow: FlowField, decay: float) -> np.ndarray:
    """Evidence averaged along the flow, weighted (inconsistent flow tells nothing): forward and
    backward recursive filters of the weighted sum S_t = decay · S_{t∓1}(carried) + w_t · e_t and of
    the weights alike; E = (S_ahead + S_behind - w·e) / (W_ahead + W_behind - w), 0 where no weight."""
    fwd, bwd = flow.forward.numpy(), flow.backward.numpy()
    t, h, w = evidence.shape
    xx, yy = pixel_grid(h, w)
    mass = weight * evidence
    sums, weights = [], []
    for order, vectors, step in ((range(1, t), bwd, -1), (range(t - 2, -1, -1), fwd, 1)):
        s, n = mass.copy(), weight.copy()
        for i in order:
            vec = vectors[i - 1] if step == -1 else vectors[i]
            s[i] += decay * remap(s[i + step], vec, xx, yy)
            n[i] += decay * remap(n[i + step], vec, xx, yy)
        sums.append(s)
        weights.append(n)
    total = sums[0] + sums[1] - mass
    count = weights[0] + weights[1] - weight
    return np.where(count > 1e-3, total / np.maximum(count, 1e-3), 0).astype(np.float32)


def _first_frame_evidence(frames: torch.Tensor, flow: FlowField, decay: float, span: int = 8) -> np.ndarray:
    """Frame 0's motion evidence, carried back along the flow from the first ``span`` frames (H, W)."""
    k = min(span, flow.forward.shape[0])
    head = FlowField(flow.forward[:k], flow.backward[:k], flow.forward_ok[:k], flow.backward_ok[:k])
    return _carry(*_evidence(frames[: k + 1], head), head, decay)[0]
