"""The ``t2l-fast`` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from .config import Config, load_yaml, parse_overrides, preset
from .io import InputError, check_output_dir, save_png

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Text-driven layered image and video editing (Text2LIVE), fast.",
)
log = logging.getLogger("t2l_fast")

NOT_A_REAL_EDIT = (
    "NOTE: --clip test-tiny is a small random test model: the result is NOT a real edit "
    "(use it to check the installation only)"
)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="More logging.")) -> None:
    """Text-driven layered image and video editing (Text2LIVE), fast."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    for noisy in ("root", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def build_config(config: Path | None, overrides: list[str], **flags) -> Config:
    """Preset, then the YAML file, then ``--set key=value``, then the explicit flags."""
    cfg = load_yaml(config) if config is not None else preset("image")
    parse_overrides(cfg, overrides)
    mapping = {
        "prompt": "prompt",
        "screen_prompt": "screen_prompt",
        "roi_prompt": "roi_prompt",
        "seed": "seed",
        "clip": "clip",
        "clip_weights": "clip_weights",
        "preview_every": "preview_every",
    }
    for flag, key in mapping.items():
        if flags.get(flag) is not None:
            setattr(cfg, key, flags[flag] if not isinstance(flags[flag], Path) else str(flags[flag]))
    if flags.get("steps") is not None:
        cfg.optim.steps = flags["steps"]
    if flags.get("size") is not None:
        cfg.data.size = flags["size"]
    return cfg


@app.command()
def edit(
    image: Path = typer.Argument(..., help="The image to edit (PNG, JPEG, ...)."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="The edited image, e.g. 'a golden cat'."),
    screen_prompt: str = typer.Option(None, help="The edit layer alone (default: the prompt)."),
    roi_prompt: str = typer.Option(
        None,
        help="The region to edit in the source, e.g. 'cat'; enables the "
        "directional loss and the relevancy bootstrap.",
    ),
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML config (own or the reference's flat keys)."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a config key: --set loss.lambda_structure=3"
    ),
    steps: int = typer.Option(None, help="Optimisation steps (default 1000)."),
    size: int = typer.Option(None, help="Resize the input so its short side is at most this (default 512)."),
    clip: str = typer.Option(None, help="CLIP model: ViT-B-32 (default) or test-tiny (random, for tests)."),
    clip_weights: Path = typer.Option(
        None, help="Local CLIP weights: safetensors, state dict or OpenAI's ViT-B-32.pt."
    ),
    device: str = typer.Option("auto", help="auto, cuda or cpu."),
    seed: int = typer.Option(None, help="Random seed (default 0; -1 draws one)."),
    preview_every: int = typer.Option(None, help="Write a preview into OUT/previews every N steps."),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="Output folder."),
) -> None:
    """Edit an image as a text prompt says; writes the composite, the RGBA edit layer and more to OUT."""
    from .pipeline.image import ImageEditor

    try:
        if device not in ("auto", "cuda", "cpu") and not device.startswith("cuda:"):
            raise InputError(f"--device {device!r} is not one of auto, cuda, cpu")
        if steps is not None and steps <= 0:
            raise InputError(f"--steps must be > 0 (got {steps})")
        cfg = build_config(
            config,
            overrides,
            prompt=prompt,
            screen_prompt=screen_prompt,
            roi_prompt=roi_prompt,
            seed=seed,
            clip=clip,
            clip_weights=clip_weights,
            preview_every=preview_every,
            steps=steps,
            size=size,
        )
        if cfg.clip_weights is not None and not Path(cfg.clip_weights).is_file():
            raise InputError(f"--clip-weights file not found: {cfg.clip_weights}")
        check_output_dir(out)
        editor = ImageEditor(cfg, device=device)
        cfg, source, notes = editor.prepare(image)
        for note in notes:
            typer.echo(f"note: {image}: {note}", err=True)
        if cfg.clip == "test-tiny":
            typer.echo(NOT_A_REAL_EDIT, err=True)
        editor.config = cfg
        _ = editor.clip  # load now: weight errors surface before training
    except InputError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail("interrupted before training started; nothing written", 130) from None

    h, w = source.shape[-2:]
    typer.echo(f"editing {image} ({w}x{h}) for {cfg.optim.steps} steps on {editor.device}", err=True)

    def preview(step: int, composite) -> None:
        folder = out / "previews"
        folder.mkdir(parents=True, exist_ok=True)
        save_png(composite, folder / f"step_{step + 1:05d}.png")

    result = editor.train(cfg, source, on_preview=preview if cfg.preview_every else None, progress=True)
    try:
        paths = result.save(out)
    except KeyboardInterrupt:
        raise _fail("interrupted while writing; files already written are whole", 130) from None
    if result.is_test_model:
        typer.echo(NOT_A_REAL_EDIT, err=True)
    typer.echo(f"wrote {len(paths)} files to {out}/ ({result.steps_done} steps)")
    if result.interrupted:
        raise typer.Exit(130)


if __name__ == "__main__":  # pragma: no cover
    app()
