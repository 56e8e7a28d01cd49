"""The video editor: trains the generator on crops of a layered neural atlas, with the losses on frames.

Per step (DESIGN §2): frames t-d, t, t+d; one window in frame space (background: 95-100 % of the
frame; foreground: around the object, alpha >= 0.95 grown by 30 px); the atlas crop is the texel box
of the window's UVs (bucketed/padded on the fast path so compiled graphs replay); the generator runs
on the atlas crop; its RGBA is sampled into the three frames by the fused atlas-sampling op, which
composites at each tap over the frame. The generator also runs on one frame crop directly, and every
``data.source_every`` steps on the whole atlas. The objective is the image editor's.

The edit's opacity in frame space is multiplied by the layer's opacity: the NLA alpha A for a
foreground edit, 1 - A for a background edit (so the foreground occludes it). During training a
foreground edit is rendered as the reference does: over the frame, then multiplied by A (the object
over black, CLIP judges it alone), against the unmasked frames on the source side.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..augment import ColourParams, apply_colour
from ..io import InputError, save_png
from ..kernels import composite_rgba, sample_atlas
from ..losses import Layers
from ..models.atlas import AtlasData
from ..models.nla import load_nla_checkpoint, precompute_atlas
from ..video_io import read_video, write_frames, write_video
from .base import Editor, Result, Run
from .callbacks import StepCallback, step_end_hook
from .crops import CropSampler
from .engine import optimise_group
from .variants import make_variants

log = logging.getLogger(__name__)

OWN_ATLAS_FILE = "atlas.safetensors"


# ---------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------
def resolve_atlas_path(path: str | os.PathLike) -> tuple[Path, str]:
    """-> (file, kind) with kind "own" (saved by ``t2l-fast atlas``) or "nla" (original checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"atlas not found: {path} (pass --atlas with an NLA checkpoint or an atlas folder)")
    if path.is_dir():
        if (path / OWN_ATLAS_FILE).is_file():
            return path / OWN_ATLAS_FILE, "own"
        if (path / "checkpoint").is_file():
            return path / "checkpoint", "nla"
        raise InputError(f"atlas folder {path} holds neither {OWN_ATLAS_FILE} nor an NLA 'checkpoint' file")
    return path, "own" if path.suffix == ".safetensors" else "nla"


@dataclass
class VideoRun(Run):
    """A validated video edit: the run's config, the frames (T, 3, H, W) float in [0, 1], their rate,
    and the atlas (covering exactly these frames)."""

    frames: torch.Tensor
    fps: float
    atlas: AtlasData


# ---------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------
@dataclass(kw_only=True)
class VideoEditResult(Result):
    """A video edit: frames (T, 3, H, W) float32 in [0, 1] on the CPU; the edit on the atlas (and
    :class:`Result`'s fields)."""

    frames: torch.Tensor
    composite: torch.Tensor
    greenscreen: torch.Tensor
    atlas_edit: torch.Tensor  # (4, h, w) RGBA edit layer on the atlas
    atlas_composite: torch.Tensor  # (3, h, w) the edited atlas
    fps: float
    layer: str

    def _save_files(self, out: Path) -> list[Path]:
        """edited.mp4, greenscreen.mp4, atlas_edit.png (RGBA), atlas_composite.png (and frames/ when
        ``video.write_frames``)."""
        paths = [
            write_video(out / "edited.mp4", self.composite, self.fps),
            write_video(out / "greenscreen.mp4", self.greenscreen, self.fps),
            save_png(self.atlas_edit, out / "atlas_edit.png"),
            save_png(self.atlas_composite, out / "atlas_composite.png"),
        ]
        if self.config.video.write_frames:
            paths += write_frames(out / "frames", self.composite)
        return paths

    def _meta(self) -> dict[str, str]:
        return {"layer": self.layer}


