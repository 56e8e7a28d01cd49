"""The ``t2l-fast`` command line: ``edit``, ``atlas``, ``batch`` and ``serve``, one module each.

The commands only translate their arguments into a request (:mod:`t2l_fast.request`, where every rule
is checked before any model loads) and print its errors as one line; logging is configured here.
"""

from __future__ import annotations

import logging
import sys

import typer

from . import atlas, batch, edit, serve
from .common import Command

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: flags without a <bool> type column
    help="Text-driven layered image and video editing (Text2LIVE), fast.",
)
app.command("atlas", cls=Command)(atlas.atlas)  # fit a layered atlas to a video
app.command("serve")(serve.serve)  # the web page (the [ui] extra)
app.command("batch", cls=Command)(batch.batch)  # a manifest of edits
app.command("edit", cls=Command)(edit.edit)  # edit an image or a video


def _version(value: bool) -> None:
    if value:
        from .. import __version__

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


__all__ = ["app"]
