"""How a training loop executes: fast path or reference mode, precision, compile, NaN guard.

The image and video editors share this; it knows nothing of where the crops come from.

- ``reference``: eager, fp32, the torch references of the fused ops, each loss and example fed to
  CLIP on its own — the baseline that stands for the original method's cost.
- ``fast``: every view of a step in as few CLIP calls as possible, source-side results reused,
  bucketed examples, three regions compiled with dynamic shapes (generator, training crop,
  objective: see :meth:`Engine.compiled`), bf16 autocast for generator and CLIP with fp32 master
  weights and fp32 elsewhere, the Triton kernels, no host sync inside a step.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import os
import queue
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..config import RuntimeConfig
from ..kernels import implementation
from ..optim import FusedMADGRAD, StackedMADGRAD

log = logging.getLogger(__name__)

INDUCTOR_CACHE_DIR = Path.home() / ".cache" / "t2l_fast" / "inductor"  # compiled code kept across runs
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Engine:
    """Resolved execution settings for one run on one device."""

    def __init__(self, runtime: RuntimeConfig, device: torch.device, dtype: torch.dtype | None = None):
        self.device = device
        cuda = device.type == "cuda"
        self.fast = runtime.mode == "fast" or (runtime.mode == "auto" and cuda)
        if dtype is not None:
            self.amp_dtype = None if dtype == torch.float32 else dtype
        elif runtime.precision == "auto":
            self.amp_dtype = torch.bfloat16 if (self.fast and cuda) else None
        else:
            self.amp_dtype = _DTYPES[runtime.precision]
        if not self.fast and self.amp_dtype is not None:
            log.info("reference mode runs in fp32: precision %s ignored", runtime.precision)
            self.amp_dtype = None
        self.compile = self.fast and (runtime.compile == "on" or (runtime.compile == "auto" and cuda))
        self.cudagraphs = self.compile and cuda and runtime.cudagraphs
        # a capturable step: gradients keep their memory (zeroed in place, not freed)
        self.static_grads = self.cudagraphs
        self.prefetch = runtime.prefetch
        self.bucket = runtime.bucket if self.fast else 1
        self.attention = runtime.attention
        self.backend = runtime.compile_backend
        self.log_every = runtime.read_every
        self.nonfinite_steps = 0  # counted at each flush (every log_every steps and at the end)
        self._consecutive_bad = 0
        self._pending: list[torch.Tensor] = []  # "applied" flags not yet read back
        if self.compile:
            # sizes that happen to be equal in the first step (a square crop) must not become one
            # symbol: a later non-square crop would recompile the region
            torch.fx.experimental._config.use_duck_shape = False
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(INDUCTOR_CACHE_DIR))
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
            os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")

    @property
    def mode(self) -> str:
        return "fast" if self.fast else "reference"

    def describe(self) -> str:
        precision = "fp32" if self.amp_dtype is None else str(self.amp_dtype).replace("torch.", "")
        return f"{self.mode} mode, {precision}, compile {'on' if self.compile else 'off'}"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # CUDA graph capture does not allow autocast's weight-cast cache
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not self.cudagraphs)

    def kernels(self):
        """Reference mode forces the torch references of the fused ops; the fast path dispatches
        (Triton on CUDA; ``T2L_KERNELS`` still decides when set)."""
        return contextlib.nullcontext() if self.fast else implementation("torch")

    def compiled(self, fn):
        """``torch.compile(fn)`` on the fast path, else ``fn`` itself.

        The compile plan, decided before step 0: every region is compiled with dynamic shapes from
        its first call (``dynamic=True``), so the crops' and views' changing sizes reuse one graph
        instead of a static graph, a recompile to dynamic, and one per size class. The regions: the
        generator, the training crop, and the objective (views, CLIP, losses); their graph count is
        tested at the real sizes (tests/test_compile_plan.py)."""
        if not self.compile:
            return fn
        mode = "reduce-overhead" if self.cudagraphs and self.backend == "inductor" else None
        return _with_eager_fallback(torch.compile(fn, dynamic=True, backend=self.backend, mode=mode), fn)

    @staticmethod
    def backward(loss: torch.Tensor) -> torch.Tensor:
        """Accumulate the gradient of ``loss`` and return whether it is finite, as a 0-dim bool
        tensor on the device (no host sync). A non-finite loss is replaced by 0 before the backward
        pass, so zero flows back from it (the other examples' gradient stays clean unless the loss's
        own derivatives are non-finite); the step it belongs to must then be skipped (:meth:`update`
        with this flag), which also discards whatever the backward pass produced."""
        finite = torch.isfinite(loss.detach())
        torch.where(finite, loss, torch.zeros_like(loss)).backward()
        return finite

    @staticmethod
    def backward_group(losses: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`backward` for the losses of N generators trained together, in one backward pass:
        a non-finite loss contributes zero, so it spoils only its own generator's step. Returns the
        (N,) bool flags on the device."""
        if len(losses) == 1:
            return Engine.backward(losses[0]).reshape(1)
        finite = torch.stack([torch.isfinite(loss.detach()) for loss in losses])
        kept = [
            torch.where(ok, loss, torch.zeros_like(loss)) for ok, loss in zip(finite, losses, strict=True)
        ]
        functools.reduce(operator.add, kept).backward()
        return finite

    def update(self, optimizer: torch.optim.Optimizer, finite: torch.Tensor | bool = True) -> torch.Tensor:
        """Apply the accumulated gradient unless a loss (``finite`` false) or the gradient is not
        finite; clear the gradient either way. Returns the bool "applied" flag on the device: 0-dim,
        or one per model of a :class:`~t2l_fast.optim.StackedMADGRAD` (``finite`` one per model too).

        With :class:`~t2l_fast.optim.FusedMADGRAD` the decision stays on the device (``step(skip=)``);
        any other optimizer needs the flag on the host (one sync). The flags are read back in bulk
        by :meth:`flush`, which counts skipped steps and falls back to fp32 after three in a row."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = params[0].device
        if isinstance(finite, torch.Tensor):
            finite_t = finite.to(device)
        else:  # made on the device, not copied from the host
            finite_t = torch.full((), bool(finite), dtype=torch.bool, device=device)
        if isinstance(optimizer, FusedMADGRAD):  # it also skips a non-finite gradient by itself
            applied = optimizer.step(skip=~finite_t)
        else:
            grads = [p.grad for p in params if p.grad is not None]
            ok = finite_t
            if grads:
                ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads))
            applied = ok.clone()
            if bool(ok):  # host sync: only optimizers without a device-side skip
                optimizer.step()
        optimizer.zero_grad(set_to_none=not self.static_grads)
        self._pending.append(applied)
        return applied

    def flush(self) -> list[bool]:
        """Read the "applied" flags of the steps since the last flush (one sync), count the skipped
        steps, warn, and after three non-finite steps in a row under reduced precision switch the
        rest of the run to fp32. Returns the flags read."""
        if not self._pending:
            return []
        flags = [bool(f) for f in torch.cat([f.reshape(-1) for f in self._pending]).tolist()]
        self._pending.clear()
        for applied in flags:
            if applied:
                self._consecutive_bad = 0
                continue
            self.nonfinite_steps += 1
            self._consecutive_bad += 1
            log.warning("non-finite loss or gradient: step skipped (%d so far)", self.nonfinite_steps)
            if self._consecutive_bad >= 3 and self.amp_dtype is not None:
                log.warning("falling back to fp32 after %d non-finite steps in a row", self._consecutive_bad)
                self.amp_dtype = None
        return flags


def _with_eager_fallback(compiled, fn):
    """``compiled``, or ``fn`` itself from the first call whose compilation fails: one warning, the
    run goes on eagerly (a compile problem on a new device or version must not end an edit). An
    error of the code itself then surfaces from the eager call."""
    current = [compiled]
    name = getattr(fn, "__qualname__", type(fn).__name__)

    def call(*args, **kwargs):
        try:
            return current[0](*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            if current[0] is fn:
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            log.warning("torch.compile of %s failed (%s): running it eagerly", name, first)
            current[0] = fn
            return fn(*args, **kwargs)

    return call


class RecordBuffer:
    """A device buffer the steps' loss terms are written into, in order, until the next read-back:
    one ``stack`` into a slice per example, no allocation per step, nothing that points into a
    compiled region's (CUDA graph's) output memory. A full buffer is replaced by a fresh one (the
    records written so far keep theirs), so nothing is overwritten before it is read."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._buf: torch.Tensor | None = None
        self._pos = 0

    def write(self, values: list[torch.Tensor]) -> torch.Tensor:
        """The fp32 values (0-dim tensors on one device), stacked into the buffer: their slice."""
        n, device = len(values), values[0].device
        if self._buf is None or self._buf.device != device or self._pos + n > len(self._buf):
            self._buf = torch.empty(max(self.capacity, n), device=device)
            self._pos = 0
        out = self._buf[self._pos : self._pos + n]
        torch.stack([v.detach().float().reshape(()) for v in values], out=out)
        self._pos += n
        return out


