"""Many looks at once: N prompt or seed variants of one input trained together.

The variants share the augmentation draws (one draw stream, ``config.draw_seed``: crops and views)
and every step's training crop; each has its own generator (initialised from its own ``seed``), its
own prompts and its own optimiser (its own skip flag and lr schedule). The generators' weights are
stacked and run as one batched call (``torch.func.vmap`` over ``functional_call``), so variant k
computes what a lone edit with its prompt, seed and draw seed computes (tested to 1e-5).

What a person compares: ``OUT/<name>/`` per variant (a lone edit's files), ``OUT/variants.png`` (the
source and every composite, each captioned with its prompt and seed) and ``OUT/variants.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from ..io import InputError, atomic_path, check_output_dir, save_text, slug, to_uint8

log = logging.getLogger(__name__)

CPU_VARIANTS_PER_RUN = 2  # the CPU's default chunk: compute-bound there, a bigger group gains little


@dataclass(frozen=True)
class Variant:
    """One look: its prompts, the seed of its generator, and the folder name of its outputs."""

    prompt: str
    seed: int
    screen_prompt: str | None = None
    roi_prompt: str | None = None

    @property
    def name(self) -> str:
        return f"{slug(self.prompt)}-s{self.seed}"


def _per_prompt(values, name: str, n: int) -> list:
    """``values`` given once (for every prompt) or once per prompt."""
    if values is None or isinstance(values, str):
        return [values] * n
    values = list(values)
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InputError(
            f"--{name} given {len(values)} times for {n} prompts: give it once (for every prompt) "
            f"or {n} times (one per --prompt)"
        )
    return values


def make_variants(prompts, seeds=None, screen_prompts=None, roi_prompts=None) -> list[Variant]:
    """Every prompt with every seed (prompt-major order), checked before any model loads: no
    empty or repeated prompt or seed; screen / ROI prompts given once or once per prompt."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise InputError("no prompt: pass --prompt 'golden horse' (repeat it for variants)")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InputError(f"prompt {i + 1} of {len(prompts)} is empty: give every --prompt some text")
    repeated = sorted({p for p in prompts if prompts.count(p) > 1})
    if repeated:
        raise InputError(f"prompt {repeated[0]!r} given twice: each --prompt once (use --seed for more)")
    seeds = [0] if seeds is None else ([seeds] if isinstance(seeds, int) else list(seeds))
    if not seeds:
        seeds = [0]
    if len(set(seeds)) != len(seeds):
        raise InputError(
            f"seed {sorted(s for s in seeds if seeds.count(s) > 1)[0]} given twice: each --seed once"
        )
    screens = _per_prompt(screen_prompts, "screen-prompt", len(prompts))
    rois = _per_prompt(roi_prompts, "roi-prompt", len(prompts))
    if len({r is None for r in rois}) > 1:
        raise InputError("--roi-prompt given for some prompts only: give it for every prompt or for none")
    variants = [
        Variant(p, int(s), screen, roi)
        for p, screen, roi in zip(prompts, screens, rois, strict=True)
        for s in seeds
    ]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise InputError("two prompts give the same folder name: make them differ in letters or digits")
    return variants


class StackedGenerators(nn.Module):
    """N generators of one structure run as one call: ``forward(x)`` (B, 3, H, W) ->
    (N, B, 4, H, W), generator k's output at [k]. The weights are stacked at each call (the gradient
    reaches each generator's own parameters) and the structure runs once under ``vmap``."""

    def __init__(self, generators: Sequence[nn.Module]):
        super().__init__()
        self.generators = nn.ModuleList(generators)
        self.template = copy.deepcopy(generators[0]).to("meta")  # the structure, no memory
        self.min_side = generators[0].min_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        names = [n for n, _ in self.generators[0].named_parameters()]
        per = [dict(g.named_parameters()) for g in self.generators]
        stacked = {n: torch.stack([p[n] for p in per]) for n in names}
        buffers = dict(self.generators[0].named_buffers())  # constants, the same in every generator

        def one(params):
            return functional_call(self.template, {**params, **buffers}, (x,))

        return torch.func.vmap(one)(stacked)


