"""Fused RGBA compositing over a background and over green screen, with the alpha statistics.

Inputs
    rgba        (B, 4, H, W)  generator output in [0, 1]: colour C = rgba[:, :3], opacity a = rgba[:, 3:]
    background  (B, 3, H, W)  the source image I_s
Outputs (:class:`CompositeOut`)
    composite   (B, 3, H, W)  a*C + (1-a)*I_s
    greenscreen (B, 3, H, W)  a*C + (1-a)*G, G = (0, 177/255, 64/255)
    alpha_l1    (B,)          mean over H*W of a
    alpha_l0    (B,)          mean over H*W of 2*sigmoid(5a) - 1

Gradients (for upstream gradients gc, gg, g1, g0; N = H*W)
    dC   = a*(gc + gg)
    da   = sum_c[(C - I_s)*gc + (C - G)*gg] + g1/N + g0/N * 10*s*(1-s),  s = sigmoid(5a)
    dI_s = (1-a)*gc
Floating dtypes fp32/bf16/fp16; statistics are accumulated in fp32 and returned in fp32.

Triton path (``composite_rgba``): one forward kernel reads rgba and background once and writes both
composites plus per-block partial alpha sums (reduced on the host, deterministic); one backward kernel
recomputes what it needs from the saved inputs and writes d rgba and d background. Arithmetic in fp32
(fp64 for fp64 inputs, which gradcheck uses; the statistics are then fp64 too). The composite has the
promoted dtype of (rgba, background), the green-screen composite the dtype of rgba.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ._dispatch import use_triton
from ._triton import FLOAT_DTYPES, acc_dtype, jit, next_pow2, on_interpreter, tl, triton

GREEN = (0.0, 177.0 / 255.0, 64.0 / 255.0)


class CompositeOut(NamedTuple):
    composite: torch.Tensor
    greenscreen: torch.Tensor
    alpha_l1: torch.Tensor
    alpha_l0: torch.Tensor


def _check(rgba: torch.Tensor, background: torch.Tensor) -> None:
    if rgba.dim() != 4 or rgba.shape[1] != 4:
        raise ValueError(f"rgba must be (B, 4, H, W), got {tuple(rgba.shape)}")
    expected = (rgba.shape[0], 3, rgba.shape[2], rgba.shape[3])
    if tuple(background.shape) != expected:
        raise ValueError(f"background must be {expected}, got {tuple(background.shape)}")


def green_like(x: torch.Tensor) -> torch.Tensor:
    """The green-screen colour as a (1, 3, 1, 1) tensor of x's dtype on x's device, filled there
    (``torch.tensor(GREEN, device=...)`` would copy from the host and wait for the device)."""
    return torch.stack([torch.full((), g, dtype=x.dtype, device=x.device) for g in GREEN]).view(1, 3, 1, 1)


def composite_rgba_reference(rgba: torch.Tensor, background: torch.Tensor) -> CompositeOut:
    """Plain differentiable torch: the specification and the test oracle."""
    _check(rgba, background)
    colour, alpha = rgba[:, :3], rgba[:, 3:]
    green = green_like(rgba)
    composite = alpha * colour + (1 - alpha) * background
    greenscreen = alpha * colour + (1 - alpha) * green
    a32 = alpha.float()
    alpha_l1 = a32.mean(dim=(1, 2, 3))
    alpha_l0 = (2 * torch.sigmoid(5 * a32) - 1).mean(dim=(1, 2, 3))
    return CompositeOut(composite, greenscreen, alpha_l1, alpha_l0)


# ---------------------------------------------------------------------------------------------------
# Triton kernels. Layout: contiguous NCHW, N = H*W; program (n-block, batch).


@jit
def _composite_fwd_kernel(
    rgba_ptr,  # (B, 4, N)
    bg_ptr,  # (B, 3, N)
    comp_ptr,  # (B, 3, N) out
    green_ptr,  # (B, 3, N) out
    l1_ptr,  # (B, NBLK) out: partial sums of a
    l0_ptr,  # (B, NBLK) out: partial sums of 2*sigmoid(5a) - 1
    N,
    NBLK,
    G0: tl.constexpr,
    G1: tl.constexpr,
    G2: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # int64: B*4*N may exceed 2**31
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    rgba = rgba_ptr + b * 4 * N + offs
    bg = bg_ptr + b * 3 * N + offs
    comp = comp_ptr + b * 3 * N + offs
    green = green_ptr + b * 3 * N + offs

    a = tl.load(rgba + 3 * N, mask=mask, other=0.0).to(ACC)
    one_minus_a = 1.0 - a
    for c in tl.static_range(3):
        g = G0 if c == 0 else (G1 if c == 1 else G2)
        col = tl.load(rgba + c * N, mask=mask, other=0.0).to(ACC)
        back = tl.load(bg + c * N, mask=mask, other=0.0).to(ACC)
        ac = a * col
        tl.store(comp + c * N, (ac + one_minus_a * back).to(comp_ptr.dtype.element_ty), mask=mask)
        tl.store(green + c * N, (ac + one_minus_a * g).to(green_ptr.dtype.element_ty), mask=mask)

    # Masked lanes loaded a = 0, which would add 2*sigmoid(0) - 1 = 0 anyway; mask explicitly for clarity.
    l0 = 2.0 / (1.0 + tl.exp(-5.0 * a)) - 1.0
    tl.store(l1_ptr + b * NBLK + pid, tl.sum(tl.where(mask, a, 0.0), axis=0))
    tl.store(l0_ptr + b * NBLK + pid, tl.sum(tl.where(mask, l0, 0.0), axis=0))


@jit
def _composite_bwd_kernel(
    rgba_ptr,  # (B, 4, N)
    bg_ptr,  # (B, 3, N)
    gc_ptr,  # (B, 3, N) upstream grad of composite (unused unless HAS_GC)
    gg_ptr,  # (B, 3, N) upstream grad of greenscreen (unused unless HAS_GG)
    g1_ptr,  # (B,) upstream grad of alpha_l1
    g0_ptr,  # (B,) upstream grad of alpha_l0
    drgba_ptr,  # (B, 4, N) out (unused unless NEED_DRGBA)
    dbg_ptr,  # (B, 3, N) out (unused unless NEED_DBG)
    N,
    G0: tl.constexpr,
    G1: tl.constexpr,
    G2: tl.constexpr,
    HAS_GC: tl.constexpr,
    HAS_GG: tl.constexpr,
    NEED_DRGBA: tl.constexpr,
    NEED_DBG: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    rgba = rgba_ptr + b * 4 * N + offs
    bg = bg_ptr + b * 3 * N + offs
    gcp = gc_ptr + b * 3 * N + offs
    ggp = gg_ptr + b * 3 * N + offs
    drgba = drgba_ptr + b * 4 * N + offs

    a = tl.load(rgba + 3 * N, mask=mask, other=0.0).to(ACC)
    # d(alpha_l1)/da = 1/N; d(alpha_l0)/da = 10 s (1 - s) / N with s = sigmoid(5a).
    g1 = tl.load(g1_ptr + b).to(ACC)
    g0 = tl.load(g0_ptr + b).to(ACC)
    s = 1.0 / (1.0 + tl.exp(-5.0 * a))
    da = (g1 + g0 * 10.0 * s * (1.0 - s)) / N
    for c in tl.static_range(3):
        g = G0 if c == 0 else (G1 if c == 1 else G2)
        col = tl.load(rgba + c * N, mask=mask, other=0.0).to(ACC)
        dcol = tl.zeros_like(a)
        if HAS_GC:
            gc = tl.load(gcp + c * N, mask=mask, other=0.0).to(ACC)
            back = tl.load(bg + c * N, mask=mask, other=0.0).to(ACC)
            dcol += a * gc
            da += (col - back) * gc
            if NEED_DBG:
                tl.store(
                    dbg_ptr + b * 3 * N + c * N + offs,
                    ((1.0 - a) * gc).to(dbg_ptr.dtype.element_ty),
                    mask=mask,
                )
        if HAS_GG:
            gg = tl.load(ggp + c * N, mask=mask, other=0.0).to(ACC)
            dcol += a * gg
            da += (col - g) * gg
        if NEED_DRGBA:
            tl.store(drgba + c * N, dcol.to(drgba_ptr.dtype.element_ty), mask=mask)
    if NEED_DRGBA:
        tl.store(drgba + 3 * N, da.to(drgba_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers


def _block(x: torch.Tensor, n: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 1024 pixels per program on GPU; big blocks under the interpreter, whose
    cost is per program."""
    if on_interpreter(x):
        return min(next_pow2(n), 16384), 4
    return min(max(next_pow2(n), 128), 1024), 4


