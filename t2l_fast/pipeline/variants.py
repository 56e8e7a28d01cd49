"""Many looks at once: N prompt or seed variants of one input trained together.

The variants share the augmentation draws (one draw stream, ``config.draw_seed``: crops and views)
and every step's training crop; each has its own generator (initialised from its own ``seed``), its
own prompts and its own optimiser state (its own skip flag and lr schedule). The generators run as
one network of grouped convolutions (:class:`~t2l_fast.models.generator.GeneratorGroup`) or each in
turn, so variant k computes what a lone edit with its prompt, seed and draw seed computes (tested to 1e-5).

What a person compares: ``OUT/<name>/`` per variant (a lone edit's files), ``OUT/variants.png`` (the
source and every composite, each captioned with its prompt and seed; a video's middle frame),
``OUT/variants.mp4`` (videos: that sheet for every frame) and ``OUT/variants.json``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import InputError, atomic_path, check_output_dir, save_text, slug, to_uint8
from ..models.generator import Generator, GeneratorGroup

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


def group_runner(generators: Sequence[Generator], compiled, stack: bool):
    """``run(x) -> [rgba of each generator]`` for generators trained together: one grouped call
    (:class:`~t2l_fast.models.generator.GeneratorGroup`, ``stack``) or each in turn (each
    generator's own call, bit for bit a lone edit's; the generator's fp32 gradient is
    ill-conditioned enough, about 1e-2 relative against fp64 at its deepest levels, that any other
    order of sums moves a run's numbers by more than rounding). ``compiled`` wraps a module (the
    engine's compile)."""
    if len(generators) == 1 or not stack:
        runs = [compiled(g) for g in generators]
        return lambda x: [run(x) for run in runs]
    run = compiled(GeneratorGroup(list(generators)))
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


def bytes_per_variant(hw: tuple[int, int], cfg) -> int:
    """An estimate of one variant's activation memory in a step at source size ``hw``: the
    generator's feature maps (fp32 and their gradients) at the largest crop. bench_memory measures
    the real figure on a GPU."""
    h, w = hw
    side = cfg.data.scale_max**2 * h * w
    channels = cfg.generator.channels_down + cfg.generator.channels_up + cfg.generator.channels_skip
    return int(side * channels * 4 * 2 * 6)  # 4 bytes, with gradient, ~6 maps per level's width


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
    sheet, boxes = _captioned_page((int(source.shape[-2]), int(source.shape[-1])), captions)
    for picture, (top, left, th, tw) in zip([source, *composites], boxes, strict=True):
        sheet.paste(_tile(picture, th, tw), (left, top))
    return sheet


def variants_video(frames: torch.Tensor, composites: list[torch.Tensor], captions: list[str]) -> torch.Tensor:
    """The comparison sheet of every frame: (T, 3, H, W) uint8, frame t the :func:`variants_grid` of
    ``frames[t]`` and each composite's frame t (each (T, 3, h, w) in [0, 1]). The captions are drawn
    once, on a white page copied into every frame; each frame's tiles are pasted into its copy. H and W
    are made even (a white row or column: H.264's yuv420p needs even sizes)."""
    page, boxes = _captioned_page((int(frames.shape[-2]), int(frames.shape[-1])), captions)
    gw, gh = page.size
    blank = np.full((gh + gh % 2, gw + gw % 2, 3), 255, dtype=np.uint8)
    blank[:gh, :gw] = np.asarray(page)
    out = np.empty((frames.shape[0], *blank.shape), dtype=np.uint8)  # (T, H, W, 3)
    out[:] = blank
    for t in range(frames.shape[0]):
        pictures = [frames[t]] + [c[t] for c in composites]
        for picture, (top, left, th, tw) in zip(pictures, boxes, strict=True):
            out[t, top : top + th, left : left + tw] = np.asarray(_tile(picture, th, tw))
    return torch.from_numpy(out).permute(0, 3, 1, 2)  # a view: write_video's (T, H, W, 3) is this memory


def _captioned_page(hw: tuple[int, int], captions: list[str]):
    """The sheet without its pictures (white, the captions drawn: the source's "source", then
    ``captions``) and the pictures' boxes (:func:`grid_layout`)."""
    from PIL import Image, ImageDraw, ImageFont

    (gh, gw), boxes = grid_layout(hw, len(captions))
    page = Image.new("RGB", (gw, gh), "white")
    draw = ImageDraw.Draw(page)
    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1: one size
        font = ImageFont.load_default()
    for text, (top, left, th, tw) in zip(["source", *captions], boxes, strict=True):
        for i, line in enumerate(text.splitlines()[:2]):
            draw.text(
                (left + 4, top + th + 3 + 17 * i), _fit(draw, line, font, tw - 8), fill="black", font=font
            )
    return page, boxes


def _tile(picture: torch.Tensor, th: int, tw: int):
    """``picture`` (3, H, W) in [0, 1] as a PIL image of ``tw`` x ``th`` (bicubic)."""
    from PIL import Image

    return Image.fromarray(to_uint8(picture)).resize((tw, th), Image.Resampling.BICUBIC)


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
    (each variant's prompts, seed, folder and final losses), each file written whole. Video results
    (with ``frames``) also write ``OUT/variants.mp4`` (the sheet of every frame, at the results'
    rate); their ``variants.png`` is the sheet of the middle frame."""
    if len(results) != len(variants):
        raise ValueError(f"{len(variants)} variants but {len(results)} results: one result per variant")
    if not results:
        raise InputError("no variants to save: give at least one variant and its result")
    out = check_output_dir(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for variant, result in zip(variants, results, strict=True):
        paths += result.save(out / variant.name)
    captions = [caption(v) for v in variants]
    video = hasattr(results[0], "frames")  # a VideoEditResult (its source is the frames)
    if video:
        mid = results[0].frames.shape[0] // 2
        sheet = variants_grid(results[0].frames[mid], [r.composite[mid] for r in results], captions)
    else:
        sheet = variants_grid(results[0].source, [r.composite for r in results], captions)
    with atomic_path(out / "variants.png") as tmp:
        sheet.save(tmp, format="PNG")
    paths.append(out / "variants.png")
    if video:
        from ..video_io import write_video

        grid = variants_video(results[0].frames, [r.composite for r in results], captions)
        paths.append(write_video(out / "variants.mp4", grid, results[0].fps))
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
