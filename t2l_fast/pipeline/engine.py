"""How a training loop executes: fast path or reference mode, precision, compile, NaN guard.

The image and video editors share this; it knows nothing of where the crops come from.

- ``reference``: eager, fp32, the torch references of the fused ops, each loss and example fed to
  CLIP on its own — the baseline that stands for the original method's cost.
- ``fast``: every view of a step in as few CLIP calls as possible, source-side results reused,
  fixed shapes (bucketed examples, one view size per run), torch.compile of generator and CLIP,
  bf16 autocast with fp32 master weights, the Triton kernels.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch

from ..config import RuntimeConfig
from ..kernels import implementation

log = logging.getLogger(__name__)

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
        self.bucket = runtime.bucket if self.fast else 1
        self.attention = runtime.attention
        self.backend = runtime.compile_backend
        self.nonfinite_steps = 0
        self._consecutive_bad = 0
        if self.compile:
            os.environ.setdefault(
                "TORCHINDUCTOR_CACHE_DIR", str(Path.home() / ".cache" / "t2l_fast" / "inductor")
            )
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
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def kernels(self):
        """Reference mode forces the torch references of the fused ops; the fast path dispatches
        (Triton on CUDA; ``T2L_KERNELS`` still decides when set)."""
        return contextlib.nullcontext() if self.fast else implementation("torch")

    def compiled(self, fn, dynamic: bool | None):
        """``torch.compile(fn)`` on the fast path (``dynamic=None``: static first, then dynamic
        sizes after one recompile), else ``fn`` itself."""
        if not self.compile:
            return fn
        mode = "reduce-overhead" if self.cudagraphs and self.backend == "inductor" else None
        return torch.compile(fn, dynamic=dynamic, backend=self.backend, mode=mode)

    @staticmethod
    def backward(loss: torch.Tensor) -> bool:
        """Accumulate the gradient of ``loss`` unless it is not finite (then False, nothing done)."""
        if not torch.isfinite(loss):
            return False
        loss.backward()
        return True

    def update(self, optimizer: torch.optim.Optimizer, losses_finite: bool = True) -> bool:
        """Apply the accumulated gradient, unless a loss or the gradient is not finite: then the step
        is skipped; after three such steps in a row under reduced precision, the rest of the run is fp32."""
        if not losses_finite:
            return self._skip(optimizer, "loss")
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            return self._skip(optimizer, "gradient")
        self._consecutive_bad = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def _skip(self, optimizer: torch.optim.Optimizer, what: str) -> bool:
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_steps += 1
        self._consecutive_bad += 1
        log.warning("non-finite %s: step skipped (%d so far)", what, self.nonfinite_steps)
        if self._consecutive_bad >= 3 and self.amp_dtype is not None:
            log.warning("falling back to fp32 after %d non-finite steps in a row", self._consecutive_bad)
            self.amp_dtype = None
        return False


def optimise(
    engine: Engine,
    generator: torch.nn.Module,
    objective,
    examples_of_step,
    optim_cfg,
    seed: int,
    *,
    on_step=None,
    after_step=None,
    progress: bool = False,
    desc: str = "editing",
) -> tuple[list[dict[str, float]], bool]:
    """The training loop both editors share.

    ``examples_of_step(step, gen)`` yields the step's examples as (Layers, cache_key, weight)
    tuples (it runs the generator lazily); the loss is the weighted sum of the objective's terms.
    Each example is back-propagated as soon as its loss exists, so a step holds the activations of
    one example at a time (the gradient is the same as that of the summed loss). MADGRAD with the
    exponential schedule (``optim_cfg``); the NaN guard of ``engine.backward`` / ``engine.update``.
    Ctrl-C ends the loop early. Returns (per-step loss records, interrupted).
    """
    from madgrad import MADGRAD
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = MADGRAD(
        generator.parameters(),
        lr=optim_cfg.lr,
        momentum=optim_cfg.momentum,
        weight_decay=optim_cfg.weight_decay,
    )
    floor = optim_cfg.min_lr / optim_cfg.lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(optim_cfg.gamma**s, floor))
    history: list[dict[str, float]] = []
    interrupted = False
    log.info("training: %s", engine.describe())
    bar = tqdm(total=optim_cfg.steps, disable=not progress, desc=desc, unit="step", dynamic_ncols=True)
    try:
        with engine.kernels():
            for step in range(optim_cfg.steps):
                record: dict[str, float] = {}
                finite = True
                examples = examples_of_step(step, gen)
                while True:
                    with engine.autocast():  # the generator runs when the next example is drawn
                        example = next(examples, None)
                        if example is None:
                            break
                        layers, key, weight = example
                        terms = objective(layers, step, gen, cache_key=key)
                    values = torch.stack([v.detach().float() for v in terms.values()]).tolist()  # one sync
                    for k, v in zip(terms, values, strict=True):
                        record[k] = record.get(k, 0.0) + weight * v
                    finite = finite and engine.backward(weight * terms["loss"])
                engine.update(opt, finite)
                sched.step()
                history.append(record)
                bar.set_postfix({k: f"{v:.3f}" for k, v in record.items()}, refresh=False)
                bar.update()
                if on_step:
                    on_step(step, record)
                if after_step:
                    after_step(step)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted after %d steps: keeping the current result", len(history))
    finally:
        bar.close()
    return history, interrupted
