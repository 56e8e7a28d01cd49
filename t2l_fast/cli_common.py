"""What every ``t2l-fast`` command shares: the one-line error exit, the ``--quick`` settings, the
usage line as the README writes it, counted nouns."""

from __future__ import annotations

import typer
from typer.core import TyperCommand

# --quick: the smallest settings that still run every part of a command, so that each quickstart
# command finishes in about two minutes or less on a 2-core CPU (it checks the installation; the
# result is not a useful edit). Applied over the preset, under --config, --set and the flags.
QUICK_EDIT = {
    "image": ["optim.steps=2", "data.size=160", "views.n_aug=1"]
    + ["generator.channels_down=32", "generator.channels_up=32"],
    "video": ["optim.steps=1", "views.n_aug=1", "video.frames=8"]
    + ["generator.channels_down=32", "generator.channels_up=32"],
}
QUICK_ATLAS = {"frames": 8, "size": "192x108"}  # the flags' values when not given
QUICK_FIT = ["iterations=50", "grid=256"]  # under --set (grid: a smaller atlas, smaller edit crops)


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