class StepRecord(Mapping):
    """One step's loss record, {term: float}, read from the device only when first looked at.

    Holds the (unweighted) fp32 term values of each example, as a slice of a :class:`RecordBuffer`,
    with its weight; the floats are ``sum over examples of weight * value`` in Python double, in
    example order (as before)."""

    def __init__(self, buffer: RecordBuffer | None = None):
        self._buffer = buffer or RecordBuffer(capacity=16)
        self._parts: list[tuple[tuple[str, ...], torch.Tensor, float]] = []
        self._values: dict[str, float] | None = None

    def add(self, terms: dict[str, torch.Tensor], weight: float) -> None:
        self._parts.append((tuple(terms), self._buffer.write(list(terms.values())), weight))

    def tensors(self) -> list[torch.Tensor]:
        return [t for _, t, _ in self._parts]

    def resolve(self, values: list[list[float]]) -> dict[str, float]:
        """Build the floats from the host copies of :meth:`tensors` (same order)."""
        record: dict[str, float] = {}
        for (keys, _, weight), vals in zip(self._parts, values, strict=True):
            for k, v in zip(keys, vals, strict=True):
                record[k] = record.get(k, 0.0) + weight * v
        self._values = record
        self._parts = []
        return record

    def _resolved(self) -> dict[str, float]:
        if self._values is None:
            resolve_records([self])
        return self._values  # type: ignore[return-value]

    def __getitem__(self, key: str) -> float:
        return self._resolved()[key]

    def __iter__(self):
        return iter(self._resolved())

    def __len__(self) -> int:
        return len(self._resolved())

    def __repr__(self) -> str:
        return repr(self._resolved())


