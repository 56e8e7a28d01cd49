"""Which device a run uses: one rule for the editors, the atlas fit and every command."""

from __future__ import annotations

import re

import torch

from .io import InputError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) -> CUDA when available, else the CPU; ``cpu``, ``cuda`` and ``cuda:N`` as
    given. Anything else, or CUDA on a machine without it, is an :class:`InputError` naming the fix."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    text = str(device)
    if text not in ("cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise InputError(f"--device {text!r} is not one of auto, cuda, cuda:N, cpu")
    dev = torch.device(text)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {text} was asked for but no CUDA GPU is available: use --device cpu")
    return dev
