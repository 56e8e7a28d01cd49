"""The page's inputs and what it shows: uploaded images and zips checked and bounded, images for
display (transparency over a checkerboard), the loss table of the plot, durations."""

from __future__ import annotations

import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from ..config import preset
from ..io import InputError, to_uint8
from ..models.generator import min_side

SAMPLES_DIR = Path(__file__).parent.parent / "samples"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
TEST_MODEL_NOTE = "The CLIP model is `test-tiny`, a small random test model: results are NOT real edits."


@dataclass
class Limits:
    """Bounds on what a request may ask for."""

    max_upload_mb: int = 200  # any uploaded file (enforced by the page's server)
    max_megapixels: float = 25.0  # an image's width x height
    max_zip_files: int = 2000  # frames or masks in one zip
    max_zip_mb: int = 2000  # uncompressed size of one zip


def samples() -> dict[str, Path]:
    """The bundled sample images, by name (``chelsea``: a cat; ``coffee``: a cup of coffee)."""
    return {p.stem: p for p in sorted(SAMPLES_DIR.glob("*.jpg"))}


def checkerboard(rgba: torch.Tensor, cell: int = 12) -> Image.Image:
    """(4, H, W) RGBA in [0, 1] over a grey checkerboard -> RGB PIL image (to show transparency)."""
    _, h, w = rgba.shape
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    board = torch.where(((yy // cell + xx // cell) % 2) == 0, 0.8, 0.6).expand(3, h, w)
    alpha = rgba[3:].clamp(0, 1)
    return to_pil(alpha * rgba[:3] + (1 - alpha) * board)


def to_pil(image: torch.Tensor) -> Image.Image:
    """(1|3|4, H, W) float in [0, 1] -> PIL image (L, RGB or RGBA)."""
    arr = to_uint8(image)
    return Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)


def loss_table(history: list[tuple[int, dict[str, float]]]):
    """Per-step loss records -> a long table (step, value, term) for the page's line plot."""
    import pandas as pd

    rows = [(step + 1, float(value), term) for step, record in history for term, value in record.items()]
    table = pd.DataFrame(rows, columns=["step", "value", "term"])
    # typed even when empty: the plot takes the axes' kinds (numbers, not categories) from the dtypes
    return table.astype({"step": "int64", "value": "float64", "term": "str"})


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return (
        f"{seconds // 60}:{seconds % 60:02d}"
        if seconds < 3600
        else f"{seconds // 3600}h{seconds // 60 % 60:02d}"
    )


def check_image_file(path: str | os.PathLike | None, limits: Limits) -> Path:
    """An uploaded file that is an image PIL can open, of at most ``limits.max_megapixels`` and at
    least the generator's smallest side (of the image preset) on each side."""
    if not path:
        raise InputError("upload an image or pick a sample first")
    path = Path(path)
    name = path.name
    try:
        with Image.open(path) as im:  # reads the header only: a huge image is refused before decoding
            w, h = im.size
    except Image.DecompressionBombError as exc:  # PIL refuses before we see the size: it says the pixels
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f" ({int(found.group(1)) / 1e6:.0f} MP)" if found else ""
        raise InputError(
            f"{name} is too large{size}: the page accepts images of up to {limits.max_megapixels:g} MP, "
            "downscale it first"
        ) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InputError(f"{name} is not an image file (upload a PNG, JPEG or WebP image)") from None
    if w * h > limits.max_megapixels * 1e6:
        raise InputError(
            f"{name} is {w}x{h} ({w * h / 1e6:.0f} MP): the page accepts images of up to "
            f"{limits.max_megapixels:g} MP, downscale it first"
        )
    smallest = min_side(preset("image").generator.scales)
    if min(w, h) < smallest:
        raise InputError(
            f"{name} is {w}x{h} px; the generator needs at least {smallest} px on each side: "
            "use a larger image"
        )
    return path


def extract_images(archive: str | os.PathLike, dest: Path, what: str, limits: Limits) -> Path:
    """Extract the PNG/JPEG members of a zip (any folder depth, by file name) into ``dest``.

    Members are written under their base name only (nothing escapes ``dest``), and the archive is
    refused when it holds more than ``limits.max_zip_files`` images or expands past ``max_zip_mb``.
    """
    archive = Path(archive)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [
                m
                for m in zf.infolist()
                if not m.is_dir()
                and Path(m.filename).suffix.lower() in FRAME_SUFFIXES
                and not Path(m.filename).name.startswith(".")
                and "__MACOSX" not in m.filename
            ]
            if not members:
                raise InputError(f"the {what} zip {archive.name} holds no PNG or JPEG images")
            if len(members) > limits.max_zip_files:
                raise InputError(
                    f"the {what} zip holds {len(members)} images; the page accepts {limits.max_zip_files}"
                )
            if sum(m.file_size for m in members) > limits.max_zip_mb * 2**20:
                raise InputError(f"the {what} zip expands past {limits.max_zip_mb} MB")
            names = [Path(m.filename).name for m in members]
            if len(set(names)) != len(names):
                raise InputError(f"the {what} zip holds two images of the same name in different folders")
            dest.mkdir(parents=True, exist_ok=True)
            for m, name in zip(members, names, strict=True):
                with zf.open(m) as src, open(dest / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise InputError(f"{archive.name} is not a zip file") from None
    return dest


def zip_folder(folder: Path) -> Path:
    """``folder`` -> ``folder.zip`` beside it (the folder's files at the archive's top level)."""
    return Path(shutil.make_archive(str(folder), "zip", root_dir=folder))
