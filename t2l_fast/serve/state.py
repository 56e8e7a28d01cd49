"""The state of the ``t2l-fast serve`` server that every tab's handlers share (:class:`AppState`)."""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..config import Config, preset
from ..io import InputError
from ..models.clip import Clip
from ..request import build_config, edit_config
from .inputs import Limits, extract_images
from .worker import Event, run_in_thread


class AppState:
    """The server's state: the CLIP loaded once, the device, a work folder for outputs, and the
    cancel switch of each page session's run; and the page's fields made into a run's config through
    the request path (:mod:`t2l_fast.request`).

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

    def _events(self, session: str, work) -> Iterator[Event]:
        """The events of ``work(emit, check)`` run in a thread as ``session``'s current run (a Stop
        cancels it); an "error" event is raised as an :class:`InputError`."""
        cancel = self._begin(session)
        try:
            for event in run_in_thread(work, cancel):
                if event.kind == "error":
                    raise InputError(event.payload)
                yield event
        finally:
            self._end(session, cancel)

    def _job_dir(self, kind: str) -> Path:
        folder = self.workdir / f"{kind}-{next(self._counter):04d}-{time.strftime('%H%M%S')}"
        folder.mkdir(parents=True)
        return folder

    def video_source(self, upload: str | os.PathLike | None, dest: Path) -> Path:
        """An uploaded video file, or a zip of frames (extracted into ``dest``)."""
        from ..video_io import VIDEO_EXTENSIONS

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

    @property
    def is_test_model(self) -> bool:
        return bool(self.clip.is_test_model)

    def _config(
        self,
        preset_name: str,
        prompt: str,
        screen_prompt: str,
        roi_prompt: str,
        advanced: dict[str, float] | None,
        more: str,
        **options: Any,
    ) -> Config:
        """A run's config from the page's fields: the preset, the Advanced panel and the "more
        settings" lines (``key=value``) under the prompts and ``options`` (None: not given), checked
        as every request is (empty optional prompts are left out; the server's CLIP is used)."""
        overrides = [f"{key}={value}" for key, value in (advanced or {}).items() if value is not None]
        lines = [line.strip() for line in (more or "").splitlines()]
        overrides += [line for line in lines if line and not line.startswith("#")]
        for line in overrides:
            if "=" not in line:
                raise InputError(f"more settings: {line!r} is not key=value (e.g. loss.lambda_screen=2)")
        base = build_config(None, overrides, preset(preset_name))
        base.clip = self.clip.name
        base.clip_weights = None  # the server's CLIP is given to the editors, never loaded per run
        return edit_config(
            None,
            preset_name == "video",
            base,
            name=field_name,
            require_atlas=False,  # the page asks for the atlas when the edit starts
            prompt=(prompt or "").strip(),
            screen_prompt=(screen_prompt or "").strip() or None,
            roi_prompt=(roi_prompt or "").strip() or None,
            **options,
        )


def field_name(option: str) -> str:
    """An option as the page names it in an error."""
    return {"size": "the fit size", "preview_every": "preview every N steps"}.get(option, option)