def resolve_records(records: list[StepRecord]) -> list[dict[str, float]]:
    """The floats of many step records with one device-to-host copy."""
    todo = [r for r in records if r._values is None]
    tensors = [t for r in todo for t in r.tensors()]
    if tensors:
        flat = torch.cat(tensors).tolist()  # the one sync
        pos = 0
        for r in todo:
            values = []
            for t in r.tensors():
                values.append(flat[pos : pos + t.numel()])
                pos += t.numel()
            r.resolve(values)
    return [dict(r._values) for r in records]  # type: ignore[arg-type]


class Prefetcher:
    """The plans of the steps (``plan_of_step(step, gen)``: host draws only), made ahead on a
    thread, ``depth`` at most, and handed out in step order. One thread draws from ``gen`` in the
    same order as the loop would: the numbers are those of drawing inline."""

    def __init__(self, plan_of_step, steps: int, gen: torch.Generator, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(plan_of_step, steps, gen), name="t2l-fast-prefetch", daemon=True
        )
        self._thread.start()

    def _work(self, plan_of_step, steps: int, gen: torch.Generator) -> None:
        for step in range(steps):
            item: tuple[object, Exception | None]
            try:
                item = (plan_of_step(step, gen), None)
            except Exception as exc:  # handed to the loop, raised there
                item = (None, exc)
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.05)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or item[1] is not None:
                return

    def __next__(self):
        plan, exc = self._queue.get()
        if exc is not None:
            raise exc
        return plan

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def _plans(plan_of_step, steps: int, gen: torch.Generator, prefetch: bool):
    """The steps' plans: drawn ahead on a thread (``prefetch``) or as each step starts."""
    if prefetch:
        return Prefetcher(plan_of_step, steps, gen)
    return (plan_of_step(step, gen) for step in range(steps))


def optimise(
    engine: Engine,
    generator: torch.nn.Module,
    objective,
    examples_of_step,
    optim_cfg,
    seed: int,
    *,
    plan_of_step=None,
    on_step=None,
    progress: bool = False,
    desc: str = "editing",
) -> tuple[list[dict[str, float]], bool]:
    """The training loop of one generator: :func:`optimise_group` with a group of one.

    ``examples_of_step(step, gen)`` yields the step's examples as (Layers, cache_key, weight)
    tuples, and ``on_step(step, record)`` sees one record; otherwise as :func:`optimise_group`.
    Returns (per-step loss records as dicts of floats, interrupted)."""

    def group_examples(step: int, plan):
        for layers, key, weight, *drawn in examples_of_step(step, plan):
            yield [layers], key, weight, drawn[0] if drawn else None

    def group_objective(layers, step, gen, **kwargs):
        return [objective(layers[0], step, gen, **kwargs)]

    hook = None if on_step is None else (lambda step, records: on_step(step, records[0]))
    histories, interrupted = optimise_group(
        engine,
        [generator],
        group_objective,
        group_examples,
        optim_cfg,
        seed,
        plan_of_step=plan_of_step,
        on_step=hook,
        progress=progress,
        desc=desc,
    )
    return histories[0], interrupted