def group_runner(generators: Sequence[nn.Module], compiled, stack: bool):
    """``run(x) -> [rgba of each generator]`` for generators trained together: one stacked call
    (:class:`StackedGenerators`, ``stack``) or each in turn (each generator's own call, bit for bit
    a lone edit's; the generator's fp32 gradient is ill-conditioned enough, about 1e-2 relative
    against fp64 at its deepest levels, that any other order of sums moves a run's numbers by more
    than rounding). ``compiled`` wraps a module (the engine's compile)."""
    if len(generators) == 1 or not stack:
        runs = [compiled(g) for g in generators]
        return lambda x: [run(x) for run in runs]
    run = compiled(StackedGenerators(generators))
    return lambda x: list(run(x).unbind(0))


def variants_per_run(n: int, device: torch.device, limit: int, bytes_per_variant: int | None = None) -> int:
    """How many variants one run trains together: ``limit`` when set (> 0); else on the CPU
    :data:`CPU_VARIANTS_PER_RUN`, on CUDA as many as the free memory holds at ``bytes_per_variant``
    (the activations of one variant's step, bench_memory), at least 1."""
    if limit > 0:
        return max(1, min(n, limit))
    if device.type != "cuda" or not bytes_per_variant:
        return min(n, CPU_VARIANTS_PER_RUN)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(n, int(0.8 * free) // bytes_per_variant))


# -- what a person compares --------------------------------------------------------------------------
TILE_HEIGHT = 256  # px of each picture in variants.png
CAPTION_HEIGHT = 40  # px of text under each picture


def grid_layout(hw: tuple[int, int], n: int) -> tuple[tuple[int, int], list[tuple[int, int, int, int]]]:
    """The size (H, W) of variants.png for a source of size ``hw`` and ``n`` variants, and each tile's
    picture box (top, left, height, width): the source first, then the variants, in rows of at most
    four."""
    h, w = hw
    tw = max(1, round(w * TILE_HEIGHT / h))
    cols = min(4, n + 1)
    rows = -(-(n + 1) // cols)
    cell_h = TILE_HEIGHT + CAPTION_HEIGHT
    boxes = [((i // cols) * cell_h, (i % cols) * tw, TILE_HEIGHT, tw) for i in range(n + 1)]
    return (rows * cell_h, cols * tw), boxes


def variants_grid(source: torch.Tensor, composites: list[torch.Tensor], captions: list[str]):
    """The comparison sheet (a PIL RGB image): ``source`` and each composite (3, H, W) in [0, 1] at
    :data:`TILE_HEIGHT`, each with its caption under it (the source's: "source")."""
    from PIL import Image, ImageDraw, ImageFont

    (gh, gw), boxes = grid_layout((int(source.shape[-2]), int(source.shape[-1])), len(composites))
    sheet = Image.new("RGB", (gw, gh), "white")
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: one size
        font = ImageFont.load_default()
    for picture, caption, (top, left, th, tw) in zip(
        [source, *composites], ["source", *captions], boxes, strict=True
    ):
        tile = Image.fromarray(to_uint8(picture)).resize((tw, th), Image.Resampling.BICUBIC)
        sheet.paste(tile, (left, top))
        for i, line in enumerate(caption.splitlines()[:2]):
            draw.text(
                (left + 4, top + th + 3 + 17 * i), _fit(draw, line, font, tw - 8), fill="black", font=font
            )
    return sheet


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` shortened with an ellipsis to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def caption(variant: Variant) -> str:
    return f"{variant.prompt}\nseed {variant.seed}"


def save_variants(out_dir: str | os.PathLike, variants: list[Variant], results: list) -> list[Path]:
    """``OUT/<name>/`` per variant (``result.save``), ``OUT/variants.png`` and ``OUT/variants.json``
    (each variant's prompts, seed, folder and final losses), each file written whole."""
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for variant, result in zip(variants, results, strict=True):
        paths += result.save(out / variant.name)
    sheet = variants_grid(results[0].source, [r.composite for r in results], [caption(v) for v in variants])
    with atomic_path(out / "variants.png") as tmp:
        sheet.save(tmp, format="PNG")
    paths.append(out / "variants.png")
    summary = [
        {
            "name": v.name,
            "prompt": v.prompt,
            "seed": v.seed,
            "screen_prompt": v.screen_prompt,
            "roi_prompt": v.roi_prompt,
            "draw_seed": r.config.draw_seed,
            "steps": r.steps_done,
            "final_losses": r.losses[-1] if r.losses else {},
        }
        for v, r in zip(variants, results, strict=True)
    ]
    paths.append(save_text(json.dumps(summary, indent=2) + "\n", out / "variants.json"))
    return paths
