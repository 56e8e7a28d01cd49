"""The image editor: trains the generator on one image against a frozen CLIP and renders the edit."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..augment import draw_crop, render_crop
from ..io import (
    InputError,
    check_not_flat,
    fit_size,
    save_png,
    to_image_tensor,
)
from ..kernels import composite_rgba
from ..losses import Layers
from ..models.generator import Generator, min_side
from .base import Editor, Result, Run
from .engine import Engine

log = logging.getLogger(__name__)

StepCallback = Callable[[int, dict[str, float]], None]
PreviewCallback = Callable[[int, torch.Tensor], None]


@dataclass
class ImageRun(Run):
    """A validated image edit: the run's config, the source (1, 3, H, W) in [0, 1] at its training
    size, and notes on how it was read (shown to the user)."""

    source: torch.Tensor
    notes: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class EditResult(Result):
    """An edit: every tensor (C, H, W) float32 in [0, 1] on the CPU (and :class:`Result`'s fields)."""

    source: torch.Tensor
    composite: torch.Tensor
    edit: torch.Tensor  # colour of the edit layer
    alpha: torch.Tensor  # (1, H, W) opacity of the edit layer
    greenscreen: torch.Tensor

    @property
    def edit_layer(self) -> torch.Tensor:
        """(4, H, W) RGBA edit layer."""
        return torch.cat([self.edit, self.alpha], dim=0)

    def _save_files(self, out: Path) -> list[Path]:
        """composite.png, edit_layer.png (RGBA), alpha.png, greenscreen.png."""
        return [
            save_png(self.composite, out / "composite.png"),
            save_png(self.edit_layer, out / "edit_layer.png"),
            save_png(self.alpha, out / "alpha.png"),
            save_png(self.greenscreen, out / "greenscreen.png"),
        ]

    def _meta(self) -> dict[str, str]:
        return {"image_size": json.dumps(list(self.source.shape[-2:]))}


class ImageEditor(Editor):
    """Text-driven layered image editing.

    >>> editor = ImageEditor(device="cuda")                    # doctest: +SKIP
    >>> result = editor("horse.jpg", prompt="golden horse", roi_prompt="horse")  # doctest: +SKIP
    >>> result.save("out/")                                    # doctest: +SKIP

    config: the run's settings (``preset("image")`` by default); device: ``auto``, ``cuda`` or
    ``cpu``; dtype: autocast dtype of generator and CLIP (None: from ``config.runtime.precision``);
    clip: an already built :class:`Clip` (tests inject the tiny one), else loaded on first use.
    """

    def prepare(
        self,
        image,
        prompt: str | None = None,
        screen_prompt: str | None = None,
        roi_prompt: str | None = None,
    ) -> ImageRun:
        """Validate everything cheap before any model loads: the run's config (prompts applied, seed
        drawn) and the source, read and sized."""
        cfg = self._run_config(prompt=prompt, screen_prompt=screen_prompt, roi_prompt=roi_prompt)
        cfg.validate()
        smallest = min_side(cfg.generator.scales)
        if cfg.data.size and cfg.data.size < smallest:
            raise InputError(f"--size {cfg.data.size} is below the generator's minimum of {smallest} px")
        source, notes = to_image_tensor(image)
        source = check_not_flat(fit_size(source, cfg.data.size, smallest))
        if cfg.seed < 0:
            cfg.seed = random.randrange(2**31)
        return ImageRun(cfg, source[None], notes)

    def __call__(
        self,
        image,
        prompt: str | None = None,
        screen_prompt: str | None = None,
        roi_prompt: str | None = None,
        *,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
        progress: bool = False,
    ) -> EditResult:
        """Edit ``image`` (path, PIL image or (3, H, W) tensor in [0, 1]) as the prompts say."""
        run = self.prepare(image, prompt, screen_prompt, roi_prompt)
        for note in run.notes:
            log.info(note)
        return self.train(run, on_step=on_step, on_preview=on_preview, progress=progress)

    def train(
        self,
        run: ImageRun,
        *,
        on_step: StepCallback | None = None,
        on_preview: PreviewCallback | None = None,
        progress: bool = False,
    ) -> EditResult:
        """The optimisation loop on a prepared run (from ``prepare``). Ctrl-C ends it early with the
        current generator (``result.interrupted``)."""
        device, cfg = self.device, run.config
        clip, engine = self._start(run)
        source = run.source.to(device)
        generator = Generator(cfg.generator).to(device)
        run_generator = engine.compiled(generator)
        run_crop = engine.compiled(render_crop)
        objective = self.objective(clip, cfg, engine)

        hw = tuple(source.shape[-2:])

        def plan_of_step(step: int, gen: torch.Generator):
            """The step's random choices, on the host: the training crop (the draws of
            :func:`~t2l_fast.augment.draw_example`), then the objective's for each example."""
            crop = draw_crop(hw, cfg.data, gen, generator.min_side, engine.bucket)
            draws = [objective.plan(step, crop.params.size, gen)]
            if step % cfg.data.source_every == 0:  # the un-augmented input: its targets are cached
                draws.append(objective.plan(step, hw, gen))
            return crop, draws

        def examples_of_step(step: int, plan):
            crop, draws = plan
            images = [(run_crop(source, crop.to(device)), None), (source, ("source",))][: len(draws)]
            for (image, key), draw in zip(images, draws, strict=True):
                rgba = run_generator(image).float()
                yield Layers.from_rgba(rgba, image), key, 1.0 / len(draws), draw

        def after_step(step: int) -> None:
            if on_preview and cfg.preview_every and (step + 1) % cfg.preview_every == 0:
                on_preview(step, self.render(generator, source)[0][0].cpu())

        history, interrupted = self._optimise(
            run,
            generator,
            objective,
            examples_of_step,
            plan_of_step=plan_of_step,
            on_step=on_step,
            after_step=after_step,
            progress=progress,
        )
        return self._result(cfg, generator, source, history, interrupted, clip.is_test_model)

    @torch.no_grad()
    def render(self, generator: Generator, source: torch.Tensor):
        """Run the generator on the whole source: (composite, rgba, greenscreen), batched (1, C, H, W)."""
        with self.engine.autocast():
            rgba = generator(source).float()
        out = composite_rgba(rgba, source)
        return out.composite, rgba, out.greenscreen

    def _result(self, cfg, generator, source, history, interrupted, is_test) -> EditResult:
        composite, rgba, greenscreen = self.render(generator, source)
        return EditResult(
            source=source[0].cpu(),
            composite=composite[0].cpu(),
            edit=rgba[0, :3].cpu(),
            alpha=rgba[0, 3:].cpu(),
            greenscreen=greenscreen[0].cpu(),
            **self._result_fields(cfg, generator, history, interrupted, is_test),
        )

    def apply(self, generator_path: str | os.PathLike, image) -> EditResult:
        """Re-apply a saved ``generator.safetensors`` to an image without training."""
        path = Path(generator_path)
        if not path.is_file():
            raise InputError(f"generator weights not found: {path}")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        cfg = copy.deepcopy(self.config)
        for k, v in json.loads(meta.get("generator", "{}")).items():
            setattr(cfg.generator, k, v)
        source, _ = to_image_tensor(image)
        source = fit_size(source, cfg.data.size, min_side(cfg.generator.scales))[None].to(self.device)
        self.engine = Engine(cfg.runtime, self.device, self.dtype)
        generator = Generator(cfg.generator).to(self.device)
        generator.load_state_dict(load_file(str(path)))
        return self._result(cfg, generator, source, [], False, False)
