"""What the web page of ``t2l-fast serve`` does, without the page: input checks, runs in a worker thread
with progress, cancelling, and the outputs (images, videos, a zip of the output folder).

Nothing here imports Gradio (the page is :mod:`t2l_fast.serve_page`), so the handlers are tested as
plain Python. Bad input raises :class:`~t2l_fast.io.InputError` with one readable line; the page shows
it. A run (image edit, atlas fit, video edit) is a generator of updates: dicts from output names
(``status``, ``preview``, ``losses``, ``composite``, ``download``, ...) to new values.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import re
import shutil
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from .config import Config, parse_overrides, preset
from .io import InputError, to_uint8
from .losses import prompt_warnings
from .models.clip import Clip
from .models.generator import min_side
from .pipeline.image import ImageEditor

log = logging.getLogger(__name__)

SAMPLES_DIR = Path(__file__).parent / "samples"
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


# ---------------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------------
# Runs in a worker thread
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Event:
    kind: str  # step | preview | done | error
    payload: object = None


def _run_in_thread(
    work: Callable[[Callable[[str, object], None], Callable[[], None]], object], cancel: threading.Event
) -> Iterator[_Event]:
    """Run ``work(emit, check)`` in a thread and yield its events as they come; ends with ``done``
    (payload: work's return value) or ``error`` (payload: a one-line message).

    ``check()`` raises KeyboardInterrupt once ``cancel`` is set. If the consumer stops early (the page
    was closed), the run is cancelled and waited for: never two runs at once on the device.
    """
    events: queue.Queue[_Event] = queue.Queue()

    def check() -> None:
        if cancel.is_set():
            raise KeyboardInterrupt

    def target() -> None:
        try:
            events.put(_Event("done", work(lambda kind, payload: events.put(_Event(kind, payload)), check)))
        except InputError as exc:
            events.put(_Event("error", str(exc)))
        except KeyboardInterrupt:
            events.put(_Event("error", "cancelled before training started"))
        except Exception as exc:  # the server keeps serving: report one line, log the traceback
            log.exception("run failed")
            events.put(_Event("error", f"the run failed: {type(exc).__name__}: {exc}"))

    thread = threading.Thread(target=target, name="t2l-run", daemon=True)
    thread.start()
    try:
        while True:
            event = events.get()
            yield event
            if event.kind in ("done", "error"):
                return
    finally:
        cancel.set()
        thread.join()


class Progress:
    """Step count, time left and the loss history of a training run."""

    def __init__(self, total: int, what: str, notes: list[str] | None = None):
        self.total, self.what = total, what
        self.notes = "".join(f"\n\nnote: {n}" for n in notes or [])  # under every status
        self.history: list[tuple[int, dict[str, float]]] = []
        self.start = time.perf_counter()
        self.first_step_at: float | None = None

    def step(self, step: int, record: dict[str, float] | None = None) -> None:
        now = time.perf_counter()
        if self.first_step_at is None:
            self.first_step_at = now
        if record is not None:
            self.history.append((step, record))
        self.done = step + 1
        self.now = now

    def update(self, step: int, record: dict[str, float] | None = None) -> dict[str, object]:
        """Take a step; the page update: the status, and the loss plot when the step had a record."""
        self.step(step, record)
        if record is None:
            return {"status": self.status()}
        return {"status": self.status(), "losses": loss_table(self.history)}

    def status(self) -> str:
        return self._status() + self.notes

    def _status(self) -> str:
        if self.first_step_at is None:
            return f"{self.what}: starting ({self.total} steps)"
        done = self.done
        # time left from the steps after the first (the first includes warm-up)
        rate_steps = done - 1
        left = ""
        if rate_steps > 0:
            per_step = (self.now - self.first_step_at) / rate_steps
            left = f", about {format_seconds(per_step * (self.total - done))} left"
        return f"{self.what}: step {done} / {self.total}{left}"


# ---------------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------------
ADVANCED_KEYS = {  # the common config keys in the page's "Advanced" panel -> (label, image preset value)
    "data.size": "Max short side (px; 0 keeps the input)",
    "views.n_aug": "CLIP views per step",
    "loss.lambda_structure": "Structure weight",
    "loss.lambda_sparsity": "Sparsity weight",
    "optim.lr": "Learning rate",
}


def advanced_defaults(name: str = "image") -> dict[str, float]:
    cfg = preset(name)
    out = {}
    for key in ADVANCED_KEYS:
        section, field = key.split(".")
        out[key] = getattr(getattr(cfg, section), field)
    return out


class App:
    """The server's state: the CLIP loaded once, the device, a work folder for outputs, and the
    cancel switch of each page session's run.

    Runs are not serialised here: the page gives every run event one shared queue of concurrency 1.
    """

    def __init__(
        self,
        clip: Clip,
        device: str | torch.device = "cpu",
        workdir: str | os.PathLike = "t2l-serve",
        limits: Limits | None = None,
    ):
        self.clip = clip
        self.device = torch.device(device)
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    # -- sessions -----------------------------------------------------------------------------------
    def cancel(self, session: str) -> str:
        """Stop this session's run at its current step; the run still returns what it has."""
        with self._lock:
            event = self._cancels.get(session)
        if event is None or event.is_set():
            return "nothing to cancel: no run of yours is in progress"
        event.set()
        return "cancelling: the current result will be kept"

    def _begin(self, session: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._cancels[session] = event
        return event

    def _end(self, session: str, event: threading.Event) -> None:
        with self._lock:
            if self._cancels.get(session) is event:
                del self._cancels[session]

    def _events(self, session: str, work) -> Iterator[_Event]:
        """The events of ``work(emit, check)`` run in a thread as ``session``'s current run (a Stop
        cancels it); an "error" event is raised as an :class:`InputError`."""
        cancel = self._begin(session)
        try:
            for event in _run_in_thread(work, cancel):
                if event.kind == "error":
                    raise InputError(event.payload)
                yield event
        finally:
            self._end(session, cancel)

    def _job_dir(self, kind: str) -> Path:
        folder = self.workdir / f"{kind}-{next(self._counter):04d}-{time.strftime('%H%M%S')}"
        folder.mkdir(parents=True)
        return folder

    @property
    def is_test_model(self) -> bool:
        return bool(self.clip.is_test_model)

    # -- image tab ----------------------------------------------------------------------------------
    def load_image(self, path: str | os.PathLike | None) -> Image.Image:
        """Check an uploaded image; returns it (RGB, EXIF-rotated) for the page's source view."""
        from .io import read_image

        path = check_image_file(path, self.limits)
        image, _ = read_image(path)
        return to_pil(image)

    def image_config(
        self,
        prompt: str,
        screen_prompt: str = "",
        roi_prompt: str = "",
        steps: float | None = None,
        seed: float | None = None,
        preview_every: float | None = None,
        advanced: dict[str, float] | None = None,
        more: str = "",
        bootstrap: bool = False,
    ) -> Config:
        """The run's config from the page's fields (empty optional prompts are left out).
        ``bootstrap``: the relevancy bootstrap of the ROI prompt over all steps."""
        cfg = self._config(
            "image", prompt, screen_prompt, roi_prompt, steps, seed, advanced, more, preview_every
        )
        if bootstrap:
            if cfg.roi_prompt is None:
                raise InputError(
                    "the relevancy bootstrap needs the ROI prompt (the region to edit, e.g. 'cat')"
                )
            cfg.loss.bootstrap_steps = cfg.optim.steps
        return cfg.validate()

    def _config(
        self, name, prompt, screen_prompt, roi_prompt, steps, seed, advanced, more, preview_every=None
    ):
        if not (prompt or "").strip():
            raise InputError("enter a prompt: a description of the edited result, e.g. 'a golden cat'")
        cfg = preset(name)
        cfg.clip = self.clip.name
        cfg.prompt = prompt.strip()
        cfg.screen_prompt = (screen_prompt or "").strip() or None
        cfg.roi_prompt = (roi_prompt or "").strip() or None
        overrides = [f"{key}={value}" for key, value in (advanced or {}).items() if value is not None]
        lines = [line.strip() for line in (more or "").splitlines()]
        overrides += [line for line in lines if line and not line.startswith("#")]
        for line in overrides:
            if "=" not in line:
                raise InputError(f"more settings: {line!r} is not key=value (e.g. loss.lambda_screen=2)")
        parse_overrides(cfg, overrides)
        if steps is not None:
            if steps != int(steps) or int(steps) <= 0:
                raise InputError(f"steps must be a whole number > 0 (got {steps:g})")
            cfg.optim.steps = int(steps)
        if seed is not None:
            cfg.seed = int(seed)
        if preview_every is not None:
            if preview_every < 0:
                raise InputError("preview every N steps: N must be >= 0 (0: no preview)")
            cfg.preview_every = int(preview_every)
        cfg.clip_weights = None  # the server's CLIP is given to the editors, never loaded per run
        return cfg.validate()

    def edit_image(
        self,
        session: str,
        image_path: str | os.PathLike | None,
        cfg: Config,
    ) -> Iterator[dict[str, object]]:
        """Train on the image and yield page updates: status and loss plot every step, the preview
        (composite and edit layer) every ``cfg.preview_every`` steps, then the outputs and the zip."""
        path = check_image_file(image_path, self.limits)
        editor = _PreviewingImageEditor(cfg, device=self.device, clip=self.clip)
        run = editor.prepare(path)  # InputError (too small, ...) before the thread
        cfg, (h, w) = run.config, run.source.shape[-2:]
        notes = run.notes + prompt_warnings(self.clip, cfg)  # conversions, words CLIP does not read
        progress = Progress(cfg.optim.steps, f"editing {w}x{h}", notes)
        yield {"status": progress.status()}

        def work(emit, check):
            on_step = _step_reporter(cfg, emit, check)

            def on_preview(step, composite):
                emit("preview", (step, composite, editor.last_rgba))

            result = editor.train(run, on_step=on_step, on_preview=on_preview)
            out = self._job_dir("image")
            result.save(out)
            return result, out, zip_folder(out)

        for event in self._events(session, work):
            if event.kind == "step":
                yield progress.update(*event.payload)
            elif event.kind == "preview":
                _, composite, rgba = event.payload
                update = {"preview": to_pil(composite)}
                if rgba is not None:
                    update["preview_edit"] = checkerboard(rgba)
                yield update
            else:
                result, out, archive = event.payload
                edit_layer = checkerboard(result.edit_layer)
                yield {
                    "status": _finished(result, out, self.is_test_model) + progress.notes,
                    "losses": loss_table(list(enumerate(result.losses))),
                    "preview": to_pil(result.composite),
                    "preview_edit": edit_layer,
                    "composite": str(out / "composite.png"),
                    "edit_layer": edit_layer,
                    "alpha": str(out / "alpha.png"),
                    "greenscreen": str(out / "greenscreen.png"),
                    "download": str(archive),
                }

    # -- video tab ----------------------------------------------------------------------------------
    def video_source(self, upload: str | os.PathLike | None, dest: Path) -> Path:
        """An uploaded video file, or a zip of frames (extracted into ``dest``)."""
        from .video_io import VIDEO_EXTENSIONS

        if not upload:
            raise InputError("upload a video (mp4, mov, webm, mkv, avi) or a zip of frames first")
        upload = Path(upload)
        if upload.suffix.lower() == ".zip":
            return extract_images(upload, dest / "frames", "frames", self.limits)
        if upload.suffix.lower() not in VIDEO_EXTENSIONS:
            raise InputError(
                f"{upload.name} is not a video: upload an mp4, mov, webm, mkv or avi file, or a zip of frames"
            )
        return upload

    def first_frame(self, video: str | os.PathLike | None) -> str | None:
        """The uploaded video's first frame as given (a PNG path; None without a video), on which the
        object's box is drawn."""
        from .video_io import read_video

        if not video:
            return None
        out = self._job_dir("first-frame")
        frame, _ = read_video(self.video_source(video, out), max_frames=1, size=None)
        path = out / "first_frame.png"
        Image.fromarray(frame[0].permute(1, 2, 0).numpy()).save(path)
        return str(path)

    @staticmethod
    def draw_box(frame: str | None, x=None, y=None, w=None, h=None) -> Image.Image | None:
        """The first frame with the box (x, y, w, h; pixels of the video as given) drawn when given."""
        from PIL import ImageDraw

        if not frame:
            return None
        image = Image.open(frame).convert("RGB")
        if all(v is not None for v in (x, y, w, h)) and w > 0 and h > 0:
            width = max(2, round(max(image.size) / 300))
            ImageDraw.Draw(image).rectangle((x, y, x + w - 1, y + h - 1), outline=(255, 32, 32), width=width)
        return image

    #: How the object is marked for an atlas fit: a masks zip (or none), found from motion, a box.
    OBJECT_MODES = ("masks", "auto", "box")

    def fit_atlas(
        self,
        session: str,
        video: str | os.PathLike | None,
        masks: str | os.PathLike | None,
        iterations: float = 2000,
        size: str = "768x432",
        frames: float | None = None,
        find: str = "masks",
        box: tuple | None = None,
    ) -> Iterator[dict[str, object]]:
        """Fit a layered atlas to the uploaded video; yields progress, then the atlas (``atlas``: the
        file for the edit), its reconstruction video, atlas images and PSNR. The object: the masks
        zip (``find="masks"``; none: background only), found from its motion (``"auto"``) or from
        ``box`` (x, y, w, h) on the first frame (``"box"``); those two yield ``masks_video`` (the
        masks over the frames) before the fit starts."""
        from .fit import (
            FitConfig,
            NoMovingObject,
            compute_flow,
            find_masks,
            fit_atlas,
            read_masks,
            write_masks,
        )
        from .fit.segment import scale_box
        from .video_io import parse_size, read_video

        if find not in self.OBJECT_MODES:
            raise InputError(
                f"unknown way to mark the object {find!r}: one of {', '.join(self.OBJECT_MODES)}"
            )
        if find != "masks" and masks:
            raise InputError(
                "a masks zip and finding the object are alternatives: remove the masks zip, or choose "
                "'masks zip'"
            )
        if find == "box" and (box is None or len(box) != 4 or any(v is None for v in box)):
            raise InputError("give the object's box on the first frame: X, Y, W and H in pixels")
        out = self._job_dir("atlas")
        source = self.video_source(video, out)
        if iterations is None or iterations != int(iterations) or int(iterations) < 1:
            raise InputError(f"iterations must be a whole number >= 1 (got {iterations})")
        n = int(frames) if frames else None
        if n is not None and n < 3:
            raise InputError(f"frames must be at least 3 (got {n})")
        wh = parse_size(size, "the fit size")
        if find == "box":  # checked in the first frame as given, before the whole video is read
            native, _ = read_video(source, max_frames=1, size=None)
            box = scale_box(tuple(float(v) for v in box), (native.shape[3], native.shape[2]), wh)
        video_frames, fps = read_video(source, max_frames=n, size=wh)
        t = video_frames.shape[0]
        if t < 3:
            raise InputError(f"the video has {t} frame(s); fitting an atlas needs at least 3")
        mask_tensor = None
        if masks:
            folder = extract_images(masks, out / "masks", "masks", self.limits)
            native, _ = read_video(source, max_frames=1, size=None)
            mask_tensor = read_masks(
                folder, t, wh, (native.shape[3], native.shape[2]), frames_truncated=n is not None and t == n
            )
        cfg = FitConfig(iterations=int(iterations))
        progress = Progress(cfg.iterations, f"fitting the atlas to {t} frames of {wh[0]}x{wh[1]}")
        if find == "auto":
            note = "\n\nfinding the moving object first ..."
        elif find == "box":
            note = "\n\nsegmenting the object in the box and following it first ..."
        else:
            note = "" if mask_tensor is not None else "\n\nnote: no masks: a background-only atlas"
        yield {"status": progress.status() + note}
        found = {"masks": mask_tensor}  # the masks the fit uses (set in the run's thread)

        def work(emit, check):
            def on_step(iteration, psnr):
                emit("step", (iteration - 1, {"psnr": psnr}))
                check()

            flow = None
            if find != "masks":  # the flow is computed once: for the masks, then for the fit
                flow = compute_flow(video_frames, cfg.flow_preset)
                check()
                try:
                    found["masks"] = find_masks(video_frames, box if find == "box" else None, flow=flow)
                except NoMovingObject as exc:
                    emit("masks", (None, f"note: {exc}; fitting a background-only atlas"))
                else:
                    _, mask_video = write_masks(out, video_frames, found["masks"], fps)
                    emit("masks", (str(mask_video), "the object's masks: see the masks video"))
                check()
            how = bool(masks) if find == "masks" else find  # True/False: a masks zip or none
            source_info = {"video": Path(str(video)).name, "masks": how, "fps": fps}
            fitted = fit_atlas(
                video_frames,
                found["masks"],
                cfg,
                device=self.device,
                progress=False,
                on_step=on_step,
                meta={"source": source_info},
                flow=flow,
            )
            fitted.save(out, fps, info={"source": source_info, "size": list(wh)})  # as t2l-fast atlas
            return fitted

        for event in self._events(session, work):
            if event.kind == "masks":
                mask_video, message = event.payload
                note = f"\n\n{message}"
                yield {"status": progress.status() + note, "masks_video": mask_video}
            elif event.kind == "step":
                progress.step(*event.payload)
                yield {"status": progress.status() + f" (PSNR {event.payload[1]['psnr']:.1f} dB)" + note}
            elif event.kind == "done":
                stats = event.payload.stats
                text = (
                    f"atlas fitted: {stats.iterations} iterations, "
                    f"reconstruction PSNR {stats.psnr:.2f} dB"
                    + (" (cancelled early)" if stats.interrupted else "")
                    + ("" if found["masks"] is not None else "; background only (no masks)")
                )
                yield {
                    "status": text,
                    "atlas": str(out / "atlas.safetensors"),
                    "frames": n,
                    "reconstruction": str(out / "reconstruction.mp4"),
                    "background_atlas": str(out / "background_atlas.png"),
                    "foreground_atlas": str(out / "foreground_atlas.png"),
                }

    def video_config(
        self,
        prompt: str,
        screen_prompt: str = "",
        roi_prompt: str = "",
        layer: str = "background",
        steps: float | None = None,
        seed: float | None = None,
        more: str = "",
    ) -> Config:
        cfg = self._config("video", prompt, screen_prompt, roi_prompt, steps, seed, None, more)
        if layer not in ("background", "foreground"):
            raise InputError(f"layer must be background or foreground (got {layer!r})")
        cfg.video.layer = layer
        return cfg

    def edit_video(
        self,
        session: str,
        video: str | os.PathLike | None,
        atlas: str | os.PathLike | None,
        cfg: Config,
        frames: int | None = None,
    ) -> Iterator[dict[str, object]]:
        """Edit a layer of the video through its atlas (fitted on the page, or an uploaded atlas file);
        yields progress, then the edited MP4, the green-screen MP4, the atlas edit and the zip."""
        from .models.atlas import AtlasData
        from .pipeline.video import VideoEditor

        if not atlas:
            raise InputError("fit an atlas first (step 1), or upload an atlas file (atlas.safetensors)")
        out = self._job_dir("video")
        source = self.video_source(video, out)
        atlas = Path(atlas)
        cfg.video.atlas = str(atlas)
        data = None  # loaded here only for the foreground check; prepare then takes it as it is
        if cfg.video.layer == "foreground" and atlas.suffix == ".safetensors":
            data = AtlasData.load(atlas)
            if data.meta.get("has_foreground") is False or data.foreground_is_empty(cfg.video.mask_threshold):
                raise InputError(
                    "a foreground edit needs the object's masks: upload a masks zip and fit the atlas "
                    "again, or edit the background"
                )
        if frames:
            cfg.video.frames = int(frames)
        editor = VideoEditor(cfg, device=self.device, clip=self.clip)
        run = editor.prepare(source, atlas=data if data is not None else atlas)
        cfg, (t, _, h, w) = run.config, run.frames.shape
        progress = Progress(
            cfg.optim.steps,
            f"editing the {cfg.video.layer} of {t} frames of {w}x{h}",
            prompt_warnings(self.clip, cfg),
        )
        yield {"status": progress.status()}

        def work(emit, check):
            result = editor.train(run, on_step=_step_reporter(cfg, emit, check))
            out_dir = out / "edit"
            result.save(out_dir)
            return result, out_dir, zip_folder(out_dir)

        for event in self._events(session, work):
            if event.kind == "step":
                yield progress.update(*event.payload)
            elif event.kind == "done":
                result, out_dir, archive = event.payload
                yield {
                    "status": _finished(result, out_dir, self.is_test_model) + progress.notes,
                    "losses": loss_table(list(enumerate(result.losses))),
                    "edited": str(out_dir / "edited.mp4"),
                    "greenscreen": str(out_dir / "greenscreen.mp4"),
                    "atlas_edit": checkerboard(result.atlas_edit),
                    "download": str(archive),
                }


def _step_reporter(cfg: Config, emit, check):
    """The editors' ``on_step``: reports every step, with its loss record only on the steps where the
    training loop has read the records back anyway (every ``runtime.log_every`` steps: reading one
    in between would cost a device sync), then stops the run if it was cancelled."""
    every = cfg.runtime.read_every

    def on_step(step: int, record) -> None:
        emit("step", (step, dict(record) if (step + 1) % every == 0 else None))
        check()

    return on_step


def _finished(result, out: Path, test_model: bool) -> str:
    steps = result.config.optim.steps
    text = (
        f"cancelled after {result.steps_done} of {steps} steps: this is the result so far"
        if result.interrupted
        else f"done: {result.steps_done} step" + ("" if result.steps_done == 1 else "s")
    )
    if result.losses:
        text += f", final loss {result.losses[-1]['loss']:.3f}"
    text += f" (saved in {out})"
    if test_model:
        text += "\n\n" + TEST_MODEL_NOTE
    return text


class _PreviewingImageEditor(ImageEditor):
    """The image editor, remembering the edit layer of its last render: the training loop's preview
    hook passes only the composite, and the page shows the edit layer too."""

    last_rgba: torch.Tensor | None = None

    def render(self, generator, source):
        composite, rgba, greenscreen = super().render(generator, source)
        self.last_rgba = rgba[0].detach().float().cpu()
        return composite, rgba, greenscreen


def free_port_error(host: str, port: int) -> str | None:
    """None when ``host:port`` can be bound, else one line saying why not."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
                return f"port {port} on {host} is already in use: stop the other server or pass --port N"
            return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None
