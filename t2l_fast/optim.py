"""MADGRAD in a few whole-model launches, with a device-side skip and a device-side lr schedule.

The update is the ``madgrad`` package's MADGRAD (Defazio & Jelassi 2021) for dense gradients, with the
same ``lr``, ``momentum``, ``weight_decay``, ``eps`` and ``decouple_decay`` semantics. With k the number
of updates applied so far, lr the (scheduled) learning rate, and g = grad (+ decay * p unless decoupled):

    lr'    = lr + eps            (when lr != 0; as the package does "for stability")
    lamb   = lr' * sqrt(k + 1)
    gss   += lamb * g * g        (sum of squared gradients)
    s     += lamb * g
    rms    = gss^(1/3) + eps      (the cube root in fp64, rounded to fp32)
    z      = x0 - s / rms        (x0: the parameters at the first step; with momentum 0, recovered as
                                  p + s_old / rms_old)
    p      = (1 - ck) p + ck z   with ck = 1 - momentum  (momentum 0: p = z)
    p     -= lr' * decay * p_old (decoupled decay only)

What differs from the package is how it runs:

- **No per-tensor loop.** The state (gss, s, x0) of all parameters lives in one flat fp32 buffer per
  quantity (each parameter's state entries are views into it, so ``state_dict`` still works). A step
  concatenates the gradients and the parameters into flat buffers (one ``cat`` each), runs the update
  as a handful of whole-buffer ops and copies the new values back with one ``torch._foreach_copy_``:
  about 25 kernel launches whatever the number of parameter tensors (the package: ~8 per tensor).
- **No host synchronisation.** The step count, the scheduled learning rate and lamb are 0-dim device
  tensors (fp64, rounded to fp32 where used, as the package's Python floats are).
- **Device-side skip.** ``step(skip=flag)`` with a 0-dim bool device tensor makes the whole update a
  no-op when the flag is true: gradients are replaced by zeros (so NaN/inf never reach the state) and
  the new parameters are selected with ``torch.where``; the step count does not advance. With
  ``skip_nonfinite=True`` (the default) a gradient with any non-finite element also skips the step.
  ``step`` returns the 0-dim bool "applied" flag, still on the device.
- **Several models in one pass.** :class:`StackedMADGRAD` holds the state of G models of one structure
  (variants trained together) as (G, P) buffers: one update for all, with a step count, a schedule
  and a skip flag per model (row). The cube root is taken in fp64 and rounded, so that a row gets
  the numbers of its model alone whatever its position (the CPU's vectorised and scalar fp32 ``pow``
  differ in the last bit).
- **Schedule on the device.** lr = max(lr0 * gamma^k, min_lr) with k = the number of *applied* updates,
  so the schedule advances only after a real update (gamma = 1, min_lr = 0: constant lr).

Parameters whose ``grad`` is None are left alone (as the package does); their state stays as it was.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class FusedMADGRAD(torch.optim.Optimizer):
    """MADGRAD over flat buffers (see the module docstring). One parameter group per optimizer step
    layout; all parameters of a group must share a device."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-2,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eps: float = 1e-6,
        decouple_decay: bool = False,
        *,
        gamma: float = 1.0,
        min_lr: float = 0.0,
        skip_nonfinite: bool = True,
    ):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum {momentum} must be in [0, 1)")
        if lr < 0:
            raise ValueError(f"learning rate {lr} must be non-negative")
        if weight_decay < 0:
            raise ValueError(f"weight decay {weight_decay} must be non-negative")
        if eps <= 0:
            raise ValueError(f"eps {eps} must be positive (eps = 0 is not supported here)")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma {gamma} must be in (0, 1]")
        if min_lr < 0:
            raise ValueError(f"min_lr {min_lr} must be non-negative")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            eps=eps,
            decouple_decay=decouple_decay,
            gamma=gamma,
            min_lr=min_lr,
        )
        super().__init__(params, defaults)
        self.skip_nonfinite = skip_nonfinite
        self._flat: dict[int, dict] = {}  # id(param group) -> its flat state buffers

    # -- device-side counters ---------------------------------------------------------------------
    def _counter(self, device: torch.device) -> torch.Tensor:
        """The number of applied updates k: a 0-dim fp64 tensor on ``device`` (exact up to 2**53)."""
        k = self.state.get("k")
        if k is None:
            k = torch.zeros((), dtype=torch.float64, device=device)
            self.state["k"] = k
        return k

    @property
    def updates(self) -> torch.Tensor | None:
        """The number of updates applied so far (0-dim fp64 device tensor; None before the first step)."""
        return self.state.get("k")

    def scheduled_lr(self, group: dict | None = None) -> torch.Tensor:
        """max(lr0 * gamma^k, min_lr) for ``group`` (default: the first) as a 0-dim fp64 tensor."""
        group = self.param_groups[0] if group is None else group
        device = next(iter(group["params"])).device
        k = self._counter(device)
        lr = torch.pow(float(group["gamma"]), k) * group["lr"]  # k is fp64 on the device: no host copy
        return torch.clamp_min(lr, group["min_lr"])

    # -- state --------------------------------------------------------------------------------------
    def _init_group(self, group: dict) -> dict:
        """Flat fp32 state buffers for every parameter of ``group``; per-parameter views in
        ``self.state[p]``. x0 is the parameters' value now (before any update), as in the package."""
        flat = self._flat.get(id(group))
        if flat is not None:
            return flat
        params = list(group["params"])
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"FusedMADGRAD: a parameter group must live on one device, got {devices}")
        numels = [p.numel() for p in params]
        with torch.no_grad():
            p_flat = torch.cat([p.detach().reshape(-1).float() for p in params])
        flat = {
            "numels": numels,
            "gss": torch.zeros_like(p_flat),
            "s": torch.zeros_like(p_flat),
            "x0": p_flat if group["momentum"] != 0 else None,
        }
        for name in ("gss", "s", "x0"):
            if flat[name] is None:
                continue
            for p, view in zip(params, torch.split(flat[name], numels), strict=True):
                key = {"gss": "grad_sum_sq", "s": "s", "x0": "x0"}[name]
                self.state[p][key] = view.view(p.shape)
        self._flat[id(group)] = flat
        return flat

    # -- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, skip: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Apply one MADGRAD update unless ``skip`` (0-dim bool tensor) is true or, with
        ``skip_nonfinite``, a gradient is not finite. Returns the 0-dim bool "applied" flag (on the
        device; reading it is the caller's choice of a sync). ``closure`` is not supported."""
        if closure is not None:
            raise ValueError("FusedMADGRAD.step does not take a closure")
        applied = None
        for group in self.param_groups:
            flag = self._step_group(group, skip)
            if flag is not None:
                applied = flag if applied is None else applied & flag
        if applied is None:  # no gradient anywhere: nothing happened
            device = next(iter(self.param_groups[0]["params"])).device
            applied = torch.zeros((), dtype=torch.bool, device=device)
        return applied

    def _step_group(self, group: dict, skip: torch.Tensor | None) -> torch.Tensor | None:
        params = list(group["params"])
        have = [i for i, p in enumerate(params) if p.grad is not None]
        if not have:
            return None
        if any(params[i].grad.is_sparse for i in have):
            raise RuntimeError("FusedMADGRAD does not support sparse gradients")
        flat = self._init_group(group)
        device = params[have[0]].device
        k = self._counter(device)
        everything = len(have) == len(params)
        sel = params if everything else [params[i] for i in have]
        numels = flat["numels"] if everything else [flat["numels"][i] for i in have]

        def state(name: str) -> torch.Tensor:
            buf = flat[name]
            if everything:
                return buf
            views = torch.split(buf, flat["numels"])
            return torch.cat([views[i] for i in have])

        g = torch.cat([p.grad.reshape(-1).float() for p in sel])  # (N,) fp32
        p_flat = torch.cat([p.reshape(-1).float() for p in sel])  # (N,) fp32
        skip_now = torch.zeros((), dtype=torch.bool, device=device) if skip is None else skip.to(device)
        if self.skip_nonfinite:
            skip_now = skip_now | ~torch.isfinite(g).all()
        gss, s = state("gss"), state("s")
        x0 = state("x0") if group["momentum"] != 0 else None
        new_p = _update(group, p_flat, g, gss, s, x0, self.scheduled_lr(group), k, skip_now)

        if not everything:  # write the gathered state back into the flat buffers
            for name, buf in (("gss", gss), ("s", s)):
                views = torch.split(flat[name], flat["numels"])
                torch._foreach_copy_([views[i] for i in have], list(torch.split(buf, numels)))
        torch._foreach_copy_(
            [p.detach() for p in sel],
            [v.view(p.shape) for p, v in zip(sel, torch.split(new_p, numels), strict=True)],
        )
        k.add_((~skip_now).to(k.dtype))
        return ~skip_now


class StackedMADGRAD(FusedMADGRAD):
    """MADGRAD for G models of one structure trained together (variants): each its own MADGRAD (its
    own state, update count, lr schedule and skip flag), all updated in one pass over (G, P) state
    buffers: the same ~25 launches for any G, each row's numbers those of a
    :class:`FusedMADGRAD` of that model alone. ``step(skip=)`` takes a (G,) bool tensor and
    returns the (G,) "applied" flags; a model whose gradient is not finite skips alone.

    ``models``: G iterables of parameters, the same shapes in the same order (one param group
    each). Every parameter needs a gradient at each step (a model trained whole, as the generator)."""

    def __init__(self, models: Iterable[Iterable[torch.Tensor]], **hyper):
        groups = [{"params": list(params)} for params in models]
        if not groups:
            raise ValueError("StackedMADGRAD needs at least one model")
        shapes = [[tuple(p.shape) for p in group["params"]] for group in groups]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("StackedMADGRAD: the models must have the same parameter shapes, in order")
        super().__init__(groups, **hyper)
        self._stacked: dict[str, torch.Tensor | None] | None = None

    def _counter(self, device: torch.device) -> torch.Tensor:
        """The number of applied updates of each model: (G,) fp64 on ``device``."""
        k = self.state.get("k")
        if k is None:
            k = torch.zeros(len(self.param_groups), dtype=torch.float64, device=device)
            self.state["k"] = k
        return k

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _init_stack(self) -> dict[str, torch.Tensor | None]:
        """(G, P) fp32 state buffers; each parameter's state entries are views into its row."""
        if self._stacked is not None:
            return self._stacked
        params, n = self._params(), len(self.param_groups)
        with torch.no_grad():
            p_flat = torch.cat([p.detach().reshape(-1).float() for p in params]).view(n, -1)
        stack = {
            "gss": torch.zeros_like(p_flat),
            "s": torch.zeros_like(p_flat),
            "x0": p_flat if self.defaults["momentum"] != 0 else None,
        }
        numels = [p.numel() for p in params]
        for name, key in (("gss", "grad_sum_sq"), ("s", "s"), ("x0", "x0")):
            buf = stack[name]
            if buf is not None:
                for p, view in zip(params, torch.split(buf.view(-1), numels), strict=True):
                    self.state[p][key] = view.view(p.shape)
        self._stacked = stack
        return stack

    @torch.no_grad()
    def step(self, closure=None, *, skip: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """Apply one MADGRAD update to each model unless its ``skip`` flag (G,) is true or (with
        ``skip_nonfinite``) its gradient is not finite. Returns the (G,) bool "applied" flags."""
        if closure is not None:
            raise ValueError("StackedMADGRAD.step does not take a closure")
        params, n = self._params(), len(self.param_groups)
        if any(p.grad is None for p in params):
            raise RuntimeError("StackedMADGRAD: every parameter needs a gradient (train each model whole)")
        device = params[0].device
        stack, k = self._init_stack(), self._counter(device)
        g = torch.cat([p.grad.reshape(-1).float() for p in params]).view(n, -1)
        p_flat = torch.cat([p.reshape(-1).float() for p in params]).view(n, -1)
        skip_now = torch.zeros(n, dtype=torch.bool, device=device)
        if skip is not None:
            skip_now = skip_now | skip.to(device).reshape(n)
        if self.skip_nonfinite:
            skip_now = skip_now | ~torch.isfinite(g).all(dim=1)
        assert stack["gss"] is not None and stack["s"] is not None
        lr = self.scheduled_lr(self.param_groups[0])  # (G,): each model's own count
        rows = (lr[:, None], k[:, None], skip_now[:, None])
        new_p = _update(self.param_groups[0], p_flat, g, stack["gss"], stack["s"], stack["x0"], *rows)
        torch._foreach_copy_(
            [p.detach() for p in params],
            [
                v.view(p.shape)
                for p, v in zip(params, torch.split(new_p.view(-1), [p.numel() for p in params]), strict=True)
            ],
        )
        k.add_((~skip_now).to(k.dtype))
        return ~skip_now


def _update(group: dict, p, g, gss, s, x0, lr, k, skip) -> torch.Tensor:
    """One MADGRAD update (the module docstring's formulas) of the flat fp32 parameters ``p`` with
    gradient ``g``: ``gss`` and ``s`` updated in place, the new parameters returned (``p`` itself
    where ``skip``). ``lr`` (scheduled, fp64), ``k`` (applied updates, fp64) and ``skip`` (bool) are
    0-dim, or one per row of (G, P) buffers: each row its own MADGRAD."""
    momentum, decay, eps = group["momentum"], group["weight_decay"], group["eps"]
    decouple = group["decouple_decay"]
    ck = 1.0 - momentum
    if decay != 0 and not decouple:
        g = g.add(p, alpha=decay)
    g = torch.where(skip, 0.0, g)  # NaN/inf never reach the state; lamb * 0 leaves it exact
    lr = torch.where(lr != 0, lr + eps, lr)
    lamb = (lr * torch.sqrt(k + 1)).float()  # rounded to fp32 as the package's Python float is
    if momentum == 0:
        x0 = torch.addcdiv(p, s, _cube_root(gss).add_(eps), value=1)
    g_lamb = g * lamb
    gss.addcmul_(g_lamb, g)
    rms = _cube_root(gss).add_(eps)
    s.add_(g_lamb)
    z = torch.addcdiv(x0, s, rms, value=-1)
    new_p = z if momentum == 0 else p.mul(1 - ck).add_(z, alpha=ck)
    if decay != 0 and decouple:
        new_p = new_p - p * (lr.float() * decay)
    return torch.where(skip, p, new_p)


def madgrad_lr(lr0: float, gamma: float, min_lr: float, k: int) -> float:
    """The schedule on the host, for tests and logs: max(lr0 * gamma^k, min_lr)."""
    return max(lr0 * math.pow(gamma, k), min_lr)


def _cube_root(x: torch.Tensor) -> torch.Tensor:
    """x^(1/3) of fp32 ``x``, computed in fp64 and rounded back: the same number wherever the element
    sits (the CPU's vectorised and scalar fp32 ``pow`` differ in the last bit, so a model's row of a
    stacked buffer would not get its lone numbers)."""
    return x.double().pow(1 / 3).float()
