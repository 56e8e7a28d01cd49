"""A run of the page (image edit, atlas fit, video edit) in a worker thread: its events as they come,
cancelling, and the progress shown (steps, time left, the loss history)."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..io import InputError
from .inputs import TEST_MODEL_NOTE, format_seconds, loss_table

log = logging.getLogger(__name__)


@dataclass
class Event:
    kind: str  # step | preview | done | error
    payload: object = None


def run_in_thread(
    work: Callable[[Callable[[str, object], None], Callable[[], None]], object], cancel: threading.Event
) -> Iterator[Event]:
    """Run ``work(emit, check)`` in a thread and yield its events as they come; ends with ``done``
    (payload: work's return value) or ``error`` (payload: a one-line message).

    ``check()`` raises KeyboardInterrupt once ``cancel`` is set. If the consumer stops early (the page
    was closed), the run is cancelled and waited for: never two runs at once on the device.
    """
    events: queue.Queue[Event] = queue.Queue()

    def check() -> None:
        if cancel.is_set():
            raise KeyboardInterrupt

    def target() -> None:
        try:
            events.put(Event("done", work(lambda kind, payload: events.put(Event(kind, payload)), check)))
        except InputError as exc:
            events.put(Event("error", str(exc)))
        except KeyboardInterrupt:
            events.put(Event("error", "cancelled before training started"))
        except Exception as exc:  # the server keeps serving: report one line, log the traceback
            log.exception("run failed")
            events.put(Event("error", f"the run failed: {type(exc).__name__}: {exc}"))

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


def step_reporter(cfg: Config, emit, check):
    """The editors' step-end callback: reports every step, with its loss record only on the steps
    where the training loop has read the records back anyway (every ``runtime.log_every`` steps:
    reading one in between would cost a device sync), and the preview pictures when the step has
    them; returns True (stop the run) once ``check()`` says the run was cancelled."""
    every = cfg.runtime.read_every

    def callback(state) -> bool:
        step = state.step
        emit("step", (step, dict(state.losses) if (step + 1) % every == 0 else None))
        if state.composite is not None:
            emit("preview", (step, state.composite, state.rgba))
        return cancelled(check)

    return callback


def cancelled(check) -> bool:
    """Whether the run was cancelled: ``check()`` (of :func:`run_in_thread`) raises then."""
    try:
        check()
    except KeyboardInterrupt:
        return True
    return False


def finished(result, out: Path, test_model: bool) -> str:
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
