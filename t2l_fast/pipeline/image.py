"""The image editor: trains the generator on one image against a frozen CLIP and renders the edit."""

from __future__ import annotations

import copy
import json
import logging
import os
import random
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
from .callbacks import StepCallback, check_inputs, step_end_hook
from .engine import Engine, optimise_group
from .variants import make_variants

log = logging.getLogger(__name__)


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
        prompt: str | list[str] | None = None,
        screen_prompt: str | list[str] | None = None,
        roi_prompt: str | list[str] | None = None,
        seed: int | None = None,
    ) -> ImageRun:
        """Validate everything cheap before any model loads: the run's config (prompts and seed
        applied, a random seed drawn for -1) and the source, read and sized."""
        cfg = self._run_config(prompt=prompt, screen_prompt=screen_prompt, roi_prompt=roi_prompt, seed=seed)
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
        prompt: str | list[str] | None = None,
        screen_prompt: str | list[str] | None = None,
        roi_prompt: str | list[str] | None = None,
        *,
        seed: int | list[int] | None = None,
        callback: StepCallback | None = None,
        callback_inputs: tuple[str, ...] = (),
        progress: bool = False,
    ):
        """Edit ``image`` (path, PIL image or (3, H, W) tensor in [0, 1]) as the prompts say: an
        :class:`EditResult`. A list of prompts or of seeds makes variants (every prompt with every
        seed, trained together): a list of results, one per variant, in that order.
        ``callback``: called after every step (:mod:`~t2l_fast.pipeline.callbacks`), with the
        pictures named in ``callback_inputs`` every ``config.preview_every`` steps."""
        check_inputs(callback_inputs)
        if isinstance(prompt, (list, tuple)) or isinstance(seed, (list, tuple)):
            chosen = self.config.prompt if prompt is None else prompt
            variants = make_variants(
                chosen, self.config.seed if seed is None else seed, screen_prompt, roi_prompt
            )
            runs = self.prepare_variants(image, variants)
            for note in runs[0].notes:
                log.info(note)
            return self.train_variants(
                runs, callback=callback, callback_inputs=callback_inputs, progress=progress
            )
        run = self.prepare(image, prompt, screen_prompt, roi_prompt, seed=seed)
        for note in run.notes:
            log.info(note)
        return self.train(run, callback=callback, callback_inputs=callback_inputs, progress=progress)

    def train(self, run: ImageRun, **kwargs) -> EditResult:
        """The optimisation loop on a prepared run (from ``prepare``). Ctrl-C, or the callback
        returning True, ends it early with the current generator (``result.interrupted``).
        Keywords: ``callback``, ``callback_inputs``, ``progress`` (see ``__call__``)."""
        return self._train([run], **kwargs)[0]

    def _activation_hw(self, run: ImageRun) -> tuple[int, int]:
        return int(run.source.shape[-2]), int(run.source.shape[-1])

    def _train(
        self,
        runs: list[ImageRun],
        *,
        callback: StepCallback | None = None,
        callback_inputs: tuple[str, ...] = (),
        progress: bool = False,
        first: int = 0,
    ) -> list[EditResult]:
        """Train the runs' generators together (one, or a group of variants on one draw stream)."""
        asked = check_inputs(callback_inputs)
        device, cfg, n = self.device, runs[0].config, len(runs)
        clip, engine = self._start(runs[0])
        source = runs[0].source.to(device)
        generators, run_generators = self._generators(runs, engine)
        run_crop = engine.compiled(render_crop)
        # one objective for the group: each variant's prompts, the source side once, one draw each step
        objective = self.objective(clip, [run.config for run in runs], engine)
        hw = (int(source.shape[-2]), int(source.shape[-1]))

        def plan_of_step(step: int, gen: torch.Generator):
            """The step's random choices, on the host: the training crop (the draws of
            :func:`~t2l_fast.augment.draw_example`), then the objective's for each example."""
            crop = draw_crop(hw, cfg.data, gen, generators[0].min_side, engine.bucket)
            draws = [objective.plan(step, crop.params.size, gen)]
            if step % cfg.data.source_every == 0:  # the un-augmented input: its targets are cached
                draws.append(objective.plan(step, hw, gen))
            return crop, draws

        def examples_of_step(step: int, plan):
            crop, draws = plan
            images = [(run_crop(source, crop.to(device)), None), (source, ("source",))][: len(draws)]
            for (image, key), draw in zip(images, draws, strict=True):
                layers = [Layers.from_rgba(rgba.float(), image) for rgba in run_generators(image)]
                yield layers, key, 1.0 / len(draws), draw

        def pictures(k: int) -> dict[str, torch.Tensor]:
            composite, rgba, _ = self.render(generators[k], source, engine)
            return {"composite": composite[0].cpu(), "rgba": rgba[0].cpu()}

        hook = step_end_hook(callback, cfg.optim.steps, asked, cfg.preview_every, pictures, first)
        histories, interrupted = optimise_group(
            engine,
            generators,
            objective,
            examples_of_step,
            cfg.optim,
            cfg.seed if cfg.draw_seed is None else cfg.draw_seed,
            plan_of_step=plan_of_step,
            on_step=hook,
            progress=progress,
            desc="editing" if n == 1 else f"editing {n} variants",
        )
        return [
            self._result(run.config, g, source, engine, history, interrupted, clip.is_test_model)
            for run, g, history in zip(runs, generators, histories, strict=True)
        ]

    @staticmethod
    @torch.no_grad()
    def render(generator: Generator, source: torch.Tensor, engine: Engine):
        """Run the generator on the whole source (1, 3, H, W) under ``engine``'s precision:
        (composite, rgba, greenscreen), batched (1, C, H, W)."""
        with engine.autocast():
            rgba = generator(source).float()
        out = composite_rgba(rgba, source)
        return out.composite, rgba, out.greenscreen

    def _result(self, cfg, generator, source, engine, history, interrupted, is_test) -> EditResult:
        composite, rgba, greenscreen = self.render(generator, source, engine)
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
        engine = Engine(cfg.runtime, self.device, self.dtype)
        generator = Generator(cfg.generator).to(self.device)
        generator.load_state_dict(load_file(str(path)))
        return self._result(cfg, generator, source, engine, [], False, False)
