"""``t2l-fast atlas VIDEO``: fit a layered atlas to a video in minutes (registered by t2l_fast.cli)."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import QUICK_ATLAS, QUICK_FIT, fail, plural
from .config import parse_overrides, set_value
from .device import resolve_device
from .fit.fit import FitResult
from .io import InputError, check_output_dir

NO_MASKS_NOTE = (
    "note: no --masks given: fitting a background-only atlas (alpha = 0, blank foreground atlas); "
    "background edits work, foreground edits need masks (--masks DIR: one PNG per frame, 255 = object)"
)
OUTPUTS = FitResult.OUTPUTS  # what the command writes (FitResult.save)


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``--object X,Y,W,H`` -> four numbers (pixels of the video as given); InputError when malformed."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(v == v and abs(v) != float("inf") for v in values):
        raise InputError(
            f"--object {text!r} is not X,Y,W,H: four numbers, the box's left, top, width and height "
            "in pixels of the first frame (e.g. --object 620,180,110,100)"
        )
    return values  # type: ignore[return-value]


def build_fit_config(overrides: list[str], **flags):
    """The fit's settings: defaults, then ``--set key=value`` (through the editor's ``set_value``),
    then the explicit flags (None: not given); validated before any frame is read."""
    from .fit import FitConfig

    cfg = parse_overrides(FitConfig(), overrides)
    for name, value in flags.items():
        if value is not None:
            set_value(cfg, name, value)
    cfg.__post_init__()  # FitConfig's own checks, on the final values
    return cfg


def atlas(
    video: Path = typer.Argument(..., help="The video: a file (mp4, mov, ...) or a folder of frames."),
    masks: str = typer.Option(
        None,
        "--masks",
        "-m",
        help="Folder of per-frame object masks (PNG, 255 = object), DAVIS style; or 'auto': the object "
        "found from its motion (written to OUT/masks/ and OUT/masks.mp4 before the fit).",
    ),
    object_box: str = typer.Option(
        None,
        "--object",
        help="X,Y,W,H: a box around the object on the first frame (pixels of the video as given); "
        "the object is segmented there and followed through the video (masks written to OUT/masks/).",
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: atlas_<video name>)."),
    iterations: int = typer.Option(None, help="Optimisation steps (default 2000)."),
    size: str = typer.Option(None, help="Frame size WIDTHxHEIGHT the atlas is fitted at (default 768x432)."),
    frames: int = typer.Option(None, "--frames", "-n", help="Use only the first N frames."),
    batch: int = typer.Option(None, help="Pixels per step (default 65536 on CUDA, 8192 on the CPU)."),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N or cpu."),
    overrides: list[str] = typer.Option(
        [],
        "--set",
        metavar="KEY=VALUE",
        help="Override a fit setting (t2l_fast.fit.FitConfig): --set w_rigidity=1e-3",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help=f"Small settings that finish in about a minute on a CPU (--set {' '.join(QUICK_FIT)}, the "
        f"first {QUICK_ATLAS['frames']} frames at {QUICK_ATLAS['size']}; the flags and --set still "
        "apply): checks the installation; edit the result with edit --quick.",
    ),
) -> None:
    """Fit a layered neural atlas (background + foreground) to VIDEO; writes the atlas for video edits,
    a reconstruction video, the atlas images and the fit's PSNR to OUT. Rerun to resume."""
    from .fit import (
        CHECKPOINT_NAME,
        NoMovingObject,
        compute_flow,
        find_masks,
        fit_atlas,
        read_masks,
        write_masks,
    )
    from .fit.segment import scale_box
    from .video_io import parse_size, read_video

    out = out or Path(f"atlas_{video.stem or 'video'}")
    try:
        resolve_device(device)  # a bad or unavailable device fails here, before anything loads
        if quick:  # under --set and the flags, as for edit --quick
            overrides = [*QUICK_FIT, *overrides]
            frames = QUICK_ATLAS["frames"] if frames is None else frames
            size = size or QUICK_ATLAS["size"]
        size = size or "768x432"
        cfg = build_fit_config(overrides, iterations=iterations, batch=batch)
        if cfg.iterations < 1:
            raise InputError(f"--iterations must be > 0 (got {cfg.iterations})")
        if frames is not None and frames < 3:
            raise InputError(f"--frames must be at least 3 (got {frames})")
        wh = parse_size(size)
        auto = masks == "auto"
        box = parse_box(object_box) if object_box is not None else None
        if box is not None and masks is not None:
            raise InputError(
                "--object and --masks are alternatives: give the object's box, or its masks (or 'auto')"
            )
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
            mask_tensor = read_masks(
                masks, t, wh, native_size, frames_truncated=frames is not None and t == frames
            )
    except InputError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted before fitting started; nothing written", 130) from None

    flow = None
    if auto or box is not None:
        try:
            flow = compute_flow(video_frames, cfg.flow_preset)  # the fit reuses it
            how = "finding the moving object from the flow" if auto else "following the object in the box"
            typer.echo(how + " ...", err=True)
            mask_tensor = find_masks(video_frames, None if auto else box, flow=flow)
            out.mkdir(parents=True, exist_ok=True)
            mask_dir, mask_video = write_masks(out, video_frames, mask_tensor, fps)
        except NoMovingObject as exc:
            typer.echo(f"note: {exc}; fitting a background-only atlas", err=True)
        except InputError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted before fitting started; no atlas written", 130) from None
        else:
            typer.echo(
                f"wrote the masks to {mask_dir}/ and {mask_video} (to correct them: edit the PNGs "
                f"and rerun with --masks {mask_dir})",
                err=True,
            )
    elif mask_tensor is None:
        typer.echo(NO_MASKS_NOTE, err=True)
    out.mkdir(parents=True, exist_ok=True)
    resuming = (out / CHECKPOINT_NAME).is_file()
    typer.echo(
        f"fitting an atlas to {plural(t, 'frame')} of {wh[0]}x{wh[1]} from {video} for "
        f"{plural(cfg.iterations, 'iteration')}"
        + (f" (resuming from {out / CHECKPOINT_NAME})" if resuming else ""),
        err=True,
    )
    source = {"video": str(video), "masks": str(masks) if masks else None, "fps": fps}
    if object_box is not None:
        source["object"] = list(parse_box(object_box))
    try:
        fitted = fit_atlas(
            video_frames,
            mask_tensor,
            cfg,
            device=device,
            progress=True,
            resume_dir=out,
            meta={"source": source},
            flow=flow,
        )
    except InputError as exc:
        raise fail(str(exc)) from None

    try:
        fitted.save(out, fps, info={"source": source, "size": list(wh)})
    except KeyboardInterrupt:
        raise fail("interrupted while writing; files already written are whole", 130) from None
    stats = fitted.stats
    typer.echo(
        f"reconstruction PSNR {stats.psnr:.2f} dB after {plural(stats.iterations, 'iteration')} "
        f"({stats.fit_seconds:.0f} s fitting, {stats.flow_seconds:.0f} s flow)"
    )
    if stats.interrupted:
        typer.echo(
            f"interrupted at iteration {stats.iterations}: rerun the same command to continue", err=True
        )
    if mask_tensor is None:
        typer.echo(
            "note: background-only atlas: foreground edits need --masks (or --object X,Y,W,H)", err=True
        )
    typer.echo(f"wrote {plural(len(OUTPUTS), 'file')} to {out}/")
    if stats.interrupted:
        raise typer.Exit(130)
