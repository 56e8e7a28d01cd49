"""``t2l-fast atlas VIDEO``: fit a layered atlas to a video in minutes (registered by t2l_fast.cli)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from ..config import FitConfig
from ..device import resolve_device
from ..fit.fit import FitResult
from ..io import InputError, check_output_dir
from ..request import QUICK_ATLAS, QUICK_FIT, check_object, fit_config, fit_frames, parse_box
from .common import Device, fail, plural

NO_MASKS_NOTE = (
    "note: no --masks given: fitting a background-only atlas (alpha = 0, blank foreground atlas); "
    "background edits work, foreground edits need masks (--masks DIR: one PNG per frame, 255 = object)"
)
OUTPUTS = FitResult.OUTPUTS  # what the command writes (FitResult.save)
OBJECT_NAMES = {"masks": "--masks", "auto": "--masks auto", "box": "--object"}

Video = Annotated[Path, typer.Argument(help="The video: a file (mp4, mov, ...) or a folder of frames.")]
Masks = Annotated[
    str,
    typer.Option(
        "--masks",
        "-m",
        help="Folder of per-frame object masks (PNG, 255 = object), DAVIS style; or 'auto': the object "
        "found from its motion (written to OUT/masks/ and OUT/masks.mp4 before the fit).",
    ),
]
ObjectBox = Annotated[
    str,
    typer.Option(
        "--object",
        help="X,Y,W,H: a box around the object on the first frame (pixels of the video as given); "
        "the object is segmented there and followed through the video (masks written to OUT/masks/).",
    ),
]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder (default: atlas_<video name>).")]
Iterations = Annotated[int, typer.Option(help="Optimisation steps (default 2000).")]
Size = Annotated[str, typer.Option(help="Frame size WIDTHxHEIGHT the atlas is fitted at (default 768x432).")]
Frames = Annotated[int, typer.Option("--frames", "-n", help="Use only the first N frames.")]
Batch = Annotated[int, typer.Option(help="Pixels per step (default 65536 on CUDA, 8192 on the CPU).")]
FitOverrides = Annotated[
    list[str],
    typer.Option(
        "--set",
        metavar="KEY=VALUE",
        help="Override a fit setting (t2l_fast.fit.FitConfig): --set w_rigidity=1e-3",
    ),
]
Quick = Annotated[
    bool,
    typer.Option(
        "--quick",
        help=f"Small settings that finish in about a minute on a CPU (--set {' '.join(QUICK_FIT)}, the "
        f"first {QUICK_ATLAS['frames']} frames at {QUICK_ATLAS['size']}; the flags and --set still "
        "apply): checks the installation; edit the result with edit --quick.",
    ),
]


@dataclass
class _Inputs:
    """A fit's checked inputs: its settings, the frames (read at ``size``) and how the object is marked."""

    cfg: FitConfig
    size: tuple[int, int]  # (W, H)
    frames: Any  # (T, 3, H, W) uint8
    fps: float
    masks: Any = None  # (T, H, W) from a folder of masks, or None
    auto: bool = False
    box: tuple[float, float, float, float] | None = None  # scaled to ``size``


def atlas(
    video: Video,
    masks: Masks = None,
    object_box: ObjectBox = None,
    out: Out = None,
    iterations: Iterations = None,
    size: Size = None,
    frames: Frames = None,
    batch: Batch = None,
    device: Device = "auto",
    overrides: FitOverrides = None,
    quick: Quick = False,
) -> None:
    """Fit a layered neural atlas (background + foreground) to VIDEO; writes the atlas for video edits,
    a reconstruction video, the atlas images and the fit's PSNR to OUT. Rerun to resume."""
    out = out or Path(f"atlas_{video.stem or 'video'}")
    try:
        resolve_device(device)  # a bad or unavailable device fails here, before anything loads
        inputs = _read_inputs(
            video, masks, object_box, out, iterations, size, frames, batch, overrides, quick
        )
    except InputError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted before fitting started; nothing written", 130) from None
    flow = _find_masks(inputs, out) if inputs.auto or inputs.box is not None else None
    if flow is None and inputs.masks is None:
        typer.echo(NO_MASKS_NOTE, err=True)
    source: dict[str, Any] = {"video": str(video), "masks": str(masks) if masks else None, "fps": inputs.fps}
    if object_box is not None:
        source["object"] = list(parse_box(object_box))
    stats = _fit(inputs, out, device, source, flow)
    typer.echo(
        f"reconstruction PSNR {stats.psnr:.2f} dB after {plural(stats.iterations, 'iteration')} "
        f"({stats.fit_seconds:.0f} s fitting, {stats.flow_seconds:.0f} s flow)"
    )
    if stats.interrupted:
        typer.echo(
            f"interrupted at iteration {stats.iterations}: rerun the same command to continue", err=True
        )
    if inputs.masks is None:
        typer.echo(
            "note: background-only atlas: foreground edits need --masks (or --object X,Y,W,H)", err=True
        )
    typer.echo(f"wrote {plural(len(OUTPUTS), 'file')} to {out}/")
    if stats.interrupted:
        raise typer.Exit(130)


