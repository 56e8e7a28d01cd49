"""Where a video edit's training examples come from: each step's frame windows and the matching
atlas crop (DESIGN §2), the object's boxes for foreground edits, and the part of the atlas the
generator sees whole."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..config import Config
from ..models.atlas import AtlasData, texels_to_grid


class VideoInputs(Protocol):
    """What the sampler reads of a video edit (:class:`~t2l_fast.pipeline.video.VideoRun`): the config,
    the frames (T, 3, H, W) in [0, 1] and the atlas covering them. Named here so that this module does
    not import the editor that uses it."""

    config: Config
    frames: torch.Tensor
    atlas: AtlasData


def foreground_boxes(alpha: torch.Tensor, threshold: float, border: int, smallest: int) -> torch.Tensor:
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


@dataclass
class Crop:
    atlas: torch.Tensor  # (1, 3, h, w) the atlas crop the generator sees
    grid: torch.Tensor  # (3, hc, wc, 2) where each window pixel samples that crop (grid_sample convention)
    frames: torch.Tensor  # (3, 3, hc, wc) the frame windows
    opacity: torch.Tensor  # (3, hc, wc) the layer's opacity there


class CropSampler:
    """Draws a step's frame windows and the matching atlas crop (DESIGN §2), with fixed shapes on the
    fast path (windows resampled to the nearest multiple of ``bucket`` on each side, atlas crops
    rounded up to it).

    Foreground edits use the part of the atlas that the object's boxes map to (the original's
    ``get_atlas_bounding_box``): for the whole-atlas step and the final render, padded back to the
    full atlas by replicating its border.
    """

    def __init__(self, run: VideoInputs, device: torch.device, smallest: int, bucket: int):
        cfg = run.config
        self.cfg, self.device, self.smallest, self.bucket = cfg, device, smallest, bucket
        self.layer = cfg.video.layer
        self.view = run.atlas.to(device).layer(self.layer)  # atlas image, texels, opacity of the layer
        self.opacity = self.view.opacity  # (T, H, W)
        self.texels = self.view.texels  # (T, H, W, 2) indices into the layer's atlas image
        # the frames as they are: the losses' source side (the original's atlas sample, unmasked)
        self.train_frames = run.frames.to(device)
        # a host copy for the atlas-crop boxes: a step reads no value back from the device
        self.host_texels = self.texels.cpu()
        self.atlas_image = self.view.atlas.float()  # (3, h, w)
        # pad right/bottom (replicate) so bucketed crops always fit; texel indices are unchanged
        ha, wa = self.atlas_image.shape[-2:]
        ph = self._round_up(max(ha, smallest)) - ha
        pw = self._round_up(max(wa, smallest)) - wa
        self.padded = F.pad(self.atlas_image[None], (0, pw, 0, ph), mode="replicate")
        self.region = (0, 0, ha, wa)  # (v0, u0, h, w) of the atlas the generator sees whole
        if self.layer == "foreground":
            self.boxes = foreground_boxes(
                self.opacity.cpu(), cfg.video.mask_threshold, cfg.video.mask_border, smallest
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

    def reconstruction(self, crop: Crop, k: int) -> torch.Tensor:
        """(1, 3, hc, wc): window ``k`` of the layer alone — the background atlas sampled there (the
        original's background reconstruction), or the object over black (frames × A, the original's
        foreground reconstruction)."""
        if self.layer == "foreground":
            return crop.frames[k : k + 1] * crop.opacity[k : k + 1, None]
        rec = F.grid_sample(crop.atlas, crop.grid[k : k + 1], mode="bilinear", align_corners=False)
        return rec.clamp(0, 1)

    def _round_up(self, n: int) -> int:
        return -(-n // self.bucket) * self.bucket

    def _tensor_side(self, side: int) -> int:
        """The window's side in the training tensors: the nearest multiple of the bucket."""
        if self.bucket <= 1:
            return side
        return max(self.bucket, round(side / self.bucket) * self.bucket)

    def draw(self, gen: torch.Generator) -> Crop:
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
        grid = texels_to_grid(texels, (u0, v0), (size_u, size_v))
        return Crop(atlas, grid, frames, opacity)