# ---------------------------------------------------------------------------------------------------
# Editor
# ---------------------------------------------------------------------------------------------------
class VideoEditor(Editor):
    """Text-driven layered video editing through a layered neural atlas.

    >>> editor = VideoEditor(device="cuda")                                        # doctest: +SKIP
    >>> result = editor("car-turn/", atlas="car-turn/checkpoint", prompt="winter")  # doctest: +SKIP
    >>> result.save("out/")                                                        # doctest: +SKIP

    Mirrors :class:`ImageEditor`: config (``preset("video")`` by default), device, dtype, clip.
    """

    PRESET = "video"

    # -- validation and loading ---------------------------------------------------------------------
    def prepare(
        self,
        video,
        atlas: str | os.PathLike | AtlasData | None = None,
        prompt=None,
        screen_prompt=None,
        roi_prompt=None,
        layer: str | None = None,
    ) -> VideoRun:
        """Check everything before training: prompts, video, atlas (loaded; NLA networks are
        evaluated over the whole video here), frame counts, the layer."""
        cfg = self._run_config(prompt=prompt, screen_prompt=screen_prompt, roi_prompt=roi_prompt)
        if layer is not None:
            cfg.video.layer = layer
        if isinstance(atlas, (str, os.PathLike)):
            cfg.video.atlas = str(atlas)
        cfg.validate()
        if atlas is None and cfg.video.atlas is None:
            raise InputError(
                "a video edit needs an atlas: pass --atlas CHECKPOINT (or make one with `t2l-fast atlas`)"
            )
        if cfg.seed < 0:
            cfg.seed = random.randrange(2**31)

        data: AtlasData | None
        if isinstance(atlas, AtlasData):
            data, kind, file = atlas, "given", None
        else:
            assert cfg.video.atlas is not None  # checked above
            file, kind = resolve_atlas_path(cfg.video.atlas)
            data = AtlasData.load(file) if kind == "own" else None
            models = load_nla_checkpoint(file) if kind == "nla" else None
        size = (cfg.video.width, cfg.video.height) if data is None else (data.width, data.height)
        if isinstance(video, torch.Tensor):
            frames = video.float() / 255 if video.dtype == torch.uint8 else video.float()
            fps = 25.0
            if cfg.video.frames:
                frames = frames[: cfg.video.frames]
        else:
            frames_u8, fps = read_video(video, max_frames=cfg.video.frames, size=size)
            frames = frames_u8.float() / 255
        t = frames.shape[0]
        if t < 3:
            raise InputError(f"the video has {t} frame(s); a video edit needs at least 3")
        if data is None:
            trained = cfg.video.trained_frames or t
            if t > trained:
                raise InputError(
                    f"the video has {t} frames but the atlas was trained on {trained}: "
                    f"pass --frames {trained}"
                )
            log.info("evaluating the atlas networks over %d frames of %dx%d", t, *size)
            assert models is not None  # no atlas data: an NLA checkpoint was read
            data = precompute_atlas(
                models.to(self.device), t, size[1], size[0], grid=cfg.video.grid, trained_frames=trained
            )
        else:
            if t > data.num_frames:
                raise InputError(
                    f"the video has {t} frames but the atlas covers {data.num_frames}: "
                    f"pass --frames {data.num_frames}"
                )
            if (data.height, data.width) != tuple(frames.shape[-2:]):
                raise InputError(
                    f"the frames are {frames.shape[-1]}x{frames.shape[-2]} but the atlas is "
                    f"{data.width}x{data.height}"
                )
            if t < data.num_frames:
                # the first t frames (the atlas images and their metadata stay)
                data = data.frames(slice(0, t))
        if cfg.video.layer == "foreground" and data.foreground_is_empty(cfg.video.mask_threshold):
            raise InputError(
                "the atlas' foreground is empty (no pixel has alpha >= "
                f"{cfg.video.mask_threshold}): edit the background layer instead"
            )
        return VideoRun(cfg, frames, float(fps), data)

    def __call__(
        self,
        video,
        atlas=None,
        prompt=None,
        screen_prompt=None,
        roi_prompt=None,
        layer=None,
        *,
        seed: int | list[int] | None = None,
        callback: StepCallback | None = None,
        progress: bool = False,
    ):
        """Edit ``video`` (a folder of frames, a video file, or a (T, 3, H, W) tensor) through its
        ``atlas``: a :class:`VideoEditResult`. A list of prompts or of seeds makes variants (every
        prompt with every seed, trained together): a list of results, one per variant."""
        if isinstance(prompt, (list, tuple)) or isinstance(seed, (list, tuple)):
            chosen = self.config.prompt if prompt is None else prompt
            variants = make_variants(
                chosen, self.config.seed if seed is None else seed, screen_prompt, roi_prompt
            )
            runs = self.prepare_variants(video, variants, atlas=atlas, layer=layer)
            return self.train_variants(runs, callback=callback, progress=progress)
        run = self.prepare(video, atlas, prompt, screen_prompt, roi_prompt, layer)
        if seed is not None:
            run.config.seed = seed
        return self.train(run, callback=callback, progress=progress)

    # -- training -----------------------------------------------------------------------------------
    def train(
        self, run: VideoRun, *, callback: StepCallback | None = None, progress: bool = False
    ) -> VideoEditResult:
        """The optimisation loop on a prepared run (from ``prepare``); Ctrl-C, or the callback
        (:mod:`~t2l_fast.pipeline.callbacks`: no pictures for a video) returning True, ends it early."""
        return self._train([run], callback=callback, progress=progress)[0]

    def _activation_hw(self, run: VideoRun) -> tuple[int, int]:
        return int(run.frames.shape[-2]), int(run.frames.shape[-1])

    def _train(
        self,
        runs: list[VideoRun],
        *,
        callback: StepCallback | None = None,
        progress: bool = False,
        first: int = 0,
    ) -> list[VideoEditResult]:
        """Train the runs' generators together (one, or variants sharing the video, its atlas and
        the draws: the windows, crops and views)."""
        device, run, n = self.device, runs[0], len(runs)
        cfg = run.config
        clip, engine = self._start(run)
        generators, run_generators = self._generators(runs, engine)
        smallest = generators[0].min_side
        sampler = CropSampler(run, device, smallest, engine.bucket)
        objective = self.objective(clip, [r.config for r in runs], engine)
        foreground = cfg.video.layer == "foreground"

        def generate(x: torch.Tensor) -> list[torch.Tensor]:
            return [y.float() for y in _at_least(run_generators, x, smallest)]

        shrink = cfg.video.crop_downscale

        def jitter(x: torch.Tensor, gen: torch.Generator, also: torch.Tensor | None = None):
            return _jitter(x, gen, cfg.data.jitter_p, also)

        def examples_of_step(step: int, gen: torch.Generator):
            crop = sampler.draw(gen)
            # the frames the losses see take the atlas crop's jitter: the original samples them from
            # the jittered crop
            atlas_in, seen = jitter(crop.atlas, gen, crop.frames)
            flip = float(torch.rand(1, generator=gen)) < cfg.data.flip_p
            atlas_in = _downscaled(atlas_in, shrink)  # the fused op samples any size (normalised UVs)
            rgbas = generate(atlas_in.flip(-1) if flip else atlas_in)
            frames = [_frame_layers((r.flip(-1) if flip else r)[0], crop, seen, foreground) for r in rgbas]
            # one window fed to the generator directly, as the original: the layer's reconstruction
            # (background: the atlas sampled there, without the object; foreground: the object over
            # black), jittered and flipped like the atlas crop; a foreground output is multiplied by A
            k = int(torch.randint(3, (1,), generator=gen))
            src, _ = jitter(sampler.reconstruction(crop, k), gen)
            a_k = crop.opacity[k : k + 1, None]
            if flip:
                src, a_k = src.flip(-1), a_k.flip(-1)
            whole = (step + 1) % cfg.data.source_every == 0
            batches = []
            for seen_frames, one in zip(frames, generate(src), strict=True):
                direct = Layers.from_rgba(one * a_k if foreground else one, src)
                # the bootstrap term as the original computes it in effect: its loss assigns instead
                # of adding, so only the step's last example counts (the whole atlas, else the direct
                # crop), divided by the number of examples
                seen_frames.bootstrap_share = (0.0,) * len(seen_frames)
                direct.bootstrap_share = (0.0 if whole else 1.0,)
                batches.append(Layers.cat([seen_frames, direct]))
            count = len(batches[0]) + (1 if whole else 0)
            yield batches, None, len(batches[0]) / count, None
            if whole:
                atlas_img = sampler.whole_atlas
                yield (
                    [Layers.from_rgba(r, atlas_img) for r in generate(atlas_img)],
                    ("atlas",),
                    1 / count,
                    None,
                )

        histories, interrupted = optimise_group(
            engine,
            generators,
            objective,
            examples_of_step,
            cfg.optim,
            cfg.seed if cfg.draw_seed is None else cfg.draw_seed,
            on_step=step_end_hook(callback, cfg.optim.steps, first=first),
            progress=progress,
            desc=f"editing {cfg.video.layer}" + (f", {n} variants" if n > 1 else ""),
        )
        return [
            self._render(r, g, sampler, engine, history, interrupted, clip.is_test_model)
            for r, g, history in zip(runs, generators, histories, strict=True)
        ]

    @torch.no_grad()
    def _render(
        self, run: VideoRun, generator, sampler: CropSampler, engine, history, interrupted, is_test
    ) -> VideoEditResult:
        """The generator on the whole atlas once, sampled at every pixel's UV, over the original frames."""
        region = sampler.region_image  # (1, 3, h, w): foreground: the object's part of the atlas
        with engine.autocast():
            shrunk = _downscaled(region, run.config.video.crop_downscale)
            (rgba,) = _at_least(lambda x: [generator(x)], shrunk, generator.min_side)
            if rgba.shape[-2:] != region.shape[-2:]:
                rgba = F.interpolate(
                    rgba.float(), size=region.shape[-2:], mode="bilinear", align_corners=False
                )
            rgba = sampler.to_full(rgba.float())
        atlas_out = composite_rgba(rgba, sampler.atlas_image[None])
        composite = torch.empty_like(run.frames)
        greenscreen = torch.empty_like(composite)
        for sl in run.atlas.chunks():
            frames = run.frames[sl].to(self.device)
            out = sample_atlas(rgba[0], sampler.view.grid(sl), frames, sampler.opacity[sl])
            composite[sl], greenscreen[sl] = out.composite.float().cpu(), out.greenscreen.float().cpu()
        return VideoEditResult(
            frames=run.frames,
            composite=composite.clamp(0, 1),
            greenscreen=greenscreen.clamp(0, 1),
            atlas_edit=rgba[0].cpu(),
            atlas_composite=atlas_out.composite[0].cpu(),
            fps=run.fps,
            layer=sampler.layer,
            **self._result_fields(run.config, generator, history, interrupted, is_test),
        )


