"""``t2l-fast batch MANIFEST`` (also ``python -m t2l_fast.batch`` and ``torchrun ... -m t2l_fast.batch``):
a manifest of edits run by :func:`t2l_fast.batch.run` (registered by t2l_fast.cli)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from ..batch import run
from ..config import Config
from ..device import resolve_device
from ..io import InputError
from .common import fail as error_exit


def batch(
    manifest: Path = typer.Argument(..., help="Jobs: a YAML file (defaults + jobs) or JSON Lines."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Output folder: OUT/NAME per job."),
    clip: str = typer.Option(None, help="CLIP model: ViT-B-32 (default) or test-tiny (random, for tests)."),
    clip_weights: Path = typer.Option(
        None, help="Local CLIP weights: safetensors, state dict or OpenAI's ViT-B-32.pt."
    ),
    device: str = typer.Option(
        "auto", help="auto, cuda, cuda:N or cpu (under torchrun: each rank's own GPU)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars / lines."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More logging."),
) -> None:
    """Run a manifest of edits in one process (CLIP loaded once); under torchrun, over every rank."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _configure_logging(verbose, rank if world > 1 else None)

    def fail(message: str, code: int) -> typer.Exit:
        # every rank finds the same problem: rank 0 says it
        return error_exit(message, code) if rank == 0 else typer.Exit(code)

    try:
        resolve_device(device)  # a bad or unavailable device fails here, before the manifest is read
        summary = run(
            manifest,
            out,
            clip=clip,
            clip_weights=clip_weights,
            device=device,
            progress=None if progress else False,
        )
    except InputError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted; finished jobs are kept and a rerun skips them", 130) from None
    if rank != 0:
        return
    if (clip or Config.clip) == "test-tiny":
        typer.echo(
            "NOTE: --clip test-tiny is a small random test model: the results are NOT real edits", err=True
        )
    for r in summary.failed:
        typer.echo(f"failed: {r.name}: {r.error}", err=True)
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts().items())
    typer.echo(
        f"batch of {len(summary.records)} jobs on {summary.world_size} process(es): {counts} in "
        f"{summary.seconds:.1f} s; summary in {out / 'summary.md'}"
    )
    if any(r.status == "interrupted" for r in summary.records):
        raise typer.Exit(130)
    if not summary.ok:
        raise typer.Exit(1)


def _configure_logging(verbose: bool, rank: int | None) -> None:
    fmt = "%(message)s" if rank is None else f"[rank {rank}] %(message)s"
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr, format=fmt)
    else:
        for handler in root.handlers:
            handler.setFormatter(logging.Formatter(fmt))
    logging.getLogger("t2l_fast").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # a line per training run and per note would drown the per-job lines
        logging.getLogger("t2l_fast.pipeline").setLevel(logging.WARNING)


# ``python -m t2l_fast.batch`` (and ``torchrun ... -m t2l_fast.batch``): the one command, no subcommand
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)
app.command()(batch)


def main() -> None:
    app()
