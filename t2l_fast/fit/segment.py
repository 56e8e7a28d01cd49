"""Object masks without a segmentation network: from one box on the first frame, or from motion alone.

Both work on the DIS flow the atlas fit computes anyway (:func:`~t2l_fast.fit.flow.compute_flow`) and on
OpenCV's GrabCut (colour models + graph cut) to snap masks to the colours and edges of each frame.

- :func:`masks_from_box`: GrabCut inside the box on frame 0 (what in the box moves with the camera
  starts as background); then frame by frame, the previous mask carried by the flow is the prior: its
  inside (eroded) is object, its outside (dilated) background, and the band between is decided by
  GrabCut from the colours and edges of that frame.
- :func:`masks_from_motion`: the camera's motion between consecutive frames is a homography fitted by
  RANSAC to the flow; what the flow does differently (the residual, in pixels), and coherently (it
  follows the second motion found, the object's), is object evidence. Evidence is carried along the
  flow to the neighbouring frames and averaged, weighted by flow consistency (moving objects keep
  moving; noise and occlusions do not), then thresholded into seeds for GrabCut in each frame.

Masks are (T, H, W) bool tensors, True = object, the layout :func:`~t2l_fast.fit.read_masks` returns.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from t2l_fast.io import InputError, atomic_path

from .flow import FlowField, _cv2, compute_flow

log = logging.getLogger(__name__)


class NoMovingObject(InputError):
    """:func:`masks_from_motion` found nothing that moves differently from the camera."""


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def _frames_hwc(frames: torch.Tensor) -> np.ndarray:
    """(T, 3, H, W) uint8 or float in [0, 1] -> (T, H, W, 3) uint8 contiguous numpy."""
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise InputError(f"frames must be (T, 3, H, W) RGB, got {tuple(frames.shape)}")
    f = frames.detach().cpu()
    if f.dtype != torch.uint8:
        f = (f.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return np.ascontiguousarray(f.permute(0, 2, 3, 1).numpy())


def _flow_for(frames: torch.Tensor, flow: FlowField | None) -> FlowField:
    if flow is None:
        f = frames if frames.dtype == torch.uint8 else (frames.float().clamp(0, 1) * 255).round().byte()
        return compute_flow(f.cpu())
    t, _, h, w = frames.shape
    if tuple(flow.forward.shape) != (t - 1, h, w, 2):
        raise InputError(
            f"flow is {tuple(flow.forward.shape)} but {t} frames of {w}x{h} need ({t - 1}, {h}, {w}, 2)"
        )
    return flow


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return xx, yy


def _warp(field: np.ndarray, flow: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Sample ``field`` (H, W) float32 at p + flow(p) (bilinear; 0 outside the frame)."""
    cv2 = _cv2()
    return cv2.remap(
        field, xx + flow[..., 0], yy + flow[..., 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )


def _disk(radius: int) -> np.ndarray:
    cv2 = _cv2()
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _roi(mask: np.ndarray, margin: int) -> tuple[int, int, int, int] | None:
    """Bounding box (x0, y0, x1, y1) of ``mask`` grown by ``margin`` and clipped; None if empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    h, w = mask.shape
    return (
        max(0, int(xs.min()) - margin),
        max(0, int(ys.min()) - margin),
        min(w, int(xs.max()) + 1 + margin),
        min(h, int(ys.max()) + 1 + margin),
    )


def _grabcut(
    image: np.ndarray, labels: np.ndarray, iterations: int, margin: int, max_pixels: int = 100_000
) -> np.ndarray:
    """GrabCut on ``image`` (H, W, 3) uint8 from the trimap ``labels`` (cv2.GC_* values), run on the
    object's surroundings only (the non-background labels' box grown by ``margin``), at most
    ``max_pixels`` of it (downscaled; the cut is upscaled and the sure labels kept). -> (H, W) bool."""
    cv2 = _cv2()
    box = _roi(labels != cv2.GC_BGD, margin)
    out = np.zeros(labels.shape, dtype=bool)
    if box is None:
        return out
    x0, y0, x1, y1 = box
    sub = np.ascontiguousarray(labels[y0:y1, x0:x1])
    fg = (sub == cv2.GC_FGD) | (sub == cv2.GC_PR_FGD)
    if fg.all() or not fg.any():
        out[y0:y1, x0:x1] = fg
        return out
    img = np.ascontiguousarray(image[y0:y1, x0:x1])
    scale = min(1.0, float(np.sqrt(max_pixels / sub.size)))
    small = (max(8, round((x1 - x0) * scale)), max(8, round((y1 - y0) * scale)))
    if scale < 1.0:
        img = cv2.resize(img, small, interpolation=cv2.INTER_AREA)
        cut = cv2.resize(sub, small, interpolation=cv2.INTER_NEAREST)
    else:
        cut = sub.copy()
    bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
    cv2.grabCut(img, cut, None, bgd, fgd, iterations, cv2.GC_INIT_WITH_MASK)
    cut = ((cut == cv2.GC_FGD) | (cut == cv2.GC_PR_FGD)).astype(np.float32)
    if scale < 1.0:
        cut = cv2.resize(cut, (x1 - x0, y1 - y0), interpolation=cv2.INTER_LINEAR)
    result = cut > 0.5
    result[sub == cv2.GC_FGD] = True
    result[sub == cv2.GC_BGD] = False
    out[y0:y1, x0:x1] = result
    return out


def _largest_components(mask: np.ndarray, keep: float = 0.2) -> np.ndarray:
    """Connected components of ``mask`` at least ``keep`` times the largest one's area."""
    cv2 = _cv2()
    n, lab, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    good = np.nonzero(areas >= keep * areas.max())[0] + 1
    return np.isin(lab, good)


