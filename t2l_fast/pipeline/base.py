"""What the image and video editors share: construction, the CLIP they load, the objective they
build for the engine's mode, and how a trained generator is saved."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import Config, preset
from ..device import resolve_device
from ..io import atomic_path, save_text
from ..losses import Objective
from ..models.clip import Clip, load_clip
from .engine import Engine


def save_generator(path: str | os.PathLike, state: dict[str, torch.Tensor], cfg: Config, **meta: str) -> Path:
    """The generator's weights as safetensors, with the generator config in the metadata, whole."""
    meta = {"generator": json.dumps(cfg.to_dict()["generator"]), "clip": cfg.clip, **meta}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    return Path(path)


def generator_state(generator: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the generator's weights (what a result keeps and saves)."""
    return {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}


def save_run(out: Path, cfg: Config, state: dict[str, torch.Tensor], steps: int, **meta: str) -> list[Path]:
    """The tail every result's ``save`` shares: ``config.yaml`` (re-runnable) and
    ``generator.safetensors`` (with ``steps`` and ``meta`` in its metadata), each written whole."""
    return [
        save_text(cfg.to_yaml(), out / "config.yaml"),
        save_generator(out / "generator.safetensors", state, cfg, steps=str(steps), **meta),
    ]


class Editor:
    """Base of :class:`ImageEditor` and :class:`VideoEditor`.

    config: the run's settings (the ``PRESET`` by default); device: ``auto``, ``cuda`` or ``cpu``;
    dtype: autocast dtype of generator and CLIP (None: from ``config.runtime.precision``);
    clip: an already built :class:`Clip` (tests inject the tiny one), else loaded on first use.
    """

    PRESET = "image"

    def __init__(
        self,
        config: Config | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        clip: Clip | None = None,
    ):
        self.config = config or preset(self.PRESET)
        self.device = resolve_device(device)
        self.dtype = dtype
        self._clip = clip.to(self.device) if clip is not None else None
        self.engine: Engine | None = None

    def _run_config(self, **prompts) -> Config:
        """A copy of the editor's config for one run, with the prompts given to the call (None keeps
        the config's)."""
        cfg = copy.deepcopy(self.config)
        for name, value in prompts.items():
            if value is not None:
                setattr(cfg, name, value)
        return cfg

    @property
    def clip(self) -> Clip:
        if self._clip is None:
            self._clip = load_clip(self.config.clip, self.config.clip_weights, self.device)
        return self._clip

    def _start(self, cfg: Config) -> tuple[Clip, Engine]:
        """The CLIP and the engine of a run; seeds torch for the generator's initialisation."""
        clip = self.clip
        self.engine = Engine(cfg.runtime, self.device, self.dtype)
        clip.set_attention(cfg.runtime.attention)
        torch.manual_seed(cfg.seed)
        return clip, self.engine

    @staticmethod
    def objective(clip: Clip, cfg: Config, engine: Engine) -> Objective:
        """Reference mode: the loss as the original computes it. Fast path: batched, compiled CLIP
        (its inputs are whole-patch views of a few sizes: static at first, one dynamic recompile)."""
        if not engine.fast:
            return Objective(clip, cfg, batched=False)
        return Objective(
            clip,
            cfg,
            batched=True,
            encode_image=engine.compiled(clip.encode_image, dynamic=None),
            encode_tokens=engine.compiled(clip.encode_tokens, dynamic=None),
        )
