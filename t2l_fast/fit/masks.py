"""Reading per-frame object masks (DAVIS style: one PNG per frame, 255 = object)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from t2l_fast.io import InputError
from t2l_fast.video_io import list_frame_files


def read_masks(
    folder: str | os.PathLike,
    num_frames: int,
    size: tuple[int, int],
    native_size: tuple[int, int] | None = None,
    frames_truncated: bool = False,
) -> torch.Tensor:
    """Read the first ``num_frames`` masks of ``folder`` (sorted by name) as (T, H, W) bool.

    A pixel is object where the grey value is > 127 (palette images: where the index is > 0). Masks
    must have the video's native frame size ``native_size`` or the fitting size ``size`` (both
    (width, height)); they are resized (nearest) to ``size``.

    Args:
        frames_truncated: the video was cut to ``num_frames`` by the user (then extra masks are fine).
    Raises:
        InputError: a missing folder, no mask images, fewer masks than frames (or more, when the video
            was not cut), a mask of another size (named), an unreadable mask, masks empty in every frame.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--masks {folder} is not a folder of mask images")
    files = list_frame_files(folder)
    if not files:
        raise InputError(f"no mask images (png/jpg) in {folder}")
    if len(files) < num_frames or (len(files) > num_frames and not frames_truncated):
        raise InputError(
            f"masks folder {folder} has {len(files)} masks but the video has {num_frames} frames"
        )
    sizes = {tuple(size)} | ({tuple(native_size)} if native_size is not None else set())
    out = []
    for f in files[:num_frames]:
        try:
            with Image.open(f) as im:
                im.load()
                if im.size not in sizes:
                    want = " or ".join(f"{w}x{h}" for w, h in sorted(sizes))
                    raise InputError(f"mask {f.name} is {im.size[0]}x{im.size[1]} but the frames are {want}")
                if im.mode == "P":
                    arr = np.asarray(im) > 0
                else:
                    arr = np.asarray(im.convert("L")) > 127
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read mask {f}: {e}") from e
        if (arr.shape[1], arr.shape[0]) != tuple(size):
            arr = np.asarray(Image.fromarray(arr).resize(tuple(size), resample=Image.Resampling.NEAREST))
        out.append(torch.from_numpy(arr.copy()))
    masks = torch.stack(out)
    if not bool(masks.any()):
        raise InputError(
            f"every mask in {folder} is empty (no pixel > 127): mark the object, or leave out --masks "
            "for a background-only atlas"
        )
    return masks
