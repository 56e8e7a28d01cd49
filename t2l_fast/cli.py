"""The ``t2l-fast`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from .batch import batch
from .cli_atlas import atlas
from .cli_common import QUICK_EDIT, Command, fail, plural
from .cli_serve import serve
from .config import Config, load_yaml, parse_overrides, preset, set_value
from .device import resolve_device
from .io import InputError, check_output_dir, save_png
from .video_io import FRAME_EXTENSIONS, VIDEO_EXTENSIONS, list_frame_files

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags without a <bool> type column
    help="Text-driven layered image and video editing (Text2LIVE), fast.",
)
app.command("atlas", cls=Command)(atlas)  # t2l-fast atlas: fit a layered atlas to a video (cli_atlas.py)
app.command("serve")(serve)  # t2l-fast serve: the web page (cli_serve.py; the [ui] extra)
app.command("batch", cls=Command)(batch)  # t2l-fast batch: a manifest of edits (batch.py)
log = logging.getLogger("t2l_fast")

NOT_A_REAL_EDIT = (
    "NOTE: --clip test-tiny is a small random test model: the result is NOT a real edit "
    "(use it to check the installation only)"
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"t2l-fast {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More logging."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Text-driven layered image and video editing (Text2LIVE), fast."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("root", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# Flags whose config key is not their own name; every other flag is the top-level key it names.
FLAG_KEYS = {
    "steps": "optim.steps",
    "size": "data.size",
    "atlas": "video.atlas",
    "layer": "video.layer",
    "frames": "video.frames",
    "write_frames": "video.write_frames",
}


def build_config(config: Path | None, overrides: list[str], base: Config | None = None, **flags) -> Config:
    """Preset, then the YAML file, then ``--set key=value``, then the explicit flags (None or False:
    not given), each applied as its config key through the same ``set_value`` as ``--set``.
    ``bootstrap=True`` applies the relevancy bootstrap over all the run's steps."""
    base = base or preset("image")
    cfg = load_yaml(config, base) if config is not None else base
    parse_overrides(cfg, overrides)
    bootstrap = flags.pop("bootstrap", False)
    for name, value in flags.items():
        if value is not None and value is not False:
            set_value(cfg, FLAG_KEYS.get(name, name), str(value) if isinstance(value, Path) else value)
    if bootstrap:
        cfg.loss.bootstrap_steps = cfg.optim.steps
    return cfg


VIDEO_FORMATS = ", ".join(e[1:] for e in VIDEO_EXTENSIONS)

# A deliberately LOW estimate of one step's seconds (image, video edit) at the default settings, per
# device type, so that the warning about a long run does not overstate: on the CPU far below what the
# 2-core build machine measured with ViT-B/32 (82 s an image step at 451x300, 316 s a video step at
# 768x432: the README's quickstart); on CUDA a guess (no GPU has been measured yet).
STEP_SECONDS = {"cpu": (1.0, 5.0), "cuda": (0.02, 0.05)}
DAY = 24 * 3600


def long_run_warning(steps: int, device_type: str, video: bool) -> str | None:
    """One line when ``steps`` would take more than a day even at the low per-step estimate."""
    per_step = STEP_SECONDS.get(device_type, STEP_SECONDS["cpu"])[video]
    seconds = steps * per_step
    if seconds <= DAY:
        return None
    return (
        f"warning: {plural(steps, 'step')} would take more than {seconds / DAY:,.0f} days on {device_type} "
        f"(at least {per_step:g} s a step); Ctrl-C stops the run and keeps the result so far"
    )


def check_text(cfg: Config) -> None:
    """Prompts must be text: bytes that are not UTF-8 (kept by Python as surrogate escapes from the
    command line) would reach CLIP as garbage."""
    for key, flag in (
        ("prompt", "--prompt"),
        ("screen_prompt", "--screen-prompt"),
        ("roi_prompt", "--roi-prompt"),
        ("bootstrap_prompt", "--set bootstrap_prompt"),
    ):
        value = getattr(cfg, key, None)
        for text in [value] if isinstance(value, str) else list(value or []):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InputError(
                    f"{flag} holds bytes that are not UTF-8 text (at character {exc.start + 1}): "
                    "write the prompt in UTF-8"
                ) from None


def check_input(path: Path) -> None:
    """The input's own problems first (before any flag is judged against it)."""
    if not path.exists():
        kind = "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"
        raise InputError(f"{kind} not found: {path}")
    if path.is_dir() and not list_frame_files(path):
        raise InputError(
            f"{path} is a folder without frame images ({', '.join(FRAME_EXTENSIONS)}): give an image, "
            "a video file or a folder of frames"
        )


def is_video_input(path: Path) -> bool:
    """A folder of frames or a video file (by extension) is a video; anything else an image."""
    from .video_io import VIDEO_EXTENSIONS

    return path.is_dir() or path.suffix.lower() in VIDEO_EXTENSIONS


