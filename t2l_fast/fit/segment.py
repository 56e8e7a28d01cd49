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
- :func:`remove_shadows` (both, by default): the object's cast shadow moves with it, so the flow
  carries it and GrabCut keeps it. Against a background model of the ground (the other frames
  aligned by the camera's homographies, where they do not show the object: their median), a shadow
  is the ground darker by a factor but of the same colour; such a region at the object's base that
  the mask has mostly taken in (the rest of it on the ground outside) is taken out.

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

from .flow import FlowField, _cv2, flow_for, pixel_grid, remap
from .motion import _carry, _evidence, _first_frame_evidence

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
# Cast shadows
# ---------------------------------------------------------------------------------------------------


def _camera_homographies(flow: FlowField, masks: np.ndarray, step: int = 8) -> np.ndarray:
    """(T, 3, 3) homographies G_t taking frame t's pixels to frame 0's: the camera's motion between
    consecutive frames fitted by RANSAC to the consistent forward flow off the masks (on a grid of
    ``step`` pixels), chained; a pair without a fit counts as still."""
    cv2 = _cv2()
    fwd, ok = flow.forward.numpy(), flow.forward_ok.numpy()
    _, h, w, _ = fwd.shape
    gy, gx = np.mgrid[step // 2 : h : step, step // 2 : w : step]
    chain = [np.eye(3)]
    for i in range(len(fwd)):
        sel = ok[i][gy, gx] & ~masks[i][gy, gx] & ~masks[i + 1][gy, gx]
        src = np.stack([gx[sel], gy[sel]], 1).astype(np.float32)
        hom = None
        if len(src) >= 16:
            hom, _ = cv2.findHomography(src, src + fwd[i][gy[sel], gx[sel]], cv2.RANSAC, 1.0, maxIters=500)
        if hom is None or not np.all(np.isfinite(hom)) or abs(np.linalg.det(hom)) < 1e-6:
            hom = np.eye(3)
        chain.append(chain[-1] @ np.linalg.inv(hom))
    return np.stack(chain)


def _median_of_valid(stack: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(K, N, 3) samples, (K, N) which count -> (N, 3) their median (lower middle); NaN with none."""
    x = np.where(valid[..., None], stack, np.inf)
    x.sort(axis=0)
    count = valid.sum(0)
    mid = (np.maximum(count, 1) - 1) // 2
    out = np.take_along_axis(x, np.broadcast_to(mid[None, :, None], (1, *x.shape[1:])), 0)[0]
    out[count == 0] = np.nan
    return out


def _ground_region(mask: np.ndarray, ground: float, small: tuple[int, int]):
    """Where a mask's shadow is looked for: the lowest ``ground`` fraction of the mask and some ground
    around it. -> (the first row of that fraction, the box (x0, x1, y0, y1) at the ``small`` (h, w)
    scale, the same box at full scale), or None (an empty mask, a box too small)."""
    (h, w), (sh, sw) = mask.shape, small
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    y0, y1 = int(ys.min()), int(ys.max())
    top = y1 - ground * (y1 - y0 + 1)
    pad = max(4, int(0.1 * (y1 - y0 + 1)))
    sx0, sx1 = max(0, int((xs.min() - pad) * sw / w)), min(sw, int((xs.max() + pad) * sw / w) + 1)
    sy0, sy1 = max(0, int((top - pad) * sh / h)), min(sh, int((y1 + pad) * sh / h) + 1)
    x0, x1 = int(sx0 * w / sw), min(w, int(sx1 * w / sw))
    y0r, y1r = int(sy0 * h / sh), min(h, int(sy1 * h / sh))
    if sx1 - sx0 < 2 or sy1 - sy0 < 2 or x1 <= x0 or y1r <= y0r:
        return None
    return top, (sx0, sx1, sy0, sy1), (x0, x1, y0r, y1r)


def _aligned_median(images: list, free: list, to_i: list, size: tuple[int, int]) -> np.ndarray:
    """The per-pixel median (h, w, 3) float32 of ``images`` warped by the homographies ``to_i`` into
    a (w, h) = ``size`` region, each where its ``free`` map (1 = background seen) says so."""
    cv2 = _cv2()
    stack, valid = [], []
    for image, seen, hom in zip(images, free, to_i, strict=True):
        stack.append(cv2.warpPerspective(image, hom, size, flags=cv2.INTER_LINEAR).reshape(-1, 3))
        shown = cv2.warpPerspective(seen, hom, size, flags=cv2.INTER_NEAREST, borderValue=0)
        valid.append(shown.reshape(-1) > 0)
    back = _median_of_valid(np.stack(stack).astype(np.float32), np.stack(valid))
    return back.reshape(size[1], size[0], 3)


def _shadow_like(img: np.ndarray, back: np.ndarray, darker: tuple[float, float], chroma: float) -> np.ndarray:
    """Pixels of ``img`` that are the background ``back`` darkened by a factor a in ``darker``, of the
    same colour: a = <I, B> / <B, B> and |I / a - B| <= ``chroma`` |B| (uint8 0/1, opened 3x3)."""
    cv2 = _cv2()
    norm = np.maximum((back * back).sum(-1), 1.0)
    gain = (img * back).sum(-1) / norm  # NaN where the background is never seen: not shadow
    with np.errstate(invalid="ignore"):  # |I / a - B| / |B|: the colour left once brightened back
        off = np.sqrt(((img - gain[..., None] * back) ** 2).sum(-1) / norm) / np.maximum(gain, 1e-3)
        like = (gain > darker[0]) & (gain < darker[1]) & (off <= chroma)
    return cv2.morphologyEx(like.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def _taken_in(like: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """The shadow the mask ``inside`` has taken in: the connected shadow-like regions that reach
    outside the mask (a shadow on the ground does) with at least as much of them inside as outside
    (an object's own dark base next to its shadow is the smaller part: it stays)."""
    _, comp = _cv2().connectedComponents(like.astype(np.uint8), connectivity=8)
    n_in = np.bincount(comp[inside], minlength=comp.max() + 1)
    n_out = np.bincount(comp[(like > 0) & ~inside], minlength=comp.max() + 1)
    reach = np.nonzero((n_out > 0) & (n_in >= n_out))[0]
    return np.isin(comp, reach) & inside


def remove_shadows(
    frames: torch.Tensor,
    masks: torch.Tensor,
    flow: FlowField | None = None,
    ground: float = 0.15,
    darker: tuple[float, float] = (0.05, 0.85),
    chroma: float = 0.2,
    samples: int = 12,
    window: int = 60,
    smooth: float = 0.02,
) -> torch.Tensor:
    """``masks`` without the object's cast shadow on the ground.

    The flow carries a cast shadow with its object, and GrabCut keeps it: it is as dark as tyres or
    shoes, and its outline on lit ground is the strongest edge around. What tells it is the ground
    behind: for each frame a background model is the per-pixel median of up to ``samples`` other
    frames within ``window`` frames, aligned to it by the camera's homographies (fitted to the flow
    off the masks), where their masks (grown by a quarter of the object's size) do not cover it. A
    pixel is shadow-like when it is that background darkened by a factor a in ``darker``, of the same
    colour: a = <I, B> / <B, B> and |I / a - B| <= ``chroma`` |B|. In the lowest ``ground`` fraction
    of the mask's height (where the object meets the ground), a connected region of shadow-like
    pixels that reaches outside the mask, with at least as much of it inside as outside, is the
    shadow taken in by the mask, and is taken out. A region mostly outside is the shadow beside an
    object whose own dark base touches it: the mask is left alone; and a region above the lowest
    part (a shaded side, a dark colour), or where the background model never sees the ground, too.
    What is lost: the object's dark base where it meets its taken-in shadow (the lower rims of tyres).
    Masks are then cleaned as the trackers do (``smooth``). ``frames`` (T, 3, H, W) uint8 (or float
    in [0, 1]) RGB, ``masks`` (T, H, W) bool (with the shadow), ``flow`` their
    :func:`~t2l_fast.fit.compute_flow` (computed when None) -> (T, H, W) bool.
    """
    cv2 = _cv2()
    images = _frames_hwc(frames)
    t, h, w, _ = images.shape
    m = masks.cpu().numpy().astype(bool)
    if m.shape != (t, h, w):
        raise InputError(f"masks are {tuple(m.shape)} but the frames need ({t}, {h}, {w})")
    if t < 2 or not m.any():
        return torch.from_numpy(m.copy())
    flow = flow_for(frames, flow)
    start = time.perf_counter()
    homs = _camera_homographies(flow, m)
    # the background model at about 240 rows: the ground is smooth, and this is the slow part
    scale = min(1.0, 240 / min(h, w))
    sw, sh = max(8, round(w * scale)), max(8, round(h * scale))
    to_small = np.diag([sw / w, sh / h, 1.0])
    small = [cv2.resize(img, (sw, sh), interpolation=cv2.INTER_AREA) for img in images]
    free = []  # where each frame shows the background: off its mask grown by a quarter of its size
    for mask in m:
        ms = cv2.resize(mask.astype(np.uint8), (sw, sh), interpolation=cv2.INTER_NEAREST)
        free.append(1 - (cv2.dilate(ms, _disk(_band(ms, 0.25, 2))) if ms.any() else ms))
    out = []
    for i in range(t):
        region = _ground_region(m[i], ground, (sh, sw))
        if region is None:
            out.append(m[i])
            continue
        top, (sx0, sx1, sy0, sy1), (x0, x1, y0r, y1r) = region
        lo, hi = max(0, i - window), min(t - 1, i + window)
        sources = [s for s in np.unique(np.linspace(lo, hi, samples + 1).round().astype(int)) if s != i]
        # the background there: the other frames aligned to this one, where they show the ground
        shift = np.array([[1.0, 0, -sx0], [0, 1.0, -sy0], [0, 0, 1.0]])
        to_i = [
            shift @ to_small @ np.linalg.inv(homs[i]) @ homs[s] @ np.linalg.inv(to_small) for s in sources
        ]
        back = _aligned_median(
            [small[s] for s in sources], [free[s] for s in sources], to_i, (sx1 - sx0, sy1 - sy0)
        )
        back = cv2.resize(back, (x1 - x0, y1r - y0r), interpolation=cv2.INTER_LINEAR)
        rows = np.arange(y0r, y1r)[:, None] > top
        like = _shadow_like(images[i, y0r:y1r, x0:x1].astype(np.float32), back, darker, chroma) & rows
        shadow = _taken_in(like, m[i, y0r:y1r, x0:x1])
        if not shadow.any():
            out.append(m[i])
            continue
        kept = m[i].copy()
        kept[y0r:y1r, x0:x1] &= ~shadow
        kept = cv2.morphologyEx(kept.astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8)) > 0
        out.append(_clean(kept, smooth) if kept.any() else m[i])
    log.info("cast shadows taken out of %d masks in %.1f s", t, time.perf_counter() - start)
    return torch.from_numpy(np.stack(out))


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
    iterations: int = 1,
    smooth: float = 0.02,
    decay: float = 0.8,
    shadows: bool = True,
) -> torch.Tensor:
    """The object inside ``box`` on frame 0, segmented there and carried through the video.

    Args:
        frames: (T, 3, H, W) uint8 (or float in [0, 1]) RGB.
        box: (x, y, w, h) in pixels of frame 0, around the object.
        flow: the frames' :func:`~t2l_fast.fit.compute_flow` (computed when None).
        band: half-width of the uncertain band around the carried mask, as a fraction of the square
            root of the object's area (at least 2 px).
        iterations: GrabCut iterations per frame (more pull the mask further into a cast shadow).
        smooth, decay: as in :func:`masks_from_motion` (the motion evidence of the first frames
            starts what in the box moves with the camera as background, when it tells the object
            from the rest of the box).
        shadows: take the object's cast shadow out of the masks returned (:func:`remove_shadows`,
            after the tracking: carried from frame to frame without it, the masks lost more).
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
    flow = flow_for(frames, flow)
    backward = flow.backward.numpy()
    xx, yy = pixel_grid(h, w)

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
        prior = remap(masks[-1].astype(np.float32), backward[i - 1], xx, yy) > 0.5
        if not prior.any():
            masks.append(prior)
            continue
        r = _band(prior, band, 2)
        masks.append(_clean(_grabcut(images[i], _trimap(prior, r), iterations, 2 * r + 4), smooth))
    log.info("masks from the box for %d frames in %.1f s", t, time.perf_counter() - start)
    out = torch.from_numpy(np.stack(masks))
    return remove_shadows(frames, out, flow, smooth=smooth) if shadows else out


# ---------------------------------------------------------------------------------------------------
# From motion (the evidence: t2l_fast.fit.motion)
# ---------------------------------------------------------------------------------------------------


def masks_from_motion(
    frames: torch.Tensor,
    flow: FlowField | None = None,
    decay: float = 0.8,
    threshold: float = 0.5,
    min_area: float = 0.002,
    iterations: int = 2,
    smooth: float = 0.02,
    max_pixels: int = 100_000,
    shadows: bool = True,
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
        shadows: take the object's cast shadow out of the masks (:func:`remove_shadows`; it moves
            with the object, so its motion finds it too).
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
    flow = flow_for(frames, flow)
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
    out = torch.from_numpy(np.stack(masks))
    return remove_shadows(frames, out, flow, smooth=smooth) if shadows else out


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
