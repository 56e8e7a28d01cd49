"""The handlers of the ``t2l-fast serve`` page as one object, :class:`App`: the image tab, the atlas
step and the video edit over the server's shared state; and the port check of the command."""

from __future__ import annotations

from ..config import preset
from .atlas import AtlasTab
from .image import ImageTab
from .variants import VariantsTab
from .video import VideoTab

ADVANCED_KEYS = {  # the common config keys in the page's "Advanced" panel -> (label, image preset value)
    "data.size": "Max short side (px; 0 keeps the input)",
    "views.n_aug": "CLIP views per step",
    "loss.lambda_structure": "Structure weight",
    "loss.lambda_sparsity": "Sparsity weight",
    "optim.lr": "Learning rate",
}


def advanced_defaults(name: str = "image") -> dict[str, float]:
    cfg = preset(name)
    out = {}
    for key in ADVANCED_KEYS:
        section, field = key.split(".")
        out[key] = getattr(getattr(cfg, section), field)
    return out


class App(ImageTab, VariantsTab, AtlasTab, VideoTab):
    """The server's state (:class:`~t2l_fast.serve.state.AppState`) and every handler of the page."""


def free_port_error(host: str, port: int) -> str | None:
    """None when ``host:port`` can be bound, else one line saying why not."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                return f"port {port} on {host} is already in use: stop the other server or pass --port N"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None
