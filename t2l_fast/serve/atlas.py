"""The page's atlas step: the uploaded video's first frame (to draw the object's box on) and the atlas
fit with its progress (:class:`AtlasTab`, part of :class:`~t2l_fast.serve.App`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..config import FitConfig
from ..io import InputError
from ..request import OBJECT_MODES, check_object, fit_config, fit_frames, whole_number
from .inputs import extract_images
from .state import AppState, field_name
from .worker import Progress

#: How the page names the ways to mark the object in an error.
OBJECT_NAMES = {"masks": "a masks zip", "auto": "finding the object from its motion", "box": "a box"}


@dataclass
class _Fit:
    """An atlas fit's checked inputs: its settings, the frames and how the object is marked."""

    cfg: FitConfig
    out: Path
    frames: Any  # (T, 3, H, W) uint8
    fps: float
    size: tuple[int, int]
    count: int | None  # the frames asked for (None: all)
    find: str
    device: Any = None
    masks: Any = None  # (T, H, W) from the masks zip, or None
    box: tuple[float, ...] | None = None  # scaled to ``size``


class AtlasTab(AppState):
    """The atlas step's handlers."""

    #: How the object is marked for an atlas fit: a masks zip (or none), found from motion, a box.
    OBJECT_MODES = OBJECT_MODES

    def first_frame(self, video: str | os.PathLike | None) -> str | None:
        """The uploaded video's first frame as given (a PNG path; None without a video), on which the
        object's box is drawn."""
        from ..video_io import read_video

        if not video:
            return None
        out = self._job_dir("first-frame")
        frame, _ = read_video(self.video_source(video, out), max_frames=1, size=None)
        path = out / "first_frame.png"
        Image.fromarray(frame[0].permute(1, 2, 0).numpy()).save(path)
        return str(path)

    @staticmethod
    def draw_box(frame: str | None, x=None, y=None, w=None, h=None) -> Image.Image | None:
        """The first frame with the box (x, y, w, h; pixels of the video as given) drawn when given."""
        from PIL import ImageDraw

        if not frame:
            return None
        image = Image.open(frame).convert("RGB")
        if all(v is not None for v in (x, y, w, h)) and w > 0 and h > 0:
            width = max(2, round(max(image.size) / 300))
            ImageDraw.Draw(image).rectangle((x, y, x + w - 1, y + h - 1), outline=(255, 32, 32), width=width)
        return image

    def fit_atlas(
        self,
        session: str,
        video: str | os.PathLike | None,
        masks: str | os.PathLike | None,
        iterations: float = 2000,
        size: str = "768x432",
        frames: float | None = None,
        find: str = "masks",
        box: tuple | None = None,
    ) -> Iterator[dict[str, object]]:
        """Fit a layered atlas to the uploaded video; yields progress, then the atlas (``atlas``: the
        file for the edit), its reconstruction video, atlas images and PSNR. The object: the masks
        zip (``find="masks"``; none: background only), found from its motion (``"auto"``) or from
        ``box`` (x, y, w, h) on the first frame (``"box"``); those two yield ``masks_video`` (the
        masks over the frames) before the fit starts."""
        fit = self._fit_inputs(video, masks, iterations, size, frames, find, box)
        t, (w, h) = fit.frames.shape[0], fit.size
        progress = Progress(fit.cfg.iterations, f"fitting the atlas to {t} frames of {w}x{h}")
        if find == "auto":
            note = "\n\nfinding the moving object first ..."
        elif find == "box":
            note = "\n\nsegmenting the object in the box and following it first ..."
        else:
            note = "" if fit.masks is not None else "\n\nnote: no masks: a background-only atlas"
        yield {"status": progress.status() + note}
        source_info = {"video": Path(str(video)).name, "masks": bool(masks) if find == "masks" else find}
        for event in self._events(session, lambda emit, check: _fit_work(fit, source_info, emit, check)):
            if event.kind == "masks":
                mask_video, message = event.payload
                note = f"\n\n{message}"
                yield {"status": progress.status() + note, "masks_video": mask_video}
            elif event.kind == "step":
                progress.step(*event.payload)
                yield {"status": progress.status() + f" (PSNR {event.payload[1]['psnr']:.1f} dB)" + note}
            elif event.kind == "done":
                yield _fitted(event.payload.stats, fit)

    def _fit_inputs(self, video, masks, iterations, size, frames, find, box) -> _Fit:
        """The fit request checked (through :mod:`t2l_fast.request`), then the frames and masks read."""
        from ..fit import read_masks
        from ..fit.segment import scale_box
        from ..video_io import read_video

        check_object(find, bool(masks), OBJECT_NAMES)
        if find == "box" and (box is None or len(box) != 4 or any(v is None for v in box)):
            raise InputError("give the object's box on the first frame: X, Y, W and H in pixels")
        out = self._job_dir("atlas")
        source = self.video_source(video, out)
        if iterations is None:
            raise InputError("iterations must be a whole number >= 1 (got None)")
        cfg = fit_config(iterations=whole_number(iterations, "iterations"), name=field_name)
        n, wh = fit_frames(int(frames) if frames else None, size, name=field_name)
        if find == "box":  # checked in the first frame as given, before the whole video is read
            native, _ = read_video(source, max_frames=1, size=None)
            box = scale_box(tuple(float(v) for v in box), (native.shape[3], native.shape[2]), wh)
        video_frames, fps = read_video(source, max_frames=n, size=wh)
        t = video_frames.shape[0]
        if t < 3:
            raise InputError(f"the video has {t} frame(s); fitting an atlas needs at least 3")
        fit = _Fit(cfg, out, video_frames, fps, wh, n, find, self.device, box=box)
        if masks:
            folder = extract_images(masks, out / "masks", "masks", self.limits)
            native, _ = read_video(source, max_frames=1, size=None)
            native_size = (native.shape[3], native.shape[2])
            fit.masks = read_masks(folder, t, wh, native_size, frames_truncated=n is not None and t == n)
        return fit