def _clean(mask: np.ndarray, smooth: float) -> np.ndarray:
    """The mask's largest connected components, holes filled, its outline smoothed (Gaussian of
    ``smooth`` · sqrt(area) pixels, thresholded at 1/2)."""
    cv2 = _cv2()
    if not mask.any():
        return mask
    mask = _largest_components(mask)
    h, w = mask.shape
    outside = np.zeros((h + 2, w + 2), np.uint8)
    outside[1:-1, 1:-1] = mask
    flood = outside.copy()
    cv2.floodFill(flood, None, (0, 0), 2)
    filled = flood[1:-1, 1:-1] != 2
    sigma = smooth * np.sqrt(filled.sum())
    if sigma >= 0.5:
        filled = cv2.GaussianBlur(filled.astype(np.float32), (0, 0), sigma) > 0.5
    return filled


def _trimap(prior: np.ndarray, band: int) -> np.ndarray:
    """cv2.GC_* labels from a prior mask: eroded inside object, outside the dilation background, the
    band between probable (object inside the prior, background outside)."""
    cv2 = _cv2()
    m = prior.astype(np.uint8)
    inner = cv2.erode(m, _disk(band)) > 0
    outer = cv2.dilate(m, _disk(band)) > 0
    labels = np.full(prior.shape, cv2.GC_BGD, np.uint8)
    labels[outer] = cv2.GC_PR_BGD
    labels[prior] = cv2.GC_PR_FGD
    labels[inner] = cv2.GC_FGD
    return labels


def _band(mask: np.ndarray, fraction: float, minimum: int) -> int:
    return max(minimum, int(round(fraction * np.sqrt(max(1, int(mask.sum()))))))


# ---------------------------------------------------------------------------------------------------
# From a box
# ---------------------------------------------------------------------------------------------------


def check_box(box: tuple[float, float, float, float], width: int, height: int) -> tuple[int, int, int, int]:
    """``box`` (x, y, w, h) in pixels of a ``width``×``height`` frame, as ints; InputError when it has no
    area or reaches outside the frame."""
    if len(box) != 4:
        raise InputError(f"a box is X,Y,W,H (4 numbers), got {len(box)}")
    x, y, w, h = (int(round(float(v))) for v in box)
    if w <= 0 or h <= 0:
        raise InputError(f"the box {x},{y},{w},{h} has zero or negative size: W and H must be > 0")
    if x < 0 or y < 0 or x + w > width or y + h > height:
        raise InputError(
            f"the box {x},{y},{w},{h} reaches outside the {width}x{height} frame "
            f"(need 0 <= X, X+W <= {width}, 0 <= Y, Y+H <= {height})"
        )
    if w < 4 or h < 4:
        raise InputError(f"the box {x},{y},{w},{h} is too small to segment: at least 4x4 pixels")
    return x, y, w, h


