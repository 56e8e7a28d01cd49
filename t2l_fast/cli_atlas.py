"""``t2l-fast atlas VIDEO``: fit a layered atlas to a video in minutes (registered by t2l_fast.cli)."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import fail
from .config import parse_overrides, set_value
from .device import resolve_device
from .fit.fit import FitResult
from .io import InputError, check_output_dir

NO_MASKS_NOTE = (
    "note: no --masks given: fitting a background-only atlas (alpha = 0, blank foreground atlas); "
    "background edits work, foreground edits need masks (--masks DIR: one PNG per frame, 255 = object)"
)
OUTPUTS = FitResult.OUTPUTS  # what the command writes (FitResult.save)


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
    masks: Path = typer.Option(
        None, "--masks", "-m", help="Folder of per-frame object masks (PNG, 255 = object), DAVIS style."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (default: atlas_<video name>)."),
    iterations: int = typer.Option(None, help="Optimisation steps (default 2000)."),
    size: str = typer.Option("768x432", help="Frame size WIDTHxHEIGHT the atlas is fitted at."),
    frames: int = typer.Option(None, "--frames", "-n", help="Use only the first N frames."),
    batch: int = typer.Option(None, help="Pixels per step (default 65536 on CUDA, 8192 on the CPU)."),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N or cpu."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a fit setting (t2l_fast.fit.FitConfig): --set w_rigidity=1e-3"
    ),
) -> None:
    """Fit a layered neural atlas (background + foreground) to VIDEO; writes the atlas for video edits,
    a reconstruction video, the atlas images and the fit's PSNR to OUT. Rerun to resume."""
    from .fit import CHECKPOINT_NAME, fit_atlas, read_masks
    from .video_io import parse_size, read_video

    out = out or Path(f"atlas_{video.stem or 'video'}")
    try:
        resolve_device(device)  # a bad or unavailable device fails here, before anything loads
        cfg = build_fit_config(overrides, iterations=iterations, batch=batch)
        if frames is not None and frames < 3:
            raise InputError(f"--frames must be at least 3 (got {frames})")
        wh = parse_size(size)
        check_output_dir(out)
        if masks is not None and not masks.is_dir():
            raise InputError(f"--masks {masks} is not a folder of mask images")
        video_frames, fps = read_video(video, max_frames=frames, size=wh)
        t = video_frames.shape[0]
        if t < 3:
            raise InputError(f"{video} has {t} frame(s); fitting an atlas needs at least 3")
        mask_tensor = None
        if masks is not None:
            native, _ = read_video(video, max_frames=1, size=None)
            native_size = (native.shape[3], native.shape[2])
            mask_tensor = read_masks(
                masks, t, wh, native_size, frames_truncated=frames is not None and t == frames
            )
    except InputError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted before fitting started; nothing written", 130) from None

    if mask_tensor is None:
        typer.echo(NO_MASKS_NOTE, err=True)
    out.mkdir(parents=True, exist_ok=True)
    resuming = (out / CHECKPOINT_NAME).is_file()
    typer.echo(
        f"fitting an atlas to {t} frames of {wh[0]}x{wh[1]} from {video} for {cfg.iterations} iterations"
        + (f" (resuming from {out / CHECKPOINT_NAME})" if resuming else ""),
        err=True,
    )
    source = {"video": str(video), "masks": str(masks) if masks else None, "fps": fps}
    try:
        fitted = fit_atlas(
            video_frames,
            mask_tensor,
            cfg,
            device=device,
            progress=True,
            resume_dir=out,
            meta={"source": source},
        )
    except InputError as exc:
        raise fail(str(exc)) from None

    try:
        fitted.save(out, fps, info={"source": source, "size": list(wh)})
    except KeyboardInterrupt:
        raise fail("interrupted while writing; files already written are whole", 130) from None
    stats = fitted.stats
    typer.echo(
        f"reconstruction PSNR {stats.psnr:.2f} dB after {stats.iterations} iterations "
        f"({stats.fit_seconds:.0f} s fitting, {stats.flow_seconds:.0f} s flow)"
    )
    if stats.interrupted:
        typer.echo(
            f"interrupted at iteration {stats.iterations}: rerun the same command to continue", err=True
        )
    if mask_tensor is None:
        typer.echo("note: background-only atlas: foreground edits need --masks", err=True)
    typer.echo(f"wrote {len(OUTPUTS)} files to {out}/")
    if stats.interrupted:
        raise typer.Exit(130)