def _fit_work(fit: _Fit, source_info: dict, emit, check):
    """The fit in the run's thread: the object's masks first when they are to be found (the flow is
    computed once: for the masks, then for the fit), then the fit, saved as ``t2l-fast atlas`` saves it."""
    from ..fit import NoMovingObject, compute_flow, find_masks, fit_atlas, write_masks

    def on_step(iteration, psnr):
        emit("step", (iteration - 1, {"psnr": psnr}))
        check()

    flow = None
    if fit.find != "masks":
        flow = compute_flow(fit.frames, fit.cfg.flow_preset)
        check()
        try:
            fit.masks = find_masks(fit.frames, fit.box if fit.find == "box" else None, flow=flow)
        except NoMovingObject as exc:
            emit("masks", (None, f"note: {exc}; fitting a background-only atlas"))
        else:
            _, mask_video = write_masks(fit.out, fit.frames, fit.masks, fit.fps)
            emit("masks", (str(mask_video), "the object's masks: see the masks video"))
        check()
    info = {**source_info, "fps": fit.fps}
    fitted = fit_atlas(
        fit.frames,
        fit.masks,
        fit.cfg,
        device=fit.device,
        progress=False,
        on_step=on_step,
        meta={"source": info},
        flow=flow,
    )
    fitted.save(fit.out, fit.fps, info={"source": info, "size": list(fit.size)})
    return fitted


def _fitted(stats, fit: _Fit) -> dict[str, object]:
    """The page update of a finished fit: its summary and its outputs."""
    text = (
        f"atlas fitted: {stats.iterations} iterations, reconstruction PSNR {stats.psnr:.2f} dB"
        + (" (cancelled early)" if stats.interrupted else "")
        + ("" if fit.masks is not None else "; background only (no masks)")
    )
    return {
        "status": text,
        "atlas": str(fit.out / "atlas.safetensors"),
        "frames": fit.count,
        "reconstruction": str(fit.out / "reconstruction.mp4"),
        "background_atlas": str(fit.out / "background_atlas.png"),
        "foreground_atlas": str(fit.out / "foreground_atlas.png"),
    }
