"""The editors' step-end callback: what a caller sees after each training step, and how it stops a run.

>>> def show(state: StepEnd) -> bool:                                   # doctest: +SKIP
...     if state.composite is not None:
...         save_png(state.composite, f"preview_{state.step + 1}.png")
...     return state.step >= 99                                       # stop after 100 steps
>>> editor(image, prompt="golden horse", callback=show, callback_inputs=("composite",))  # doctest: +SKIP

The callback is called once after every step with a :class:`StepEnd`. ``losses`` is lazy: reading it
reads that step's loss record back from the device (one sync), not reading it costs nothing. The
pictures the callback asked for (``callback_inputs``: ``"composite"``, ``"rgba"``) are rendered from
the whole input on the steps where ``(step + 1) % config.preview_every == 0`` and are None on the other
steps (and always for video edits, whose whole render is the result). Returning True, or setting
``state.stop``, ends the run after that step: the result holds the generator as it is then, with
``result.interrupted`` set (as Ctrl-C does).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

PICTURES = ("composite", "rgba")  # what a callback may ask for by name


@dataclass
class StepEnd:
    """One finished step, as a step-end callback sees it. ``composite`` (3, H, W) and ``rgba``
    (4, H, W: the edit layer's colour and opacity) are float32 in [0, 1] on the CPU."""

    step: int  # 0-based index of the step just done
    steps: int  # the run's number of steps
    losses: Mapping[str, float]  # {term: value} of this step, read from the device when looked at
    composite: torch.Tensor | None = None
    rgba: torch.Tensor | None = None
    stop: bool = False  # set it to end the run after this step
    variant: int = 0  # which of the variants trained together (0 for a lone edit)


StepCallback = Callable[[StepEnd], "bool | None"]


def check_inputs(callback_inputs) -> tuple[str, ...]:
    """The pictures asked for, checked by name (before any model loads)."""
    asked = tuple(callback_inputs or ())
    unknown = [name for name in asked if name not in PICTURES]
    if unknown:
        raise ValueError(f"callback_inputs {unknown} unknown: ask for some of {list(PICTURES)}")
    return asked


def step_end_hook(
    callback: StepCallback | None,
    steps: int,
    asked: tuple[str, ...] = (),
    every: int = 0,
    pictures: Callable[[int], dict[str, torch.Tensor]] | None = None,
    first: int = 0,
):
    """The training loop's per-step hook, ``hook(step, records) -> stop``, for ``callback``: one
    :class:`StepEnd` per record (per variant trained together; variant numbers from ``first``) with
    the pictures asked for (``pictures(k)`` renders generator k's, on every ``every``-th step only).
    None without a callback. A lone record (not in a list) is a group of one."""
    if callback is None:
        return None

    def hook(step: int, records) -> bool:
        if isinstance(records, Mapping):
            records = [records]
        stop = False
        for k, record in enumerate(records):
            state = StepEnd(step, steps, record, variant=first + k)
            if asked and pictures is not None and every and (step + 1) % every == 0:
                rendered = pictures(k)
                for name in asked:
                    setattr(state, name, rendered[name])
            stop = bool(callback(state)) or state.stop or stop
        return stop

    return hook
