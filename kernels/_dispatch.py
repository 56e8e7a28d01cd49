"""Choosing between the Triton kernels and their torch references.

The choice is made from the tensors' device and two environment variables, never at import time:

- ``T2L_KERNELS=auto`` (default): Triton for CUDA tensors, and for CPU tensors when
  ``TRITON_INTERPRET=1`` was set before Python started; the torch reference otherwise.
- ``T2L_KERNELS=triton``: always Triton; raises :class:`KernelUnavailable` with the reasons when it
  cannot run.
- ``T2L_KERNELS=torch``: always the torch reference.

Eagerly the (cheap) check runs per call. Under ``torch.compile`` it runs once, when the region is
traced, and its result is baked into the graph as a constant (no guard): the implementation is fixed
for the life of a compiled region, i.e. for a run. To switch implementations inside one process
after compiling, call ``torch._dynamo.reset()``. The Triton paths are ``torch.library`` custom ops
(``torch.ops.t2l_fast.*``) with registered fake and autograd implementations, so a compiled region
that calls a fused op has no graph break.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

ENV_VAR = "T2L_KERNELS"
_CHOICES = ("auto", "triton", "torch")


class KernelUnavailable(RuntimeError):
    """Raised when Triton is forced but cannot run on the given tensors."""


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the installation
        return f"triton cannot be imported ({exc})"
    return None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_blockers(*tensors: torch.Tensor) -> list[str]:
    """Reasons why the Triton path cannot run on these tensors (empty list: it can)."""
    return _blockers(tuple(t.device.type for t in tensors))


def _blockers(device_types: tuple[str, ...]) -> list[str]:
    reasons = []
    err = _triton_import_error()
    if err:
        reasons.append(err)
    for kind in device_types:
        if kind == "cuda":
            continue
        if kind == "cpu" and interpreter_enabled():
            continue
        reasons.append(f"tensor on {kind} needs CUDA, or TRITON_INTERPRET=1 set before Python starts")
        break
    return reasons


_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("t2l_kernels", default=None)


@contextlib.contextmanager
def implementation(choice: str) -> Iterator[None]:
    """Within the block, use ``choice`` (auto, triton or torch) instead of ``T2L_KERNELS``."""
    if choice not in _CHOICES:
        raise ValueError(f"implementation {choice!r} is not one of {', '.join(_CHOICES)}")
    token = _override.set(choice)
    try:
        yield
    finally:
        _override.reset(token)


def mode() -> str:
    """The implementation choice in force: an ``implementation()`` block, else ``T2L_KERNELS``."""
    forced = _override.get()
    if forced is not None:
        return forced
    value = os.environ.get(ENV_VAR, "auto").strip().lower()
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={value!r} is not one of {', '.join(_CHOICES)}")
    return value


def _use_triton_on(device_types: tuple[str, ...]) -> bool:
    choice = mode()
    if choice == "torch":
        return False
    reasons = _blockers(device_types)
    if choice == "triton" and reasons:
        raise KernelUnavailable(f"{ENV_VAR}=triton but Triton cannot run: " + "; ".join(reasons))
    return not reasons


# Under torch.compile: evaluated once at trace time, the result a graph constant (see module docstring).
_use_triton_traced = torch.compiler.assume_constant_result(_use_triton_on)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton implementation should run for these input tensors."""
    device_types = tuple(t.device.type for t in tensors)
    if torch.compiler.is_compiling():
        return _use_triton_traced(device_types)
    return _use_triton_on(device_types)


_mode_traced = torch.compiler.assume_constant_result(mode)


def forced(choice: str) -> bool:
    """Whether the implementation in force is ``choice`` (a trace-time constant under torch.compile)."""
    return (_mode_traced() if torch.compiler.is_compiling() else mode()) == choice