def _read_inputs(video, masks, object_box, out, iterations, size, frames, batch, overrides, quick) -> _Inputs:
    """The request checked (settings, frame count and size, how the object is marked), then the
    frames and masks read; InputError for every problem, before any fitting."""
    from ..fit import read_masks
    from ..fit.segment import scale_box
    from ..video_io import read_video

    cfg = fit_config(overrides or (), quick=quick, iterations=iterations, batch=batch)
    frames, wh = fit_frames(frames, size, quick)
    auto = masks == "auto"
    box = parse_box(object_box) if object_box is not None else None
    mode = "box" if box is not None else "auto" if auto else "masks"
    check_object(mode, masks is not None and mode != "auto", OBJECT_NAMES)
    check_output_dir(out)
    if masks is not None and not auto and not Path(masks).is_dir():
        raise InputError(f"--masks {masks} is not a folder of mask images (or 'auto')")
    if box is not None:  # checked against the first frame as given, before the whole video is read
        first, _ = read_video(video, max_frames=1, size=None)
        box = scale_box(box, (first.shape[3], first.shape[2]), wh)
    video_frames, fps = read_video(video, max_frames=frames, size=wh)
    t = video_frames.shape[0]
    if t < 3:
        raise InputError(f"{video} has {t} frame(s); fitting an atlas needs at least 3")
    mask_tensor = None
    if masks is not None and not auto:
        native, _ = read_video(video, max_frames=1, size=None)
        native_size = (native.shape[3], native.shape[2])
        truncated = frames is not None and t == frames
        mask_tensor = read_masks(masks, t, wh, native_size, frames_truncated=truncated)
    return _Inputs(cfg, wh, video_frames, fps, mask_tensor, auto, box)


def _find_masks(inputs: _Inputs, out: Path):
    """The object's masks from its motion (``auto``) or its box, written to OUT; -> the flow (the fit
    reuses it). ``inputs.masks`` stays None when no moving object is found."""
    from ..fit import NoMovingObject, compute_flow, find_masks, write_masks

    try:
        flow = compute_flow(inputs.frames, inputs.cfg.flow_preset)
        how = "finding the moving object from the flow" if inputs.auto else "following the object in the box"
        typer.echo(how + " ...", err=True)
        inputs.masks = find_masks(inputs.frames, None if inputs.auto else inputs.box, flow=flow)
        out.mkdir(parents=True, exist_ok=True)
        mask_dir, mask_video = write_masks(out, inputs.frames, inputs.masks, inputs.fps)
    except NoMovingObject as exc:
        typer.echo(f"note: {exc}; fitting a background-only atlas", err=True)
        return flow
    except InputError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted before fitting started; no atlas written", 130) from None
    typer.echo(
        f"wrote the masks to {mask_dir}/ and {mask_video} (to correct them: edit the PNGs "
        f"and rerun with --masks {mask_dir})",
        err=True,
    )
    return flow


def _fit(inputs: _Inputs, out: Path, device: str, source: dict, flow):
    """Fit (resuming from OUT when a state is there) and write the outputs; -> the fit's stats."""
    from ..fit import CHECKPOINT_NAME, fit_atlas

    out.mkdir(parents=True, exist_ok=True)
    resuming = (out / CHECKPOINT_NAME).is_file()
    (w, h), t = inputs.size, inputs.frames.shape[0]
    typer.echo(
        f"fitting an atlas to {plural(t, 'frame')} of {w}x{h} from {source['video']} for "
        f"{plural(inputs.cfg.iterations, 'iteration')}"
        + (f" (resuming from {out / CHECKPOINT_NAME})" if resuming else ""),
        err=True,
    )
    try:
        fitted = fit_atlas(
            inputs.frames,
            inputs.masks,
            inputs.cfg,
            device=device,
            progress=True,
            resume_dir=out,
            meta={"source": source},
            flow=flow,
        )
    except InputError as exc:
        raise fail(str(exc)) from None
    try:
        fitted.save(out, inputs.fps, info={"source": source, "size": list(inputs.size)})
    except KeyboardInterrupt:
        raise fail("interrupted while writing; files already written are whole", 130) from None
    return fitted.stats