@app.command(cls=Command)
def edit(
    image: Path = typer.Argument(
        ...,
        metavar="INPUT",
        help=f"The image, video file ({VIDEO_FORMATS}) or folder of frames to edit.",
    ),
    prompt: str = typer.Option(None, "--prompt", "-p", help="The edited image, e.g. 'a golden cat'."),
    screen_prompt: str = typer.Option(None, help="The edit layer alone (default: the prompt)."),
    roi_prompt: str = typer.Option(
        None,
        help="The region to edit in the source, e.g. 'cat'; enables the directional loss.",
    ),
    bootstrap: bool = typer.Option(
        False,
        "--bootstrap",
        help="Pull the edit's opacity towards CLIP's relevancy map of the ROI prompt over all steps "
        "(off by default, as in the original; --set loss.bootstrap_steps=N for the first N): images "
        "anneal its weight linearly, videos keep it constant on the step's last example, as the "
        "original does in effect.",
    ),
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML config (own or the reference's flat keys)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="Override a config key: --set loss.lambda_structure=3"
    ),
    steps: int = typer.Option(None, help="Optimisation steps (default 1000 for images, 3000 for videos)."),
    size: int = typer.Option(None, help="Images: resize so the short side is at most this (default 512)."),
    atlas: Path = typer.Option(None, help="Videos: an NLA checkpoint, or a folder made by `t2l-fast atlas`."),
    layer: str = typer.Option(
        None, help="Videos: the atlas layer to edit, background (default) or foreground."
    ),
    frames: int = typer.Option(None, help="Videos: use the first N frames."),
    write_frames: bool = typer.Option(False, "--write-frames", help="Videos: also write the frames as PNG."),
    clip: str = typer.Option(None, help="CLIP model: ViT-B-32 (default) or test-tiny (random, for tests)."),
    clip_weights: Path = typer.Option(
        None, help="Local CLIP weights: safetensors, state dict or OpenAI's ViT-B-32.pt."
    ),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N or cpu."),
    seed: int = typer.Option(None, help="Random seed (default 0; -1 draws one)."),
    preview_every: int = typer.Option(None, help="Images: write a preview into OUT/previews every N steps."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder."),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Small settings that finish in minutes on a CPU (few steps, small size, fewer views, a "
        "smaller generator): checks the installation, not a useful edit. Flags and --set still apply.",
    ),
) -> None:
    """Edit an image or a video as a text prompt says; writes the result and the RGBA edit layer to OUT."""
    try:
        check_input(image)
        video = is_video_input(image)
        device_type = resolve_device(device).type  # a bad or unavailable device fails here
        if steps is not None and steps <= 0:
            raise InputError(f"--steps must be > 0 (got {steps})")
        if frames is not None and frames <= 0:
            raise InputError(f"--frames must be > 0 (got {frames})")
        video_only = {
            "--atlas": atlas,
            "--layer": layer,
            "--frames": frames,
            "--write-frames": write_frames or None,
        }
        if not video:
            given = [name for name, value in video_only.items() if value is not None]
            if given:
                raise InputError(f"{', '.join(given)} apply to videos only, and {image} is not a video")
        elif size is not None or preview_every is not None:
            raise InputError("--size and --preview-every apply to images only")
        base = preset("video" if video else "image")
        if quick:
            parse_overrides(base, QUICK_EDIT["video" if video else "image"])
        cfg = build_config(
            config,
            overrides,
            base,
            prompt=prompt,
            screen_prompt=screen_prompt,
            roi_prompt=roi_prompt,
            seed=seed,
            clip=clip,
            clip_weights=clip_weights,
            preview_every=preview_every,
            steps=steps,
            size=size,
            atlas=atlas,
            layer=layer,
            frames=frames,
            write_frames=write_frames,
            bootstrap=bootstrap,
        )
        check_text(cfg)
        if cfg.clip_weights is not None and not Path(cfg.clip_weights).is_file():
            raise InputError(f"--clip-weights file not found: {cfg.clip_weights}")
        check_output_dir(out)
        warning = long_run_warning(cfg.optim.steps, device_type, video)
        if warning:
            typer.echo(warning, err=True)
        if video:
            _edit_video(image, cfg, device, out)
        else:
            _edit_image(image, cfg, device, out)
    except InputError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted before training started; nothing written", 130) from None


def _edit_image(image: Path, cfg: Config, device: str, out: Path) -> None:
    from .pipeline.image import ImageEditor

    editor = ImageEditor(cfg, device=device)
    run = editor.prepare(image)
    for note in run.notes:
        typer.echo(f"note: {image}: {note}", err=True)
    if cfg.clip == "test-tiny":
        typer.echo(NOT_A_REAL_EDIT, err=True)
    editor.load_clip(run)  # load now: weight errors surface before training
    cfg, (h, w) = run.config, run.source.shape[-2:]
    steps = plural(cfg.optim.steps, "step")
    typer.echo(f"editing {image} ({w}x{h}) for {steps} on {editor.device}", err=True)

    def preview(step: int, composite) -> None:
        folder = out / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        save_png(composite, folder / f"step_{step + 1:05d}.png")

    result = editor.train(run, on_preview=preview if cfg.preview_every else None, progress=True)
    _finish(result, out)


def _edit_video(video: Path, cfg: Config, device: str, out: Path) -> None:
    from .pipeline.video import VideoEditor

    editor = VideoEditor(cfg, device=device)
    run = editor.prepare(video)
    if cfg.clip == "test-tiny":
        typer.echo(NOT_A_REAL_EDIT, err=True)
    editor.load_clip(run)
    t, _, h, w = run.frames.shape
    typer.echo(
        f"editing the {cfg.video.layer} of {video} ({plural(t, 'frame')}, {w}x{h}) for "
        f"{plural(cfg.optim.steps, 'step')} "
        f"on {editor.device}",
        err=True,
    )
    result = editor.train(run, progress=True)
    _finish(result, out)


def _finish(result, out: Path) -> None:
    """Write the outputs; exit 130 when training was interrupted (the outputs are still written)."""
    try:
        paths = result.save(out)
    except KeyboardInterrupt:
        raise fail("interrupted while writing; files already written are whole", 130) from None
    if result.is_test_model:
        typer.echo(NOT_A_REAL_EDIT, err=True)
    typer.echo(f"wrote {plural(len(paths), 'file')} to {out}/ ({plural(result.steps_done, 'step')})")
    if result.interrupted:
        raise typer.Exit(130)


if __name__ == "__main__":  # pragma: no cover
    app()
