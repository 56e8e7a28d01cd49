"""``t2l-fast serve``: the web page on this machine (registered by t2l_fast.cli; needs the ``[ui]`` extra)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer

from ..device import resolve_device
from ..io import InputError
from ..request import check_clip_weights
from .common import fail

UI_EXTRA = 'the web page needs the ui extra: python -m pip install -e ".[ui]"'


def serve(
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on (0.0.0.0 exposes the page to the network)."
    ),
    port: int = typer.Option(7860, help="Port to listen on."),
    clip: str = typer.Option(
        "ViT-B-32", help="CLIP model: ViT-B-32 (default) or test-tiny (random, for tests)."
    ),
    clip_weights: Path = typer.Option(
        None, help="Local CLIP weights: safetensors, state dict or OpenAI's ViT-B-32.pt."
    ),
    device: str = typer.Option("auto", help="auto, cuda, cuda:N or cpu."),
    workdir: Path = typer.Option(
        None, help="Folder for the outputs of the runs (default: a new temporary folder)."
    ),
    max_upload_mb: int = typer.Option(200, help="Largest file the page accepts, in MB."),
    max_megapixels: float = typer.Option(25.0, help="Largest image the page accepts, in megapixels."),
) -> None:
    """Serve a web page to edit images and videos: upload, prompt, watch the edit form, download."""
    from ..serve import Limits, free_port_error

    try:
        import gradio  # noqa: F401
    except ImportError:
        raise fail(UI_EXTRA) from None
    try:
        if not 1 <= port <= 65535:
            raise InputError(f"--port must be in 1..65535 (got {port})")
        if max_upload_mb < 1 or max_megapixels <= 0:
            raise InputError("--max-upload-mb and --max-megapixels must be positive")
        dev = resolve_device(device)  # a bad or unavailable device fails here, before anything loads
        check_clip_weights(clip_weights)
        problem = free_port_error(host, port)
        if problem:
            raise InputError(problem)
        from ..models.clip import load_clip

        typer.echo(f"loading CLIP {clip} on {dev} ...", err=True)
        model = load_clip(clip, clip_weights, dev)  # once, for every request
    except InputError as exc:
        raise fail(str(exc)) from None

    from ..serve import App
    from ..serve.page import build_page

    folder = workdir or Path(tempfile.mkdtemp(prefix="t2l-serve-"))
    app = App(model, dev, folder, Limits(max_upload_mb=max_upload_mb, max_megapixels=max_megapixels))
    page = build_page(app)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            quiet=True,
            prevent_thread_lock=True,
            max_file_size=app.limits.max_upload_mb * 1024 * 1024,
            allowed_paths=[str(folder.resolve())],
            ssr_mode=False,
            mcp_server=False,
            footer_links=[],
        )
    except OSError as exc:  # lost a race for the port since the check above
        raise fail(f"cannot listen on {host}:{port}: {exc}") from None
    shown = f"[{host}]" if ":" in host else host
    typer.echo(f"t2l-fast serve: open http://{shown}:{port}/ (outputs in {folder}; Ctrl-C stops)")
    if model.is_test_model:
        typer.echo(
            "NOTE: --clip test-tiny is a small random test model: results are NOT real edits", err=True
        )
    try:
        page.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        page.close()
