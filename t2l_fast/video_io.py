"""Reading videos (frame folders or video files) and writing them (H.264 MP4, PNG frames).

Frames travel as uint8 tensors (T, 3, H, W), RGB. Video files are decoded and encoded with PyAV.
Every file is written whole: to a temporary name beside the target, then renamed (``atomic_path``).
"""

from __future__ import annotations

import logging
import os
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from t2l_fast.io import InputError, atomic_path

log = logging.getLogger(__name__)

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv", ".avi")
#: Frame rate given to a folder of frames (it has none of its own).
FOLDER_FPS = 25.0
#: Frame size of the reference video pipeline (width, height).
DEFAULT_SIZE = (768, 432)


def parse_size(text: str, name: str = "--size") -> tuple[int, int]:
    """'768x432' -> (768, 432); anything else (or a side under 8 px) is an InputError naming ``name``."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text or "")
    if not m or int(m.group(1)) < 8 or int(m.group(2)) < 8:
        raise InputError(
            f"{name} must be WIDTHxHEIGHT with sides of at least 8 px, e.g. 768x432 (got {text!r})"
        )
    return int(m.group(1)), int(m.group(2))


def _resize(img: Image.Image, size: tuple[int, int] | None) -> Image.Image:
    """Resize to ``size`` = (width, height) with an antialiased filter; None keeps the native size."""
    if size is None or img.size == tuple(size):
        return img
    return img.resize(tuple(size), resample=Image.Resampling.LANCZOS)


def _to_chw(img: Image.Image) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) uint8."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def _check_size(size: tuple[int, int] | None) -> None:
    if size is not None and (len(size) != 2 or int(size[0]) < 1 or int(size[1]) < 1):
        raise InputError(f"frame size must be (width, height) with positive values, got {size}")


def list_frame_files(folder: str | os.PathLike) -> list[Path]:
    """The frame images (jpg / jpeg / png) in ``folder``, sorted by name."""
    folder = Path(folder)
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FRAME_EXTENSIONS),
        key=lambda p: p.name,
    )


def _read_folder(
    folder: Path, max_frames: int | None, size: tuple[int, int] | None
) -> tuple[torch.Tensor, float]:
    files = list_frame_files(folder)
    if not files:
        raise InputError(f"no frame images ({', '.join(FRAME_EXTENSIONS)}) in folder {folder}")
    if max_frames is not None:
        files = files[:max_frames]
    frames = []
    first_size = None
    for f in files:
        try:
            with Image.open(f) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read frame image {f}: {e}") from e
        if first_size is None:
            first_size = im.size
        elif im.size != first_size:
            raise InputError(
                f"frame {f.name} is {im.size[0]}x{im.size[1]} but {files[0].name} is "
                f"{first_size[0]}x{first_size[1]}; all frames in {folder} must have one size"
            )
        frames.append(_to_chw(_resize(im.convert("RGB"), size)))
    return torch.stack(frames), FOLDER_FPS


def _read_file(
    path: Path, max_frames: int | None, size: tuple[int, int] | None
) -> tuple[torch.Tensor, float]:
    frames = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise InputError(f"no video stream in {path}")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else FOLDER_FPS
            for frame in container.decode(stream):
                frames.append(_to_chw(_resize(frame.to_image(), size)))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except InputError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"cannot decode video {path}: {str(e).strip() or type(e).__name__}") from e
    if not frames:
        raise InputError(f"no frames could be decoded from video {path}")
    return torch.stack(frames), fps


def read_video(
    path: str | os.PathLike,
    max_frames: int | None = None,
    size: tuple[int, int] | None = DEFAULT_SIZE,
) -> tuple[torch.Tensor, float]:
    """Read a video from a folder of frames or a video file.

    Args:
        path: a folder of jpg/jpeg/png frames (sorted by name; all of one size) or a video file
            (mp4 / mov / webm / mkv / avi, decoded with PyAV).
        max_frames: read at most this many frames (the first ones); None reads all.
        size: (width, height) every frame is resized to (antialiased Lanczos); None keeps the native size.
    Returns:
        (frames, fps): frames (T, 3, H, W) uint8 RGB; fps from the container (25 for a folder).
    Raises:
        InputError: missing path, unsupported extension, empty folder, frames of different sizes, or a
            file that cannot be decoded.
    """
    path = Path(path)
    _check_size(size)
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames must be >= 1, got {max_frames}")
    if not path.exists():
        raise InputError(f"video not found: {path}")
    if path.is_dir():
        frames, fps = _read_folder(path, max_frames, size)
    elif path.suffix.lower() in VIDEO_EXTENSIONS:
        frames, fps = _read_file(path, max_frames, size)
    else:
        raise InputError(
            f"unsupported video {path}: expected a folder of frames or a file ending in "
            f"{', '.join(VIDEO_EXTENSIONS)}"
        )
    log.info(
        "read %d frames of %dx%d at %.3g fps from %s",
        frames.shape[0],
        frames.shape[3],
        frames.shape[2],
        fps,
        path,
    )
    return frames, fps


def _as_uint8(frames: torch.Tensor) -> torch.Tensor:
    """(T, 3, H, W) uint8, or float in [0, 1] (clamped, rounded) -> (T, 3, H, W) uint8 on the CPU."""
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be (T, 3, H, W), got {tuple(frames.shape)}")
    frames = frames.detach().cpu()
    if frames.dtype == torch.uint8:
        return frames
    if not frames.is_floating_point():
        raise ValueError(f"frames must be uint8 or float in [0, 1], got {frames.dtype}")
    return (frames.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def write_video(path: str | os.PathLike, frames: torch.Tensor, fps: float, crf: int = 18) -> Path:
    """Write frames as an H.264 MP4 (yuv420p), atomically.

    Args:
        path: the output file (its suffix should be .mp4).
        frames: (T, 3, H, W) uint8 or float in [0, 1].
        fps: frame rate (> 0).
        crf: x264 constant rate factor (lower = better; 18 is visually lossless).
    yuv420p needs even sizes: an odd height or width is padded by repeating the last row / column
    (logged). Returns the path written.
    """
    path = Path(path)
    data = _as_uint8(frames)
    if data.shape[0] == 0:
        raise ValueError("no frames to write")
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    t, _, h, w = data.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        log.warning("padding %dx%d frames to %dx%d for H.264 yuv420p", w, h, w + pad_w, h + pad_h)
        data = torch.nn.functional.pad(data.float(), (0, pad_w, 0, pad_h), mode="replicate").to(torch.uint8)
    hwc = data.permute(0, 2, 3, 1).contiguous().numpy()  # (T, H, W, 3)
    rate = Fraction(fps).limit_denominator(1001)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height = hwc.shape[2], hwc.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for img in hwc:
                frame = av.VideoFrame.from_ndarray(img, format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    log.info("wrote %d frames of %dx%d at %.3g fps to %s", t, hwc.shape[2], hwc.shape[1], fps, path)
    return path


def write_frames(folder: str | os.PathLike, frames: torch.Tensor, prefix: str = "") -> list[Path]:
    """Write frames as PNGs ``{prefix}{index:05d}.png`` in ``folder`` (created), each atomically.

    Args:
        frames: (T, 3, H, W) uint8 or float in [0, 1].
    Returns:
        The paths written, in frame order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = _as_uint8(frames).permute(0, 2, 3, 1).contiguous().numpy()  # (T, H, W, 3)
    paths = []
    for i, img in enumerate(data):
        p = folder / f"{prefix}{i:05d}.png"
        with atomic_path(p) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
        paths.append(p)
    log.info("wrote %d PNG frames to %s", len(paths), folder)
    return paths