def optimise_group(
    engine: Engine,
    generators: Sequence[torch.nn.Module],
    objective,
    examples_of_step,
    optim_cfg,
    seed: int,
    *,
    plan_of_step=None,
    on_step=None,
    progress: bool = False,
    desc: str = "editing",
) -> tuple[list[list[dict[str, float]]], bool]:
    """The training loop both editors share, for N generators trained together on one draw stream
    (prompt or seed variants; a lone edit is a group of one). ``seed`` seeds the draws (crops, views).

    ``examples_of_step(step, gen)`` yields (layers, cache_key, weight, draw), ``layers`` one per
    generator and ``draw`` the objective's random choices for the example, made ahead (None: the
    objective draws from ``gen``); it runs the generators lazily. With ``plan_of_step(step, gen)``
    (host draws only) the examples are ``examples_of_step(step, plan)``, the plans drawn ahead on a
    thread when ``engine.prefetch`` (:class:`Prefetcher`: the same numbers). ``objective(layers,
    step, gen, cache_key=, draw=)`` returns each generator's terms (a group's
    :class:`~t2l_fast.objective.Objective`: the source side once); generator k's loss is the
    weighted sum of its terms, back-propagated per example (one pass for the group; the gradient
    of the summed loss). One :class:`~t2l_fast.optim.StackedMADGRAD` step updates every generator
    (each its own state and ``optim_cfg``'s schedule, advanced by its own applied updates: a
    non-finite variant skips alone); the NaN guard decides on the device. No host sync inside a
    step: records and flags are read back every ``engine.log_every`` steps and at the end.
    ``on_step(step, records)`` (lazy records, one per generator) ends the run after that step by
    returning True (:mod:`.callbacks`); Ctrl-C too.
    Returns (per generator, per-step loss records as dicts of floats; interrupted).
    """
    from tqdm.auto import tqdm

    log_every, n = engine.log_every, len(generators)
    gen = torch.Generator().manual_seed(seed)
    opt = _optimiser(generators, optim_cfg)
    records: list[list[StepRecord]] = []  # per step, one per generator
    buffer = RecordBuffer()
    flushed = 0
    interrupted = False
    log.info("training: %s%s", engine.describe(), f", {n} variants together" if n > 1 else "")
    bar = tqdm(total=optim_cfg.steps, disable=not progress, desc=desc, unit="step", dynamic_ncols=True)

    def flush() -> None:
        nonlocal flushed
        values = resolve_records([r for step in records[flushed:] for r in step])
        engine.flush()
        if values and n == 1:
            bar.set_postfix({k: f"{v:.3f}" for k, v in values[-1].items()}, refresh=False)
        bar.update(len(records) - flushed)
        flushed = len(records)

    plans = None if plan_of_step is None else _plans(plan_of_step, optim_cfg.steps, gen, engine.prefetch)
    try:
        with engine.kernels():
            for step in range(optim_cfg.steps):
                if engine.cudagraphs:  # a new step: the graphs' outputs of the last one are dead
                    torch.compiler.cudagraph_mark_step_begin()
                examples = examples_of_step(step, gen if plans is None else next(plans))
                step_records, finite = _backward_step(engine, objective, n, examples, step, gen, buffer)
                engine.update(opt, finite)
                records.append(step_records)
                if (step + 1) % log_every == 0:
                    flush()
                if on_step and on_step(step, step_records):
                    interrupted = True
                    log.info("stopped by the step callback after %d steps", len(records))
                    break
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted after %d steps: keeping the current result", len(records))
    finally:
        if isinstance(plans, Prefetcher):
            plans.close()
        flush()
        bar.close()
    return [resolve_records([step[k] for step in records]) for k in range(n)], interrupted


def _optimiser(generators: Sequence[torch.nn.Module], optim_cfg) -> StackedMADGRAD:
    return StackedMADGRAD(
        [g.parameters() for g in generators],
        lr=optim_cfg.lr,
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
        gamma=optim_cfg.gamma,
        min_lr=optim_cfg.min_lr,
    )


def _backward_step(engine: Engine, objective, n: int, examples, step: int, gen, buffer: RecordBuffer):
    """Run the step's examples (the generators run as each is drawn), record their terms and
    accumulate every generator's gradient, one backward pass per example for the group. Returns
    (one record per generator, the finite flags: (N,) bool on the device, or True without an
    example)."""
    records = [StepRecord(buffer) for _ in range(n)]
    finite: torch.Tensor | bool = True
    while True:
        with engine.autocast():  # the generators run when the next example is drawn
            example = next(examples, None)
            if example is None:
                break
            layers, key, weight, draw = example
            terms = objective(layers, step, gen, cache_key=key, **({} if draw is None else {"draw": draw}))
        for record, t in zip(records, terms, strict=True):
            record.add(t, weight)
        ok = engine.backward_group([weight * t["loss"] for t in terms])
        finite = ok if finite is True else finite & ok
    return records, finite