def _frame_layers(rgba: torch.Tensor, crop, seen: torch.Tensor, foreground: bool) -> Layers:
    """The crop's frames as the losses see them: the atlas edit ``rgba`` (4, h, w) sampled at the
    windows' UVs and composited over the (jittered) frames ``seen``."""
    if foreground:
        # the original renders the layer over its own input, samples it, then multiplies by
        # A: A·a·C + (1 - a)·A·F (its alpha A·a and green screen are the fused op's own)
        out = sample_atlas(rgba, crop.grid, seen, crop.opacity)
        plain = sample_atlas(rgba, crop.grid, seen, None)
        composite = crop.opacity[:, None] * plain.composite
    else:
        out = sample_atlas(rgba, crop.grid, seen, crop.opacity)
        composite = out.composite
    a = out.alpha.float()
    return Layers(
        seen,
        composite,
        out.greenscreen,
        out.alpha,
        a.mean(dim=(1, 2, 3)),
        (2 * torch.sigmoid(5 * a) - 1).mean(dim=(1, 2, 3)),
    )


def _jitter(x: torch.Tensor, gen: torch.Generator, p: float, also: torch.Tensor | None = None):
    """The original's crop augmentation: colour jitter (0.1) with probability ``p``, applied to ``x``
    (and with the same factors to each image of ``also``): -> (x, also), jittered or not."""
    if float(torch.rand(1, generator=gen)) >= p:
        return x, also
    colour = ColourParams.draw(1, 1.0, 0.1, 0.0, gen).to(x.device)
    if also is None:
        return apply_colour(x, colour), None
    every = colour.map(lambda t: t.expand(len(also), *t.shape[1:]))
    return apply_colour(x, colour), apply_colour(also, every)


def _downscaled(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, h, w) at 1/``factor`` of its size (antialiased), or itself for a factor of 1."""
    if factor <= 1:
        return x
    size = (max(1, x.shape[-2] // factor), max(1, x.shape[-1] // factor))
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _at_least(net, x: torch.Tensor, smallest: int) -> list[torch.Tensor]:
    """``net(x)`` for x (B, 3, h, w), a list (one output per generator of a group); upsampled first
    (and each output back after) when a side is below ``smallest``."""
    h, w = x.shape[-2:]
    if min(h, w) >= smallest:
        return net(x)
    scale = smallest / min(h, w)
    big = F.interpolate(
        x,
        size=(max(smallest, round(h * scale)), max(smallest, round(w * scale))),
        mode="bilinear",
        align_corners=False,
    )
    return [
        F.interpolate(y, size=(h, w), mode="bilinear", antialias=True, align_corners=False) for y in net(big)
    ]
