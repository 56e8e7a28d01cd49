"""What the image and video editors share: the prepared run they train on, the CLIP they hold, the
objective they build for the engine's mode, the training loop's call, and the result's common fields
and how a trained generator is saved."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import Config, preset
from ..device import resolve_device
from ..io import atomic_path, check_output_dir, save_text
from ..models.clip import Clip, load_clip
from ..models.generator import Generator
from ..objective import Objective
from .engine import Engine
from .variants import group_runner

log = logging.getLogger(__name__)


def save_generator(path: str | os.PathLike, state: dict[str, torch.Tensor], cfg: Config, **meta: str) -> Path:
    """The generator's weights as safetensors, with the generator config in the metadata, whole."""
    meta = {"generator": json.dumps(cfg.to_dict()["generator"]), "clip": cfg.clip, **meta}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=meta)
    return Path(path)


def generator_state(generator: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the generator's weights (what a result keeps and saves)."""
    return {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}


@dataclass
class Run:
    """A validated edit, ready to train: what ``prepare`` returns and ``train`` reads. ``config`` is
    the run's own copy (the call's prompts applied, the seed drawn)."""

    config: Config


@dataclass(kw_only=True)
class Result:
    """What every edit's result holds besides its pictures: the per-step loss records, the run's
    config, the trained generator's weights (CPU), and how the run ended."""

    losses: list[dict[str, float]]
    config: Config
    generator_state: dict[str, torch.Tensor] = field(repr=False)
    steps_done: int = 0
    interrupted: bool = False
    is_test_model: bool = False

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """Write the edit's files (``_save_files``), ``config.yaml`` (re-runnable) and
        ``generator.safetensors`` (with the steps and ``_meta()`` in its metadata) into ``out_dir``,
        each written whole (temporary file + rename)."""
        out = check_output_dir(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = self._save_files(out)
        paths.append(save_text(self.config.to_yaml(), out / "config.yaml"))
        meta = {"steps": str(self.steps_done), **self._meta()}
        paths.append(save_generator(out / "generator.safetensors", self.generator_state, self.config, **meta))
        return paths

    def _save_files(self, out: Path) -> list[Path]:
        raise NotImplementedError

    def _meta(self) -> dict[str, str]:
        return {}


class Editor:
    """Base of :class:`ImageEditor` and :class:`VideoEditor`: holds the device, the dtype and the
    CLIP; each call is ``prepare`` (validates, returns a :class:`Run`) then ``train(run)``.

    config: the default settings of its runs (the ``PRESET`` by default); device: ``auto``, ``cuda``
    or ``cpu``; dtype: autocast dtype of generator and CLIP (None: from ``runtime.precision``);
    clip: an already built :class:`Clip` (tests inject the tiny one), or a model name (``ViT-B-32``,
    ``test-tiny``: sets ``config.clip`` of the editor's copy of the config), else ``config.clip``
    loaded on first use.
    """

    PRESET = "image"
    # each editor's own: train the runs' generators together (one result per run), and the size
    # (H, W) a step's activations scale with (the source image, the video's frames)
    _train: Callable[..., list]
    prepare: Callable[..., Any]  # validate an input and its prompts: a Run
    _activation_hw: Callable[[Any], tuple[int, int]]

    def __init__(
        self,
        config: Config | None = None,
        device: str | torch.device = "auto",
        dtype: torch.dtype | None = None,
        clip: Clip | str | None = None,
    ):
        self.config = config or preset(self.PRESET)
        if isinstance(clip, str):  # a model name: loaded on first use, as config.clip is
            self.config = copy.deepcopy(self.config)
            self.config.clip, clip = clip, None
        self.device = resolve_device(device)
        self.dtype = dtype
        self._clip = clip.to(self.device) if clip is not None else None
        self._clip_key: tuple[str, str] | None = None  # None: given, used for every run
        self.engine: Engine | None = None  # the last run's (its mode, skipped steps); nothing reads it back

    def _run_config(self, **prompts) -> Config:
        """A copy of the editor's config for one run, with the prompts given to the call (None keeps
        the config's)."""
        cfg = copy.deepcopy(self.config)
        for name, value in prompts.items():
            if value is not None:
                setattr(cfg, name, value)
        return cfg

    def load_clip(self, run: Run) -> Clip:
        """The CLIP of ``run`` (``config.clip`` and ``clip_weights``): the one given to the editor,
        else loaded on first use and kept for the next runs that name the same model and weights.
        Call it before ``train`` to surface weight errors early."""
        key = (run.config.clip, str(run.config.clip_weights))
        if self._clip is None or (self._clip_key is not None and self._clip_key != key):
            self._clip = load_clip(run.config.clip, run.config.clip_weights, self.device)
            self._clip_key = key
        return self._clip

    def _start(self, run: Run) -> tuple[Clip, Engine]:
        """The CLIP and the engine of a run; seeds torch for the generator's initialisation."""
        clip = self.load_clip(run)
        engine = self.engine = Engine(run.config.runtime, self.device, self.dtype)
        clip.set_attention(run.config.runtime.attention)
        torch.manual_seed(run.config.seed)
        return clip, engine

    def _generators(self, runs: list, engine: Engine) -> tuple[list[Generator], Callable]:
        """Each run's generator, initialised from its own seed as a lone edit's, and the call that
        runs them all on one input (:func:`~t2l_fast.pipeline.variants.group_runner`: one grouped
        network where ``runtime.stack_variants`` says so, by default on CUDA)."""
        generators = []
        for run in runs:
            torch.manual_seed(run.config.seed)
            generators.append(Generator(run.config.generator).to(self.device))
        choice = runs[0].config.runtime.stack_variants
        stack = {"on": True, "off": False}.get(choice, self.device.type == "cuda")
        return generators, group_runner(generators, engine.compiled, stack)

    @staticmethod
    def objective(clip: Clip, cfg: Config | list[Config], engine: Engine) -> Objective:
        """The objective of a run (``cfg``) or of a group of variants (one config each). Reference
        mode: the loss as the original computes it. Fast path: batched, its views, CLIP and losses
        one compiled region (see :meth:`Engine.compiled`)."""
        if not engine.fast:
            return Objective(clip, cfg, batched=False)
        return Objective(clip, cfg, batched=True, compile=engine.compiled)

    @staticmethod
    def _result_fields(cfg: Config, generator, history, interrupted: bool, is_test: bool) -> dict:
        """The :class:`Result` fields of a finished run (the weights copied to the CPU)."""
        return dict(
            losses=history,
            config=cfg,
            generator_state=generator_state(generator),
            steps_done=len(history),
            interrupted=interrupted,
            is_test_model=is_test,
        )

    def prepare_variants(self, source, variants: list, **inputs) -> list:
        """One prepared run per variant (:func:`~t2l_fast.pipeline.variants.make_variants`): the
        input read and checked once (``prepare(source, **inputs)`` with the first variant's prompts;
        a video's atlas and layer in ``inputs``) and shared; each config with its variant's prompts
        and seed (-1: one drawn), checked; all on one draw stream (``config.draw_seed``, else the
        first variant's seed)."""
        first = variants[0]
        run = self.prepare(
            source,
            prompt=first.prompt,
            screen_prompt=first.screen_prompt,
            roi_prompt=first.roi_prompt,
            **inputs,
        )
        runs = []
        for variant in variants:
            cfg = copy.deepcopy(run.config)
            cfg.prompt, cfg.seed = variant.prompt, variant.seed
            if variant.screen_prompt is not None:
                cfg.screen_prompt = variant.screen_prompt
            if variant.roi_prompt is not None:
                cfg.roi_prompt = variant.roi_prompt
            if cfg.seed < 0:
                cfg.seed = random.randrange(2**31)
            cfg.validate()
            runs.append(dataclasses.replace(run, config=cfg))
        draw_seed = runs[0].config.seed if run.config.draw_seed is None else run.config.draw_seed
        for r in runs:
            r.config.draw_seed = draw_seed
        return runs

    def train_variants(self, runs: list, **kwargs) -> list:
        """The prepared variants (``prepare_variants``) trained together, as many per run as
        ``runtime.variants_per_run`` (0: what the device's memory holds; on the CPU, 2) allows: the
        same numbers in any chunking (one draw stream). Keywords as ``train``'s; the callback sees
        ``state.variant``. -> one result per variant, in order."""
        from .variants import bytes_per_variant, variants_per_run

        cfg = runs[0].config
        need = bytes_per_variant(self._activation_hw(runs[0]), cfg)
        size = variants_per_run(len(runs), self.device, cfg.runtime.variants_per_run, need)
        if size < len(runs):
            log.warning(
                "%d variants: trained %d at a time (runtime.variants_per_run; memory on a GPU)",
                len(runs),
                size,
            )
        results: list = []
        for start in range(0, len(runs), size):
            results += self._train(runs[start : start + size], first=start, **kwargs)
        return results
