"""The video editor: trains the generator on crops of a layered neural atlas, with the losses on frames.

Per step (DESIGN §2): frames t-d, t, t+d; one window in frame space (background: 95-100 % of the
frame; foreground: around the object, alpha >= 0.95 grown by 30 px); the atlas crop is the texel box
of the window's UVs (bucketed/padded on the fast path so compiled graphs replay); the generator runs
on the atlas crop; its RGBA is sampled into the three frames by the fused atlas-sampling op, which
composites at each tap over the frame. The generator also runs on one frame crop directly, and every
``data.source_every`` steps on the whole atlas. The objective is the image editor's.

The edit's opacity in frame space is multiplied by the layer's opacity: the NLA alpha A for a
foreground edit, 1 - A for a background edit (so the foreground occludes it). Foreground edits see
the object over black during training (the reference's choice: CLIP judges the object alone).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..augment import ColourParams, apply_colour
from ..config import Config
from ..io import InputError, check_output_dir, save_png, save_text
from ..kernels import composite_rgba, sample_atlas
from ..losses import Layers
from ..models.atlas import AtlasData, load_nla_checkpoint, precompute_atlas
from ..models.generator import Generator
from ..video_io import read_video, write_frames, write_video
from .base import Editor, save_generator
from .engine import optimise
from .image import StepCallback

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
class VideoInput:
    """A validated video edit: frames (T, 3, H, W) float in [0, 1], their rate, and the atlas."""

    frames: torch.Tensor
    fps: float
    atlas: AtlasData


def _foreground_boxes(alpha: torch.Tensor, threshold: float, border: int, smallest: int) -> torch.Tensor:
    """Per frame (T, 4) [y0, x0, h, w]: the box of alpha >= threshold grown by ``border``, at least
    ``smallest`` px (within the frame), the whole frame where the object is absent."""
    t, h, w = alpha.shape
    boxes = torch.zeros(t, 4, dtype=torch.long)
    for i in range(t):
        ys, xs = torch.nonzero(alpha[i] >= threshold, as_tuple=True)
        if len(ys) == 0:
            boxes[i] = torch.tensor([0, 0, h, w])
            continue
        y0, y1 = int(ys.min()) - border, int(ys.max()) + 1 + border
        x0, x1 = int(xs.min()) - border, int(xs.max()) + 1 + border
        for lo, hi, size, idx in ((y0, y1, h, 0), (x0, x1, w, 1)):
            need = min(size, max(smallest, hi - lo))
            centre = (lo + hi) / 2
            start = int(round(min(max(centre - need / 2, 0), size - need)))
            boxes[i, idx], boxes[i, idx + 2] = start, need
    return boxes


# ---------------------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------------------
@dataclass
class VideoEditResult:
    """A video edit: frames (T, 3, H, W) float32 in [0, 1] on the CPU; the edit on the atlas."""

    frames: torch.Tensor
    composite: torch.Tensor
    greenscreen: torch.Tensor
    atlas_edit: torch.Tensor  # (4, h, w) RGBA edit layer on the atlas
    atlas_composite: torch.Tensor  # (3, h, w) the edited atlas
    fps: float
    layer: str
    losses: list[dict[str, float]]
    config: Config
    generator_state: dict[str, torch.Tensor] = field(repr=False)
    steps_done: int = 0
    interrupted: bool = False
    is_test_model: bool = False

    def save(self, out_dir: str | os.PathLike) -> list[Path]:
        """edited.mp4, greenscreen.mp4, atlas_edit.png (RGBA), atlas_composite.png, config.yaml,
        generator.safetensors (and frames/ when ``video.write_frames``), each written whole."""
        out = check_output_dir(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [
            write_video(out / "edited.mp4", self.composite, self.fps),
            write_video(out / "greenscreen.mp4", self.greenscreen, self.fps),
            save_png(self.atlas_edit, out / "atlas_edit.png"),
            save_png(self.atlas_composite, out / "atlas_composite.png"),
            save_text(self.config.to_yaml(), out / "config.yaml"),
        ]
        paths.append(
            save_generator(
                out / "generator.safetensors",
                self.generator_state,
                self.config,
                layer=self.layer,
                steps=str(self.steps_done),
            )
        )
        if self.config.video.write_frames:
            paths += write_frames(out / "frames", self.composite)
        return paths


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
    ) -> tuple[Config, VideoInput]:
        """Check everything before training: prompts, video, atlas (loaded; NLA networks are
        evaluated over the whole video here), frame counts, the layer."""
        cfg = copy.deepcopy(self.config)
        for name, value in (("prompt", prompt), ("screen_prompt", screen_prompt), ("roi_prompt", roi_prompt)):
            if value is not None:
                setattr(cfg, name, value)
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

        if isinstance(atlas, AtlasData):
            data, kind, file = atlas, "given", None
        else:
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
                data = dataclasses.replace(
                    data,
                    uv_background=data.uv_background[:t],
                    uv_foreground=data.uv_foreground[:t],
                    alpha=data.alpha[:t],
                )
        if cfg.video.layer == "foreground" and data.foreground_is_empty(cfg.video.mask_threshold):
            raise InputError(
                "the atlas' foreground is empty (no pixel has alpha >= "
                f"{cfg.video.mask_threshold}): edit the background layer instead"
            )
        return cfg, VideoInput(frames, float(fps), data)

    def __call__(
        self,
        video,
        atlas=None,
        prompt=None,
        screen_prompt=None,
        roi_prompt=None,
        layer=None,
        *,
        on_step: StepCallback | None = None,
        progress: bool = False,
    ) -> VideoEditResult:
        cfg, inputs = self.prepare(video, atlas, prompt, screen_prompt, roi_prompt, layer)
        return self.train(cfg, inputs, on_step=on_step, progress=progress)

    # -- training -----------------------------------------------------------------------------------
    def train(
        self, cfg: Config, inputs: VideoInput, *, on_step: StepCallback | None = None, progress: bool = False
    ) -> VideoEditResult:
        device = self.device
        clip, engine = self._start(cfg)
        generator = Generator(cfg.generator).to(device)
        run_generator = engine.compiled(generator, dynamic=None)
        sampler = _CropSampler(cfg, inputs, device, generator.min_side, engine.bucket)
        objective = self.objective(clip, cfg, engine)
        foreground = cfg.video.layer == "foreground"

        def generate(x: torch.Tensor) -> torch.Tensor:
            return _at_least(run_generator, x, generator.min_side).float()

        def jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
            """The original's crop augmentation: colour jitter (0.1) with probability data.jitter_p."""
            if float(torch.rand(1, generator=gen)) < cfg.data.jitter_p:
                return apply_colour(x, ColourParams.draw(1, 1.0, 0.1, 0.0, gen).to(x.device))
            return x

        def examples_of_step(step: int, gen: torch.Generator):
            crop = sampler.draw(gen)
            atlas_in = jitter(crop.atlas, gen)
            flip = float(torch.rand(1, generator=gen)) < cfg.data.flip_p
            rgba = generate(atlas_in.flip(-1) if flip else atlas_in)
            rgba = rgba.flip(-1) if flip else rgba
            out = sample_atlas(rgba[0], crop.grid, crop.frames, crop.opacity)
            a = out.alpha.float()
            frames = Layers(
                crop.frames,
                out.composite,
                out.greenscreen,
                out.alpha,
                a.mean(dim=(1, 2, 3)),
                (2 * torch.sigmoid(5 * a) - 1).mean(dim=(1, 2, 3)),
            )
            # one window fed to the generator directly, as the original: the layer's reconstruction
            # (background: the atlas sampled there, without the object; foreground: the object over
            # black), jittered and flipped like the atlas crop; a foreground output is multiplied by A
            k = int(torch.randint(3, (1,), generator=gen))
            src = jitter(sampler.reconstruction(crop, k), gen)
            a_k = crop.opacity[k : k + 1, None]
            if flip:
                src, a_k = src.flip(-1), a_k.flip(-1)
            one = generate(src)
            if foreground:
                one = one * a_k
            direct = Layers.from_rgba(one, src)
            batch = Layers(
                *(torch.cat([x, y]) for x, y in zip(_fields(frames), _fields(direct), strict=True))
            )
            whole = (step + 1) % cfg.data.source_every == 0
            n = len(batch) + (1 if whole else 0)
            yield batch, None, len(batch) / n
            if whole:
                atlas_img = sampler.whole_atlas
                yield Layers.from_rgba(generate(atlas_img), atlas_img), ("atlas",), 1 / n

        history, interrupted = optimise(
            engine,
            generator,
            objective,
            examples_of_step,
            cfg.optim,
            cfg.seed,
            on_step=on_step,
            progress=progress,
            desc=f"editing {cfg.video.layer}",
        )
        return self._render(cfg, inputs, generator, sampler, history, interrupted, clip.is_test_model)

    @torch.no_grad()
    def _render(
        self, cfg, inputs: VideoInput, generator, sampler: _CropSampler, history, interrupted, is_test
    ) -> VideoEditResult:
        """The generator on the whole atlas once, sampled at every pixel's UV, over the original frames."""
        engine = self.engine
        region = sampler.region_image  # (1, 3, h, w): foreground: the object's part of the atlas
        with engine.autocast():
            rgba = sampler.to_full(_at_least(generator, region, generator.min_side).float())
        atlas_out = composite_rgba(rgba, sampler.atlas_image[None])
        layer = cfg.video.layer
        data = sampler.data
        t = data.num_frames
        composite = torch.empty(t, 3, data.height, data.width)
        greenscreen = torch.empty_like(composite)
        for t0 in range(0, t, 8):
            sl = slice(t0, min(t, t0 + 8))
            grid = data.to_grid(data.uv(layer)[sl], layer).to(self.device)
            frames = inputs.frames[sl].to(self.device)
            out = sample_atlas(rgba[0], grid, frames, sampler.opacity[sl])
            composite[sl], greenscreen[sl] = out.composite.float().cpu(), out.greenscreen.float().cpu()
        state = {k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
        return VideoEditResult(
            frames=inputs.frames,
            composite=composite.clamp(0, 1),
            greenscreen=greenscreen.clamp(0, 1),
            atlas_edit=rgba[0].cpu(),
            atlas_composite=atlas_out.composite[0].cpu(),
            fps=inputs.fps,
            layer=layer,
            losses=history,
            config=cfg,
            generator_state=state,
            steps_done=len(history),
            interrupted=interrupted,
            is_test_model=is_test,
        )


def _fields(layers: Layers) -> tuple[torch.Tensor, ...]:
    return (
        layers.source,
        layers.composite,
        layers.greenscreen,
        layers.alpha,
        layers.alpha_l1,
        layers.alpha_l0,
    )


def _at_least(net, x: torch.Tensor, smallest: int) -> torch.Tensor:
    """``net(x)`` for x (B, 3, h, w); upsampled first (and back after) when a side is below ``smallest``."""
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
    return F.interpolate(net(big), size=(h, w), mode="bilinear", antialias=True, align_corners=False)


@dataclass
class _Crop:
    atlas: torch.Tensor  # (1, 3, h, w) the atlas crop the generator sees
    grid: torch.Tensor  # (3, hc, wc, 2) where each window pixel samples that crop (grid_sample convention)
    frames: torch.Tensor  # (3, 3, hc, wc) the frame windows (foreground: the object over black)
    opacity: torch.Tensor  # (3, hc, wc) the layer's opacity there


class _CropSampler:
    """Draws a step's frame windows and the matching atlas crop (DESIGN §2), with fixed shapes on the
    fast path (windows resampled to the nearest multiple of ``bucket`` on each side, atlas crops
    rounded up to it).

    Foreground edits use the part of the atlas that the object's boxes map to (the original's
    ``get_atlas_bounding_box``): for the whole-atlas step and the final render, padded back to the
    full atlas by replicating its border.
    """

    def __init__(self, cfg: Config, inputs: VideoInput, device: torch.device, smallest: int, bucket: int):
        self.cfg, self.device, self.smallest, self.bucket = cfg, device, smallest, bucket
        self.layer = cfg.video.layer
        data = inputs.atlas.to(device)
        self.data = data
        self.frames = inputs.frames.to(device)
        alpha = data.alpha
        self.opacity = alpha if self.layer == "foreground" else 1 - alpha  # (T, H, W)
        # foreground: train on the object over black (the reference's choice)
        self.train_frames = self.frames * alpha[:, None] if self.layer == "foreground" else self.frames
        self.texels = data.to_texel(data.uv(self.layer), self.layer)  # (T, H, W, 2) indices into the atlas
        # a host copy for the atlas-crop boxes: a step reads no value back from the device
        self.host_texels = self.texels.cpu()
        self.atlas_image = data.atlas_image(self.layer).float()  # (3, h, w)
        # pad right/bottom (replicate) so bucketed crops always fit; texel indices are unchanged
        ha, wa = self.atlas_image.shape[-2:]
        ph = self._round_up(max(ha, smallest)) - ha
        pw = self._round_up(max(wa, smallest)) - wa
        self.padded = F.pad(self.atlas_image[None], (0, pw, 0, ph), mode="replicate")
        self.region = (0, 0, ha, wa)  # (v0, u0, h, w) of the atlas the generator sees whole
        if self.layer == "foreground":
            self.boxes = _foreground_boxes(
                alpha.cpu(), cfg.video.mask_threshold, cfg.video.mask_border, smallest
            )
            self.region = self._boxes_region(ha, wa)
        v0, u0, rh, rw = self.region
        self.region_image = self.atlas_image[None, :, v0 : v0 + rh, u0 : u0 + rw]
        factor = cfg.video.atlas_downscale if self.layer == "background" else 1
        whole = self.region_image
        if factor > 1:
            whole = F.interpolate(
                whole,
                size=(max(1, rh // factor), max(1, rw // factor)),
                mode="bilinear",
                antialias=True,
                align_corners=False,
            )
        self.whole_atlas = whole

    def _boxes_region(self, ha: int, wa: int) -> tuple[int, int, int, int]:
        """The texel box (v0, u0, h, w) of the UVs inside every frame's object box."""
        lo = torch.full((2,), float("inf"), device=self.device)
        hi = torch.full((2,), float("-inf"), device=self.device)
        for t, (y, x, bh, bw) in enumerate(self.boxes.tolist()):
            uv = self.texels[t, y : y + bh, x : x + bw].reshape(-1, 2)
            lo, hi = torch.minimum(lo, uv.amin(0)), torch.maximum(hi, uv.amax(0))
        u0, v0 = (int(max(0, min(int(c), n - 1))) for c, n in zip(lo.floor().tolist(), (wa, ha), strict=True))
        u1, v1 = (int(max(0, min(int(c), n - 1))) for c, n in zip(hi.ceil().tolist(), (wa, ha), strict=True))
        return v0, u0, v1 - v0 + 1, u1 - u0 + 1

    def to_full(self, rgba: torch.Tensor) -> torch.Tensor:
        """(1, C, h, w) on the region -> (1, C, H, W) on the whole atlas, the border replicated."""
        v0, u0, rh, rw = self.region
        ha, wa = self.atlas_image.shape[-2:]
        if (rh, rw) == (ha, wa):
            return rgba
        return F.pad(rgba, (u0, wa - u0 - rw, v0, ha - v0 - rh), mode="replicate")

    def reconstruction(self, crop: _Crop, k: int) -> torch.Tensor:
        """(1, 3, hc, wc): window ``k`` of the layer alone — the background atlas sampled there (the
        original's background reconstruction), or the object over black."""
        if self.layer == "foreground":
            return crop.frames[k : k + 1]
        rec = F.grid_sample(crop.atlas, crop.grid[k : k + 1], mode="bilinear", align_corners=False)
        return rec.clamp(0, 1)

    def _round_up(self, n: int) -> int:
        return -(-n // self.bucket) * self.bucket

    def _tensor_side(self, side: int) -> int:
        """The window's side in the training tensors: the nearest multiple of the bucket."""
        if self.bucket <= 1:
            return side
        return max(self.bucket, round(side / self.bucket) * self.bucket)

    def draw(self, gen: torch.Generator) -> _Crop:
        cfg = self.cfg
        t_all, h, w = self.opacity.shape
        d = max(1, min(cfg.video.frame_distance, (t_all - 1) // 2))
        t = int(torch.randint(d, t_all - d, (1,), generator=gen))
        idx = [t - d, t, t + d]
        cover = cfg.data.crop_min_cover + (1 - cfg.data.crop_min_cover) * torch.rand(2, generator=gen)
        if self.layer == "background":
            hc, wc = max(1, min(h, round(h * float(cover[0])))), max(1, min(w, round(w * float(cover[1]))))
            y0 = int(torch.randint(0, h - hc + 1, (1,), generator=gen))
            x0 = int(torch.randint(0, w - wc + 1, (1,), generator=gen))
            starts = [(y0, x0)] * 3
        else:
            boxes = self.boxes[idx]
            hc = max(1, min(h, round(float(boxes[:, 2].max()) * float(cover[0]))))
            wc = max(1, min(w, round(float(boxes[:, 3].max()) * float(cover[1]))))
            starts = []
            for y, x, bh, bw in boxes.tolist():
                cy = y + bh / 2 + (bh - hc) / 2 * (2 * float(torch.rand(1, generator=gen)) - 1) * (bh > hc)
                cx = x + bw / 2 + (bw - wc) / 2 * (2 * float(torch.rand(1, generator=gen)) - 1) * (bw > wc)
                starts.append(
                    (
                        int(min(max(round(cy - hc / 2), 0), h - hc)),
                        int(min(max(round(cx - wc / 2), 0), w - wc)),
                    )
                )

        def windows(x: torch.Tensor) -> torch.Tensor:
            return torch.stack(
                [x[i, ..., y : y + hc, x0 : x0 + wc] for i, (y, x0) in zip(idx, starts, strict=True)]
            )

        frames = windows(self.train_frames)  # (3, 3, hc, wc)
        opacity = windows(self.opacity)  # (3, hc, wc)
        texels = windows(self.texels.permute(0, 3, 1, 2))  # (3, 2, hc, wc)
        # the box of the windows' texels, on the host (resampling stays inside it)
        host = windows(self.host_texels.permute(0, 3, 1, 2)).transpose(0, 1).reshape(2, -1)
        (lu, lv), (hu, hv) = host.amin(1).floor().long().tolist(), host.amax(1).ceil().long().tolist()
        size = (self._tensor_side(hc), self._tensor_side(wc))
        if size != (hc, wc):  # resample the window to its bucketed size (its cover stays as drawn)
            frames, opacity, texels = (
                F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
                for x in (frames, opacity[:, None], texels)
            )
            opacity = opacity[:, 0]
        texels = texels.permute(0, 2, 3, 1)  # (3, h, w, 2)
        # atlas crop: the texel box of the windows' UVs, grown to the generator's minimum / the bucket
        ph, pw = self.padded.shape[-2:]
        size_u = min(pw, self._round_up(max(self.smallest, hu - lu + 1)))
        size_v = min(ph, self._round_up(max(self.smallest, hv - lv + 1)))
        # the extra texels split around the box (integer arithmetic: the box's last texel stays in)
        u0 = min(max(lu - (size_u - (hu - lu + 1)) // 2, 0), pw - size_u)
        v0 = min(max(lv - (size_v - (hv - lv + 1)) // 2, 0), ph - size_v)
        atlas = self.padded[:, :, v0 : v0 + size_v, u0 : u0 + size_u]
        grid = torch.stack(
            [(2 * (texels[..., 0] - u0) + 1) / size_u - 1, (2 * (texels[..., 1] - v0) + 1) / size_v - 1],
            dim=-1,
        )
        return _Crop(atlas, grid, frames, opacity)