def scale_box(
    box: tuple[float, float, float, float], native: tuple[int, int], size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """``box`` (x, y, w, h) in pixels of the video as given (``native`` (width, height)), checked there
    (:func:`check_box`), in pixels of the frames resized to ``size`` (width, height)."""
    x, y, w, h = check_box(box, *native)
    sx, sy = size[0] / native[0], size[1] / native[1]
    return x * sx, y * sy, w * sx, h * sy


def masks_from_box(
    frames: torch.Tensor,
    box: tuple[float, float, float, float],
    flow: FlowField | None = None,
    band: float = 0.12,
    iterations: int = 2,
    smooth: float = 0.02,
    decay: float = 0.8,
) -> torch.Tensor:
    """The object inside ``box`` on frame 0, segmented there and carried through the video.

    Args:
        frames: (T, 3, H, W) uint8 (or float in [0, 1]) RGB.
        box: (x, y, w, h) in pixels of frame 0, around the object.
        flow: the frames' :func:`~t2l_fast.fit.compute_flow` (computed when None).
        band: half-width of the uncertain band around the carried mask, as a fraction of the square
            root of the object's area (at least 2 px).
        iterations: GrabCut iterations per frame.
        smooth, decay: as in :func:`masks_from_motion` (the motion evidence of the first frames
            starts what in the box moves with the camera as background, when it tells the object
            from the rest of the box).
    Returns:
        (T, H, W) bool, True = object.
    Raises:
        InputError: a box outside the frame or too small; frames or flow of the wrong shape.
    """
    cv2 = _cv2()
    cv2.setRNGSeed(0)  # GrabCut's k-means: the same video gives the same masks (a fit resumes)
    start = time.perf_counter()
    images = _frames_hwc(frames)
    t, h, w, _ = images.shape
    x, y, bw, bh = check_box(box, w, h)
    flow = _flow_for(frames, flow)
    backward = flow.backward.numpy()
    xx, yy = _grid(h, w)

    labels = np.full((h, w), cv2.GC_BGD, np.uint8)
    labels[y : y + bh, x : x + bw] = cv2.GC_PR_FGD
    # inside the box, what moves with the camera over the first frames starts as background
    moving = _first_frame_evidence(frames, flow, decay)[y : y + bh, x : x + bw] > 0.5
    if 0.1 < moving.mean() < 0.9:  # informative: the object moves, and not the whole box
        labels[y : y + bh, x : x + bw][~moving] = cv2.GC_PR_BGD
    mask = _grabcut(images[0], labels, 5, max(8, (bw + bh) // 4), max_pixels=h * w)  # full resolution
    if not mask.any():  # GrabCut found nothing distinct: take the box itself
        mask = labels == cv2.GC_PR_FGD
    masks = [_clean(mask, smooth)]
    for i in range(1, t):
        prior = _warp(masks[-1].astype(np.float32), backward[i - 1], xx, yy) > 0.5
        if not prior.any():
            masks.append(prior)
            continue
        r = _band(prior, band, 2)
        masks.append(_clean(_grabcut(images[i], _trimap(prior, r), iterations, 2 * r + 4), smooth))
    log.info("masks from the box for %d frames in %.1f s", t, time.perf_counter() - start)
    return torch.from_numpy(np.stack(masks))


# ---------------------------------------------------------------------------------------------------
# From motion
# ---------------------------------------------------------------------------------------------------


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
    flow = _flow_for(frames, flow)
    fwd, bwd = flow.forward.numpy(), flow.backward.numpy()
    fok, bok = flow.forward_ok.numpy(), flow.backward_ok.numpy()
    steps, h, w, _ = fwd.shape
    xx, yy = _grid(h, w)
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
    xx, yy = _grid(h, w)
    mass = weight * evidence
    sums, weights = [], []
    for order, vectors, step in ((range(1, t), bwd, -1), (range(t - 2, -1, -1), fwd, 1)):
        s, n = mass.copy(), weight.copy()
        for i in order:
            vec = vectors[i - 1] if step == -1 else vectors[i]
            s[i] += decay * _warp(s[i + step], vec, xx, yy)
            n[i] += decay * _warp(n[i + step], vec, xx, yy)
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


def masks_from_motion(
    frames: torch.Tensor,
    flow: FlowField | None = None,
    decay: float = 0.8,
    threshold: float = 0.5,
    min_area: float = 0.002,
    iterations: int = 2,
    smooth: float = 0.02,
    max_pixels: int = 100_000,
) -> torch.Tensor:
    """The object(s) moving differently from the camera, found from motion alone.

    Args:
        frames: (T, 3, H, W) uint8 (or float in [0, 1]) RGB.
        flow: the frames' :func:`~t2l_fast.fit.compute_flow` (computed when None).
        decay: weight of the carried evidence in the temporal filter (0: frame by frame).
        threshold: aggregated evidence above which a pixel seeds the object.
        min_area: least fraction of the frame the object covers, on average, to count as found.
        iterations: GrabCut iterations per frame.
        max_pixels: GrabCut runs on at most this many pixels around the object (downscaled).
        smooth: the masks' outlines are smoothed by a Gaussian of this fraction of the square root
            of the object's area (their holes filled, small pieces dropped).
    Returns:
        (T, H, W) bool, True = object.
    Raises:
        NoMovingObject: nothing moves differently from the camera.
    """
    cv2 = _cv2()
    cv2.setRNGSeed(0)  # GrabCut's k-means: the same video gives the same masks (a fit resumes)
    start = time.perf_counter()
    images = _frames_hwc(frames)
    t, h, w, _ = images.shape
    flow = _flow_for(frames, flow)
    evidence = _carry(*_evidence(frames, flow), flow, decay)
    seeds = evidence > threshold
    if seeds.mean() < min_area:
        raise NoMovingObject(
            "no object moves differently from the camera in this video: give its box on the first "
            "frame with --object X,Y,W,H"
        )
    masks = []
    for i in range(t):
        seed = _largest_components(seeds[i])
        if not seed.any():
            masks.append(seed)
            continue
        r = _band(seed, 0.15, 3)
        labels = _trimap(seed, r)
        masks.append(_clean(_grabcut(images[i], labels, iterations, 2 * r + 4, max_pixels), smooth))
    log.info("masks from motion for %d frames in %.1f s", t, time.perf_counter() - start)
    return torch.from_numpy(np.stack(masks))


def find_masks(
    frames: torch.Tensor, box: tuple[int, int, int, int] | None = None, flow: FlowField | None = None
) -> torch.Tensor:
    """The object's masks (T, H, W) bool: followed from ``box`` on the first frame
    (:func:`masks_from_box`), or without a box found from its motion (:func:`masks_from_motion`,
    which raises :class:`NoMovingObject` when nothing moves unlike the camera)."""
    if box is None:
        return masks_from_motion(frames, flow=flow)
    return masks_from_box(frames, box, flow=flow)


def region_similarity(masks: torch.Tensor, truth: torch.Tensor) -> float:
    """J: the mean over frames of intersection over union (a frame where both are empty counts 1)."""
    m, g = masks.bool(), truth.bool()
    inter = (m & g).flatten(1).sum(1).float()
    union = (m | g).flatten(1).sum(1).float()
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))
    return float(iou.mean())


def overlay(frames: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The masks over the frames, for judging them: (T, 3, H, W) uint8, the object tinted red and
    outlined, the background dimmed."""
    cv2 = _cv2()
    images = _frames_hwc(frames).astype(np.float32)
    out = []
    for img, m in zip(images, masks.cpu().numpy().astype(bool), strict=True):
        view = np.where(m[..., None], 0.6 * img + np.float32([102, 0, 0]), 0.45 * img)
        edge = cv2.morphologyEx(m.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3), np.uint8)) > 0
        view[edge] = (255, 255, 0)
        out.append(view.clip(0, 255).astype(np.uint8))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def write_masks(
    folder: str | os.PathLike, frames: torch.Tensor, masks: torch.Tensor, fps: float
) -> tuple[Path, Path]:
    """Write ``folder/masks/00000.png ...`` (255 = object, the layout ``--masks DIR`` reads) and
    ``folder/masks.mp4`` (:func:`overlay`), each file whole. Returns (masks folder, video path)."""
    from PIL import Image

    from t2l_fast.video_io import write_video

    folder = Path(folder)
    mask_dir = folder / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(masks.cpu().numpy().astype(bool)):
        with atomic_path(mask_dir / f"{i:05d}.png") as tmp:
            Image.fromarray(m.astype(np.uint8) * 255).save(tmp, format="PNG")
    for old in mask_dir.glob("[0-9][0-9][0-9][0-9][0-9].png"):  # a longer earlier run's extra masks
        if int(old.stem) >= len(masks):
            old.unlink()
    video = write_video(folder / "masks.mp4", overlay(frames, masks), fps)
    return mask_dir, video
