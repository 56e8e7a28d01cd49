"""What every ``t2l-fast`` command shares: the one-line error exit, the usage line as the README writes
it, counted nouns, and the options several commands take."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.core import TyperCommand

NOT_A_REAL_EDIT = (
    "NOTE: --clip test-tiny is a small random test model: the result is NOT a real edit "
    "(use it to check the installation only)"
)

# Options several commands take (typer reads the help and flags from the annotation).
ClipName = Annotated[
    str, typer.Option(help="CLIP model: ViT-B-32 (default) or test-tiny (random, for tests).")
]
ClipWeights = Annotated[
    Path, typer.Option(help="Local CLIP weights: safetensors, state dict or OpenAI's ViT-B-32.pt.")
]
Device = Annotated[str, typer.Option(help="auto, cuda, cuda:N or cpu.")]


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` on stderr and return the exit to raise (code 2: bad input)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def plural(n: int, noun: str) -> str:
    """``1 step``, ``3 steps``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


class Command(TyperCommand):
    """A command whose usage line names its arguments as the README does (``INPUT``; typer writes a
    required one as ``{INPUT}``)."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1] if p.startswith("{") and p.endswith("}") else p for p in pieces]
