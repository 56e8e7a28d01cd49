"""Reading user images and writing outputs whole (temp file + rename)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

MAX_MEGAPIXELS = 100  # larger images are refused before decoding (edits run at 512 px anyway)


class InputError(ValueError):
    """Bad user input; the message is one line naming the problem and the fix."""


def _umask() -> int:
    """The process's umask (read without changing it where /proc tells it, as on Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only way to read it)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    The temporary name keeps the suffix so that writers that infer the format from it still work.
    On any exception (Ctrl-C included) the temporary file is removed and ``final`` is untouched.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.stem}.tmp{os.getpid()}{final.suffix}")
    try:
        yield tmp
        if tmp.is_file():  # some writers (safetensors) create 0600 files: give the mode open() gives
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _pil_to_tensor(img: Image.Image, notes: list[str]) -> torch.Tensor:
    """PIL image of any common mode -> (3, H, W) float32 in [0, 1]."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img).astype(np.float32)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / peak, 0, 1)
        notes.append(f"{img.mode} (high bit depth) image converted to RGB")
        return torch.from_numpy(arr).unsqueeze(0).expand(3, -1, -1).contiguous()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        notes.append("the image's alpha channel is ignored")
    if img.mode != "RGB":
        if img.mode not in ("RGBA", "LA"):
            notes.append(f"{img.mode} image converted to RGB")
        img = img.convert("RGB")
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def _too_large(path: Path, pixels: int | None) -> InputError:
    size = f"{pixels / 1e6:.0f} MP, " if pixels else ""
    return InputError(
        f"{path} is too large ({size}above the {MAX_MEGAPIXELS} MP this tool reads): downscale it first "
        "(edits run at a 512 px short side)"
    )


def read_image(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """Read an image file -> ((3, H, W) float32 in [0, 1], notes on conversions made).

    EXIF orientation is applied. Raises InputError for a missing, unreadable or truncated file.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder: give an image file (a folder of frames is a video)")
    notes: list[str] = []
    try:
        with Image.open(path) as img:
            if img.size[0] * img.size[1] > MAX_MEGAPIXELS * 1e6:
                raise _too_large(path, img.size[0] * img.size[1])
            img.load()
            # exif_transpose returns a copy even when there is nothing to do: note only a real turn
            if img.getexif().get(0x0112, 1) in range(2, 9):
                notes.append("EXIF orientation applied")
            oriented = ImageOps.exif_transpose(img)
            return _pil_to_tensor(oriented, notes), notes
    except UnidentifiedImageError:
        raise InputError(f"{path} is not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError as exc:  # PIL refuses before we see the size
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(found.group(1)) if found else None) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path} could not be decoded, it may be truncated ({exc})") from None


def to_image_tensor(
    image: str | os.PathLike | Image.Image | torch.Tensor | np.ndarray,
) -> tuple[torch.Tensor, list[str]]:
    """Accept a path, a PIL image, a (3, H, W)/(1, 3, H, W) tensor or an (H, W, 3) array."""
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    if isinstance(image, Image.Image):
        notes: list[str] = []
        return _pil_to_tensor(ImageOps.exif_transpose(image), notes), notes
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(f"array images must be (H, W, 3), got {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image[..., :3])).permute(2, 0, 1)
    if isinstance(image, torch.Tensor):
        t = image.detach()
        if t.dim() == 4 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 3 or t.shape[0] != 3:
            raise InputError(f"tensor images must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
        if t.dtype == torch.uint8:
            return t.float().cpu() / 255.0, []
        t = t.float().cpu()
        if t.min() < 0 or t.max() > 1:
            raise InputError("float tensor images must hold values in [0, 1]")
        return t, []
    raise InputError(f"unsupported image type {type(image).__name__}: pass a path, PIL image or tensor")


def fit_size(image: torch.Tensor, size: int, min_side: int) -> torch.Tensor:
    """Downscale (3, H, W) so its short side is ``size`` (never upscale; 0 keeps it); check that
    both sides are at least ``min_side``."""
    h, w = image.shape[-2:]
    if size and min(h, w) > size:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        image = torch.nn.functional.interpolate(
            image[None], size=new, mode="bicubic", antialias=True, align_corners=False
        )[0].clamp(0, 1)
        h, w = new
    if min(h, w) < min_side:
        raise InputError(
            f"the image is {w}x{h} px; the generator needs at least {min_side} px on each side: "
            "use a larger image"
        )
    return image


def check_not_flat(image: torch.Tensor, what: str = "the image") -> torch.Tensor:
    """Refuse a (near-)constant image: nothing to edit, and the generator's batch normalisation has
    no variation to normalise (every step would be non-finite)."""
    spread = float((image.amax(dim=(-2, -1)) - image.amin(dim=(-2, -1))).max())
    if spread <= 2 / 255:
        raise InputError(f"{what} is a single flat colour (nothing to edit): use a photograph or a drawing")
    return image


def check_output_dir(out: str | os.PathLike) -> Path:
    """Fail early when ``out`` cannot become a writable folder. Creates nothing."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder: choose a folder path")
        if not os.access(out, os.W_OK | os.X_OK):
            raise InputError(f"--out {out} is not writable: choose another folder")
        return out
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"--out {out} cannot be created ({parent} is not a writable folder)")
    return out


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, C) uint8."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return arr.permute(1, 2, 0).cpu().numpy()


def save_png(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write (1|3|4, H, W) in [0, 1] as an L/RGB/RGBA PNG, whole or not at all."""
    arr = to_uint8(image)
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)  # L, RGB or RGBA
    with atomic_path(path) as tmp:
        pil.save(tmp, format="PNG")
    return Path(path)


def save_text(text: str, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def slug(text: str, limit: int = 40) -> str:
    """A folder-name form of ``text``: lower-case letters and digits joined by "-", at most ``limit``
    characters; a text without any is named by its hash."""
    name = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return name or "p" + hashlib.sha1(text.encode()).hexdigest()[:8]