def _grid(b: int, n: int, block: int) -> tuple[int, int]:
    if b > 65535:
        raise ValueError(f"composite_rgba: batch {b} exceeds the grid limit 65535")
    return triton.cdiv(n, block), b


def _composite_fwd(rgba: torch.Tensor, background: torch.Tensor) -> CompositeOut:
    b, _, h, w = rgba.shape
    n = h * w
    comp = torch.empty(
        (b, 3, h, w), dtype=torch.promote_types(rgba.dtype, background.dtype), device=rgba.device
    )
    green = torch.empty((b, 3, h, w), dtype=rgba.dtype, device=rgba.device)
    block, warps = _block(rgba, n)
    grid = _grid(b, n, block)
    stat_dtype = torch.float64 if comp.dtype == torch.float64 else torch.float32
    l1 = torch.empty((b, grid[0]), dtype=stat_dtype, device=rgba.device)
    l0 = torch.empty_like(l1)
    _composite_fwd_kernel[grid](
        rgba, background, comp, green, l1, l0, n, grid[0],
        G0=GREEN[0], G1=GREEN[1], G2=GREEN[2], ACC=acc_dtype(comp.dtype), BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return CompositeOut(comp, green, l1.sum(1) / n, l0.sum(1) / n)


def _composite_bwd(
    rgba: torch.Tensor,
    background: torch.Tensor,
    gc: torch.Tensor | None,
    gg: torch.Tensor | None,
    g1: torch.Tensor | None,
    g0: torch.Tensor | None,
    need_rgba: bool,
    need_bg: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    need_bg = need_bg and gc is not None
    if not (need_rgba or need_bg):
        return None, None
    b, _, h, w = rgba.shape
    n = h * w
    zeros = torch.zeros(b, dtype=torch.float32, device=rgba.device)
    g1 = zeros if g1 is None else g1.contiguous()
    g0 = zeros if g0 is None else g0.contiguous()
    gc = None if gc is None else gc.contiguous()
    gg = None if gg is None else gg.contiguous()
    drgba = torch.empty_like(rgba) if need_rgba else None
    dbg = torch.empty_like(background) if need_bg else None
    block, warps = _block(rgba, n)
    dummy = rgba  # never dereferenced: the matching constexpr flag is off
    dtype = torch.promote_types(rgba.dtype, background.dtype)
    _composite_bwd_kernel[_grid(b, n, block)](
        rgba, background,
        dummy if gc is None else gc, dummy if gg is None else gg,
        g1, g0,
        dummy if drgba is None else drgba, dummy if dbg is None else dbg,
        n, G0=GREEN[0], G1=GREEN[1], G2=GREEN[2],
        HAS_GC=gc is not None, HAS_GG=gg is not None, NEED_DRGBA=need_rgba, NEED_DBG=need_bg,
        ACC=acc_dtype(dtype), BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return drgba, dbg


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (no graph break), with fake (shape) and autograd
# implementations. Gradients the op does not produce come back as empty tensors (a custom op returns
# no None); the autograd wrapper turns them into None.


@torch.library.custom_op(
    "t2l_fast::composite_rgba",
    mutates_args=(),
    schema="(Tensor rgba, Tensor background) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _composite_op(rgba: torch.Tensor, background: torch.Tensor):
    return tuple(_composite_fwd(rgba.contiguous(), background.contiguous()))


@_composite_op.register_fake
def _composite_fake(rgba, background):
    b, _, h, w = rgba.shape
    comp_dtype = torch.promote_types(rgba.dtype, background.dtype)
    stat_dtype = torch.float64 if comp_dtype == torch.float64 else torch.float32
    return (
        rgba.new_empty((b, 3, h, w), dtype=comp_dtype),
        rgba.new_empty((b, 3, h, w)),
        rgba.new_empty((b,), dtype=stat_dtype),
        rgba.new_empty((b,), dtype=stat_dtype),
    )


@torch.library.custom_op(
    "t2l_fast::composite_rgba_backward",
    mutates_args=(),
    schema="(Tensor rgba, Tensor background, Tensor? gc, Tensor? gg, Tensor? g1, Tensor? g0, "
    "bool need_rgba, bool need_bg) -> (Tensor, Tensor)",
)
def _composite_bwd_op(rgba, background, gc, gg, g1, g0, need_rgba, need_bg):
    drgba, dbg = _composite_bwd(
        rgba.contiguous(), background.contiguous(), gc, gg, g1, g0, need_rgba, need_bg
    )
    return (
        rgba.new_empty(0) if drgba is None else drgba,
        background.new_empty(0) if dbg is None else dbg,
    )


@_composite_bwd_op.register_fake
def _composite_bwd_fake(rgba, background, gc, gg, g1, g0, need_rgba, need_bg):
    need_bg = need_bg and gc is not None  # as _composite_bwd
    return (
        torch.empty_like(rgba, memory_format=torch.contiguous_format) if need_rgba else rgba.new_empty(0),
        torch.empty_like(background, memory_format=torch.contiguous_format)
        if need_bg
        else background.new_empty(0),
    )


def _composite_setup(ctx, inputs, output):
    rgba, background = inputs
    ctx.save_for_backward(rgba, background)
    ctx.set_materialize_grads(False)  # absent upstream grads arrive as None and skip their loads


def _composite_autograd(ctx, gc, gg, g1, g0):
    rgba, background = ctx.saved_tensors
    need_rgba, need_bg = ctx.needs_input_grad[:2]
    need_bg = need_bg and gc is not None  # the background's gradient comes through the composite only
    if not (need_rgba or need_bg):
        return None, None
    drgba, dbg = _composite_bwd_op(rgba, background, gc, gg, g1, g0, need_rgba, need_bg)
    return (drgba if need_rgba else None), (dbg if need_bg else None)


_composite_op.register_autograd(_composite_autograd, setup_context=_composite_setup)


def composite_rgba_triton(rgba: torch.Tensor, background: torch.Tensor) -> CompositeOut:
    """The Triton path, without dispatch (tests and benchmarks call it directly)."""
    _check(rgba, background)
    return CompositeOut(*_composite_op(rgba, background))


def composite_rgba(rgba: torch.Tensor, background: torch.Tensor) -> CompositeOut:
    """Composite ``rgba`` over ``background`` and over green screen; see the module docstring.

    rgba (B, 4, H, W), background (B, 3, H, W) -> CompositeOut(composite (B, 3, H, W),
    greenscreen (B, 3, H, W), alpha_l1 (B,) fp32, alpha_l0 (B,) fp32).
    """
    _check(rgba, background)
    if (
        use_triton(rgba, background)
        and rgba.numel() > 0
        and rgba.dtype in FLOAT_DTYPES
        and background.dtype in FLOAT_DTYPES
    ):
        return composite_rgba_triton(rgba, background)
    return composite_rgba_reference(rgba, background)
