"""``t2l-fast edit INPUT``: edit an image or a video as a text prompt says (registered by t2l_fast.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..device import resolve_device
from ..io import InputError, check_output_dir, save_png
from ..request import check_input, edit_config, edit_variants
from ..video_io import VIDEO_EXTENSIONS
from .common import NOT_A_REAL_EDIT, ClipName, ClipWeights, Device, fail, plural

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


Input = Annotated[
    Path,
    typer.Argument(
        metavar="INPUT", help=f"The image, video file ({VIDEO_FORMATS}) or folder of frames to edit."
    ),
]
Prompt = Annotated[
    list[str],
    typer.Option(
        "--prompt",
        "-p",
        metavar="TEXT",
        help="The edited image or video, e.g. 'a golden cat'. Repeat it (or --seed) for variants trained "
        "together: OUT/<prompt>-s<seed>/ each, OUT/variants.png compares them (videos: also "
        "OUT/variants.mp4).",
    ),
]
ScreenPrompt = Annotated[
    list[str],
    typer.Option(
        metavar="TEXT", help="The edit layer alone (default: the prompt); once, or once per --prompt."
    ),
]
RoiPrompt = Annotated[
    list[str],
    typer.Option(
        metavar="TEXT",
        help="The region to edit in the source, e.g. 'cat'; enables the directional loss. Once, or once "
        "per --prompt.",
    ),
]
Bootstrap = Annotated[
    bool,
    typer.Option(
        "--bootstrap",
        help="Pull the edit's opacity towards CLIP's relevancy map of the ROI prompt over all steps "
        "(off by default, as in the original; --set loss.bootstrap_steps=N for the first N): images "
        "anneal its weight linearly, videos keep it constant on the step's last example, as the "
        "original does in effect.",
    ),
]
ConfigFile = Annotated[
    Path, typer.Option("--config", "-c", help="YAML config (own or the reference's flat keys).")
]
Overrides = Annotated[
    list[str],
    typer.Option("--set", metavar="KEY=VALUE", help="Override a config key: --set loss.lambda_structure=3"),
]
Steps = Annotated[int, typer.Option(help="Optimisation steps (default 1000 for images, 3000 for videos).")]
Size = Annotated[int, typer.Option(help="Images: resize so the short side is at most this (default 512).")]
Atlas = Annotated[Path, typer.Option(help="Videos: an NLA checkpoint, or a folder made by `t2l-fast atlas`.")]
Layer = Annotated[
    str, typer.Option(help="Videos: the atlas layer to edit, background (default) or foreground.")
]
Frames = Annotated[int, typer.Option(help="Videos: use the first N frames.")]
WriteFrames = Annotated[bool, typer.Option("--write-frames", help="Videos: also write the frames as PNG.")]
Seed = Annotated[
    list[int],
    typer.Option(metavar="INT", help="Random seed (default 0; -1 draws one). Repeat it for variants."),
]
PreviewEvery = Annotated[int, typer.Option(help="Images: write a preview into OUT/previews every N steps.")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
Quick = Annotated[
    bool,
    typer.Option(
        "--quick",
        help="Small settings that finish in minutes on a CPU (few steps, small size, fewer views, a "
        "smaller generator): checks the installation, not a useful edit. Flags and --set still apply.",
    ),
]


def edit(
    image: Input,
    prompt: Prompt = None,
    screen_prompt: ScreenPrompt = None,
    roi_prompt: RoiPrompt = None,
    bootstrap: Bootstrap = False,
    config: ConfigFile = None,
    overrides: Overrides = None,
    steps: Steps = None,
    size: Size = None,
    atlas: Atlas = None,
    layer: Layer = None,
    frames: Frames = None,
    write_frames: WriteFrames = False,
    clip: ClipName = None,
    clip_weights: ClipWeights = None,
    device: Device = "auto",
    seed: Seed = None,
    preview_every: PreviewEvery = None,
    out: Out = Path("out"),
    quick: Quick = False,
) -> None:
    """Edit an image or a video as a text prompt says; writes the result and the RGBA edit layer to OUT."""
    options = dict(
        prompt=_first(prompt),
        screen_prompt=_first(screen_prompt),
        roi_prompt=_first(roi_prompt),
        bootstrap=bootstrap,
        steps=steps,
        size=size,
        atlas=atlas,
        layer=layer,
        frames=frames,
        write_frames=write_frames,
        clip=clip,
        clip_weights=clip_weights,
        seed=_first(seed),
        preview_every=preview_every,
    )
    try:
        video = check_input(image)  # the input's own problems first
        device_type = resolve_device(device).type  # a bad or unavailable device fails here
        cfg = edit_config(image, video, config=config, overrides=overrides or (), quick=quick, **options)
        variants = edit_variants(cfg, video, prompt, seed, screen_prompt, roi_prompt)
        check_output_dir(out)
        warning = long_run_warning(cfg.optim.steps * len(variants or [1]), device_type, video)
        if warning:
            typer.echo(warning, err=True)
        if variants:
            _edit_variants(image, cfg, device, out, variants, video)
        elif video:
            _edit_video(image, cfg, device, out)
        else:
            _edit_image(image, cfg, device, out)
    except InputError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise fail("interrupted before training started; nothing written", 130) from None


def _edit_image(image: Path, cfg, device: str, out: Path) -> None:
    from ..pipeline.image import ImageEditor

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

    def preview(state) -> None:
        if state.composite is not None:  # every preview_every steps
            folder = out / "previews"
            folder.mkdir(parents=True, exist_ok=True)
            save_png(state.composite, folder / f"step_{state.step + 1:05d}.png")

    result = editor.train(run, callback=preview, callback_inputs=("composite",), progress=True)
    _finish(result, out)


def _first(values: list | None):
    """The first of a repeatable option (None when not given): what a lone edit uses."""
    return values[0] if values else None


def _edit_variants(path: Path, cfg, device: str, out: Path, variants, video: bool) -> None:
    """Train the variants of an image or a video together; write each, and the sheets comparing them."""
    from ..pipeline.variants import save_variants

    editor: Any
    if video:
        from ..pipeline.video import VideoEditor

        editor = VideoEditor(cfg, device=device)
        runs = editor.prepare_variants(path, variants)
        t, _, h, w = runs[0].frames.shape
        what = f"the {runs[0].config.video.layer} of {path} ({plural(t, 'frame')}, {w}x{h})"
        compare = "variants.mp4 and variants.png compare them"
    else:
        from ..pipeline.image import ImageEditor

        editor = ImageEditor(cfg, device=device)
        runs = editor.prepare_variants(path, variants)
        for note in runs[0].notes:
            typer.echo(f"note: {path}: {note}", err=True)
        h, w = runs[0].source.shape[-2:]
        what = f"{path} ({w}x{h})"
        compare = "variants.png compares them"
    if cfg.clip == "test-tiny":
        typer.echo(NOT_A_REAL_EDIT, err=True)
    editor.load_clip(runs[0])  # load now: weight errors surface before training
    n, steps = len(variants), plural(cfg.optim.steps, "step")
    typer.echo(f"editing {what}: {n} variants trained together for {steps} on {editor.device}", err=True)
    results = editor.train_variants(runs, progress=True)
    try:
        paths = save_variants(out, variants, results)
    except KeyboardInterrupt:
        raise fail("interrupted while writing; files already written are whole", 130) from None
    if results[0].is_test_model:
        typer.echo(NOT_A_REAL_EDIT, err=True)
    typer.echo(f"wrote {n} variants ({plural(len(paths), 'file')}) to {out}/: {compare}")
    if any(r.interrupted for r in results):
        raise typer.Exit(130)


def _edit_video(video: Path, cfg, device: str, out: Path) -> None:
    from ..pipeline.video import VideoEditor

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
