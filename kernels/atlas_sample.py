"""Bilinear sampling of an RGBA edit atlas at per-pixel UVs, fused with compositing over the frame.

Inputs
    atlas    (4, Ha, Wa)   edit atlas RGBA in [0, 1] (colour C, opacity a); gradient flows here
    uv       (T, H, W, 2)  sampling positions, ``grid_sample`` convention: x (width) then y,
                           in [-1, 1] with align_corners=False; outside: zero padding
    frames   (T, 3, H, W)  the video frames F (no gradient)
    opacity  (T, H, W)     optional per-pixel layer opacity A (foreground atlases); 1 if None
Outputs (:class:`AtlasSampleOut`), with w_k the four bilinear weights (0 for taps outside the atlas)
    edit        (T, 3, H, W)  sum_k w_k C_k
    alpha       (T, 1, H, W)  A * sum_k w_k a_k
    composite   (T, 3, H, W)  sum_k w_k [A a_k C_k + (1 - A a_k) F]
    greenscreen (T, 3, H, W)  sum_k w_k [A a_k C_k + (1 - A a_k) G]
Compositing happens at each tap before weighting: that is what sampling the rendered layer equals.
UVs and weights are kept in fp32; the atlas gradient is accumulated in fp32.

Gradients (upstream ge, gal, gc, gg per pixel; h = gc + gg; F frame colour, G green)
    dC_k  = w_k (ge + A a_k h)
    da_k  = w_k A (gal + sum_c [C_kc h_c - F_c gc_c - G_c gg_c])
    dA    = gal sa + sum_c [gc_c (sac_c - sa F_c) + gg_c (sac_c - sa G_c)]    (sa = sum_k w_k a_k, ...)
    dF    = (wsum - A sa) gc
Triton path: one forward kernel per block of pixels gathers the four taps, composites at each and
writes the four outputs; one backward kernel recomputes the taps and scatters dC, da into an fp32
atlas gradient with atomic adds (relaxed; summation order, hence the last bits, vary run to run), and
writes d opacity / d frames when those need gradients. UVs get no gradient from the kernel: with
``uv.requires_grad`` under grad mode the dispatcher uses the reference instead. Texel coordinates
follow the CUDA ``grid_sample`` formula ix = ((x + 1) Wa - 1) / 2 (align_corners=False) and its
weights (x0 + 1 - ix) and (ix - x0); taps outside the atlas read zero. Non-finite UVs are unspecified
(grid_sample gives NaN; the kernel treats them as far outside or propagates NaN, by backend). fp64
atlases compute in fp64 (gradcheck).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ._dispatch import ENV_VAR, KernelUnavailable, forced, use_triton
from ._triton import FLOAT_DTYPES, acc_dtype, jit, next_pow2, on_interpreter, tl, triton
from .composite import GREEN, green_like


class AtlasSampleOut(NamedTuple):
    edit: torch.Tensor
    alpha: torch.Tensor
    composite: torch.Tensor
    greenscreen: torch.Tensor


def _check(atlas, uv, frames, opacity) -> None:
    if atlas.dim() != 3 or atlas.shape[0] != 4:
        raise ValueError(f"atlas must be (4, Ha, Wa), got {tuple(atlas.shape)}")
    if uv.dim() != 4 or uv.shape[-1] != 2:
        raise ValueError(f"uv must be (T, H, W, 2), got {tuple(uv.shape)}")
    t, h, w, _ = uv.shape
    if tuple(frames.shape) != (t, 3, h, w):
        raise ValueError(f"frames must be {(t, 3, h, w)}, got {tuple(frames.shape)}")
    if opacity is not None and tuple(opacity.shape) != (t, h, w):
        raise ValueError(f"opacity must be {(t, h, w)}, got {tuple(opacity.shape)}")


def sample_atlas_reference(
    atlas: torch.Tensor,
    uv: torch.Tensor,
    frames: torch.Tensor,
    opacity: torch.Tensor | None = None,
) -> AtlasSampleOut:
    """Plain differentiable torch built on ``grid_sample``: the specification and the test oracle."""
    _check(atlas, uv, frames, opacity)
    t = uv.shape[0]
    colour, a = atlas[:3], atlas[3:]
    ones = torch.ones_like(a)
    # Channels that are linear in the atlas: C, a, a*C, and 1 (the sum of in-bounds weights).
    stacked = torch.cat([colour, a, a * colour, ones], dim=0).float()  # (8, Ha, Wa)
    stacked = stacked.unsqueeze(0).expand(t, -1, -1, -1)
    s = F.grid_sample(stacked, uv.float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    edit, sa, sac, wsum = s[:, :3], s[:, 3:4], s[:, 4:7], s[:, 7:8]
    opac = torch.ones_like(sa) if opacity is None else opacity.float().unsqueeze(1)
    green = green_like(s)
    frames32 = frames.float()
    alpha = opac * sa
    composite = opac * sac + (wsum - alpha) * frames32
    greenscreen = opac * sac + (wsum - alpha) * green
    dtype = atlas.dtype
    return AtlasSampleOut(edit.to(dtype), alpha.to(dtype), composite.to(dtype), greenscreen.to(dtype))


# ---------------------------------------------------------------------------------------------------
# Triton kernels. Pixels p = t*HW + n (n = y*W + x) over all frames; one program per BLOCK pixels.


@jit
def _texel_coords(uv_ptr, p, mask, Ha, Wa, ACC: tl.constexpr):
    """Top-left tap (x0, y0) as ints and the bilinear fractions, grid_sample(align_corners=False)."""
    gx = tl.load(uv_ptr + 2 * p, mask=mask, other=0.0).to(ACC)
    gy = tl.load(uv_ptr + 2 * p + 1, mask=mask, other=0.0).to(ACC)
    ix = ((gx + 1.0) * Wa - 1.0) / 2.0
    iy = ((gy + 1.0) * Ha - 1.0) / 2.0
    # Far outside the atlas every tap is zero anyway; clamping keeps the int conversion defined.
    ix = tl.minimum(tl.maximum(ix, -2.0), Wa + 1.0)
    iy = tl.minimum(tl.maximum(iy, -2.0), Ha + 1.0)
    x0f = tl.floor(ix)
    y0f = tl.floor(iy)
    # Weights as in ATen: east = ix - x0, west = (x0 + 1) - ix (not 1 - east), same for y.
    return x0f.to(tl.int32), y0f.to(tl.int32), ix - x0f, (x0f + 1.0) - ix, iy - y0f, (y0f + 1.0) - iy


@jit
def _atlas_fwd_kernel(
    atlas_ptr,  # (4, Ha, Wa)
    uv_ptr,  # (P, 2)
    frames_ptr,  # (T, 3, HW)
    opac_ptr,  # (P,) (read if HAS_OPAC)
    edit_ptr,  # (T, 3, HW) out
    alpha_ptr,  # (T, HW) out
    comp_ptr,  # (T, 3, HW) out
    green_ptr,  # (T, 3, HW) out
    P,
    HW,
    Ha,
    Wa,
    G0: tl.constexpr,
    G1: tl.constexpr,
    G2: tl.constexpr,
    HAS_OPAC: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 pixel index: T*3*H*W exceeds 2**31 for long, large videos.
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    t = p // HW
    n = p - t * HW
    x0, y0, ex, wx, sy, ny = _texel_coords(uv_ptr, p, mask, Ha, Wa, ACC)
    plane = Ha.to(tl.int64) * Wa
    e0 = tl.zeros((BLOCK,), dtype=ACC)
    e1 = tl.zeros((BLOCK,), dtype=ACC)
    e2 = tl.zeros((BLOCK,), dtype=ACC)
    sa = tl.zeros((BLOCK,), dtype=ACC)
    s0 = tl.zeros((BLOCK,), dtype=ACC)
    s1 = tl.zeros((BLOCK,), dtype=ACC)
    s2 = tl.zeros((BLOCK,), dtype=ACC)
    wsum = tl.zeros((BLOCK,), dtype=ACC)
    for k in tl.static_range(4):
        xi = x0 + (k % 2)
        yi = y0 + (k // 2)
        w = (ex if k % 2 == 1 else wx) * (sy if k // 2 == 1 else ny)
        valid = mask & (xi >= 0) & (xi < Wa) & (yi >= 0) & (yi < Ha)
        off = yi.to(tl.int64) * Wa + xi
        c0 = tl.load(atlas_ptr + off, mask=valid, other=0.0).to(ACC)
        c1 = tl.load(atlas_ptr + plane + off, mask=valid, other=0.0).to(ACC)
        c2 = tl.load(atlas_ptr + 2 * plane + off, mask=valid, other=0.0).to(ACC)
        a = tl.load(atlas_ptr + 3 * plane + off, mask=valid, other=0.0).to(ACC)
        w = tl.where(valid, w, 0.0)  # zero padding: an outside tap adds nothing, not even to wsum
        wa = w * a
        e0 += w * c0
        e1 += w * c1
        e2 += w * c2
        sa += wa
        s0 += wa * c0
        s1 += wa * c1
        s2 += wa * c2
        wsum += w
    if HAS_OPAC:
        A = tl.load(opac_ptr + p, mask=mask, other=0.0).to(ACC)
    else:
        A = tl.full((BLOCK,), 1.0, dtype=ACC)
    alpha = A * sa
    rest = wsum - alpha  # sum_k w_k (1 - A a_k)
    fbase = frames_ptr + t * 3 * HW + n
    obase = t * 3 * HW + n
    f0 = tl.load(fbase, mask=mask, other=0.0).to(ACC)
    f1 = tl.load(fbase + HW, mask=mask, other=0.0).to(ACC)
    f2 = tl.load(fbase + 2 * HW, mask=mask, other=0.0).to(ACC)
    ty = edit_ptr.dtype.element_ty
    tl.store(edit_ptr + obase, e0.to(ty), mask=mask)
    tl.store(edit_ptr + obase + HW, e1.to(ty), mask=mask)
    tl.store(edit_ptr + obase + 2 * HW, e2.to(ty), mask=mask)
    tl.store(alpha_ptr + p, alpha.to(ty), mask=mask)
    tl.store(comp_ptr + obase, (A * s0 + rest * f0).to(ty), mask=mask)
    tl.store(comp_ptr + obase + HW, (A * s1 + rest * f1).to(ty), mask=mask)
    tl.store(comp_ptr + obase + 2 * HW, (A * s2 + rest * f2).to(ty), mask=mask)
    tl.store(green_ptr + obase, (A * s0 + rest * G0).to(ty), mask=mask)
    tl.store(green_ptr + obase + HW, (A * s1 + rest * G1).to(ty), mask=mask)
    tl.store(green_ptr + obase + 2 * HW, (A * s2 + rest * G2).to(ty), mask=mask)


@jit
def _load3(ptr, off, HW, mask, ACC: tl.constexpr):
    x0 = tl.load(ptr + off, mask=mask, other=0.0).to(ACC)
    x1 = tl.load(ptr + off + HW, mask=mask, other=0.0).to(ACC)
    x2 = tl.load(ptr + off + 2 * HW, mask=mask, other=0.0).to(ACC)
    return x0, x1, x2


@jit
def _atlas_bwd_kernel(
    atlas_ptr,  # (4, Ha, Wa)
    uv_ptr,  # (P, 2)
    frames_ptr,  # (T, 3, HW)
    opac_ptr,  # (P,)
    ge_ptr,  # (T, 3, HW) upstream grads (each read only if its HAS_ flag is set)
    gal_ptr,  # (T, HW)
    gc_ptr,  # (T, 3, HW)
    gg_ptr,  # (T, 3, HW)
    datlas_ptr,  # (4, Ha, Wa) fp32 (fp64) accumulator, zero-initialised
    dopac_ptr,  # (P,) out (if NEED_DOPAC)
    dframes_ptr,  # (T, 3, HW) out (if NEED_DFRAMES)
    P,
    HW,
    Ha,
    Wa,
    G0: tl.constexpr,
    G1: tl.constexpr,
    G2: tl.constexpr,
    HAS_OPAC: tl.constexpr,
    HAS_GE: tl.constexpr,
    HAS_GAL: tl.constexpr,
    HAS_GC: tl.constexpr,
    HAS_GG: tl.constexpr,
    NEED_DATLAS: tl.constexpr,
    NEED_DOPAC: tl.constexpr,
    NEED_DFRAMES: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = p < P
    t = p // HW
    n = p - t * HW
    obase = t * 3 * HW + n
    x0, y0, ex, wx, sy, ny = _texel_coords(uv_ptr, p, mask, Ha, Wa, ACC)
    plane = Ha.to(tl.int64) * Wa
    zero = tl.zeros((BLOCK,), dtype=ACC)
    if HAS_OPAC:
        A = tl.load(opac_ptr + p, mask=mask, other=0.0).to(ACC)
    else:
        A = zero + 1.0
    f0, f1, f2 = _load3(frames_ptr, obase, HW, mask, ACC)
    ge0, ge1, ge2 = zero, zero, zero
    gc0, gc1, gc2 = zero, zero, zero
    gg0, gg1, gg2 = zero, zero, zero
    gal = zero
    if HAS_GE:
        ge0, ge1, ge2 = _load3(ge_ptr, obase, HW, mask, ACC)
    if HAS_GC:
        gc0, gc1, gc2 = _load3(gc_ptr, obase, HW, mask, ACC)
    if HAS_GG:
        gg0, gg1, gg2 = _load3(gg_ptr, obase, HW, mask, ACC)
    if HAS_GAL:
        gal = tl.load(gal_ptr + p, mask=mask, other=0.0).to(ACC)
    h0 = gc0 + gg0
    h1 = gc1 + gg1
    h2 = gc2 + gg2
    # da_k = w_k A (base + sum_c C_kc h_c)
    base = gal - (f0 * gc0 + f1 * gc1 + f2 * gc2) - (G0 * gg0 + G1 * gg1 + G2 * gg2)
    sa = zero
    s0, s1, s2 = zero, zero, zero
    wsum = zero
    for k in tl.static_range(4):
        xi = x0 + (k % 2)
        yi = y0 + (k // 2)
        w = (ex if k % 2 == 1 else wx) * (sy if k // 2 == 1 else ny)
        valid = mask & (xi >= 0) & (xi < Wa) & (yi >= 0) & (yi < Ha)
        w = tl.where(valid, w, 0.0)
        off = yi.to(tl.int64) * Wa + xi
        c0 = tl.load(atlas_ptr + off, mask=valid, other=0.0).to(ACC)
        c1 = tl.load(atlas_ptr + plane + off, mask=valid, other=0.0).to(ACC)
        c2 = tl.load(atlas_ptr + 2 * plane + off, mask=valid, other=0.0).to(ACC)
        a = tl.load(atlas_ptr + 3 * plane + off, mask=valid, other=0.0).to(ACC)
        if NEED_DATLAS:
            wAa = w * A * a
            # fp32 atomics: many pixels share a texel; relaxed ordering is enough for a sum.
            tl.atomic_add(datlas_ptr + off, w * ge0 + wAa * h0, mask=valid, sem="relaxed")
            tl.atomic_add(datlas_ptr + plane + off, w * ge1 + wAa * h1, mask=valid, sem="relaxed")
            tl.atomic_add(datlas_ptr + 2 * plane + off, w * ge2 + wAa * h2, mask=valid, sem="relaxed")
            da = w * A * (base + c0 * h0 + c1 * h1 + c2 * h2)
            tl.atomic_add(datlas_ptr + 3 * plane + off, da, mask=valid, sem="relaxed")
        wa = w * a
        sa += wa
        s0 += wa * c0
        s1 += wa * c1
        s2 += wa * c2
        wsum += w
    if NEED_DOPAC:
        dA = gal * sa
        dA += gc0 * (s0 - sa * f0) + gc1 * (s1 - sa * f1) + gc2 * (s2 - sa * f2)
        dA += gg0 * (s0 - sa * G0) + gg1 * (s1 - sa * G1) + gg2 * (s2 - sa * G2)
        tl.store(dopac_ptr + p, dA.to(dopac_ptr.dtype.element_ty), mask=mask)
    if NEED_DFRAMES:
        rest = wsum - A * sa
        ty = dframes_ptr.dtype.element_ty
        tl.store(dframes_ptr + obase, (rest * gc0).to(ty), mask=mask)
        tl.store(dframes_ptr + obase + HW, (rest * gc1).to(ty), mask=mask)
        tl.store(dframes_ptr + obase + 2 * HW, (rest * gc2).to(ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launchers


def _block(x: torch.Tensor, n_pixels: int) -> tuple[int, int]:
    """(BLOCK, num_warps): 256 pixels per program on GPU (gather/atomic bound, many programs hide
    latency); large blocks under the interpreter, whose cost is per program."""
    if on_interpreter(x):
        return min(max(next_pow2(n_pixels), 16), 8192), 4
    return 256, 4


def _atlas_fwd(atlas: torch.Tensor, uv: torch.Tensor, frames: torch.Tensor, opacity: torch.Tensor | None):
    t, h, w, _ = uv.shape
    _, ha, wa = atlas.shape
    if 4 * ha * wa >= 2**31:
        raise ValueError(f"sample_atlas: atlas {ha}x{wa} too large for int32 texel coordinates")
    n_pix = t * h * w
    kw: dict[str, Any] = dict(device=atlas.device, dtype=atlas.dtype)
    edit = torch.empty((t, 3, h, w), **kw)
    alpha = torch.empty((t, 1, h, w), **kw)
    comp = torch.empty((t, 3, h, w), **kw)
    green = torch.empty((t, 3, h, w), **kw)
    block, warps = _block(atlas, n_pix)
    _atlas_fwd_kernel[(triton.cdiv(n_pix, block),)](
        atlas, uv, frames, atlas if opacity is None else opacity, edit, alpha, comp, green,
        n_pix, h * w, ha, wa, G0=GREEN[0], G1=GREEN[1], G2=GREEN[2], HAS_OPAC=opacity is not None,
        ACC=acc_dtype(atlas.dtype), BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return edit, alpha, comp, green


def _atlas_bwd(atlas, uv, frames, opacity, ge, gal, gc, gg, need_atlas, need_frames, need_opac):
    """(datlas, dframes, dopacity), each None when not needed."""
    need_atlas, need_frames, need_opac = _atlas_bwd_needs(
        opacity, ge, gal, gc, gg, need_atlas, need_frames, need_opac
    )
    if not (need_atlas or need_frames or need_opac):
        return None, None, None
    t, h, w, _ = uv.shape
    _, ha, wa = atlas.shape
    n_pix = t * h * w
    acc_t = torch.float64 if atlas.dtype == torch.float64 else torch.float32
    datlas = torch.zeros(atlas.shape, dtype=acc_t, device=atlas.device) if need_atlas else None
    dopac = torch.empty_like(opacity) if need_opac else None
    dframes = torch.empty_like(frames) if need_frames else None
    ge, gal, gc, gg = (None if g is None else g.contiguous() for g in (ge, gal, gc, gg))
    block, warps = _block(atlas, n_pix)

    def ptr(x: torch.Tensor | None) -> torch.Tensor:
        return atlas if x is None else x  # never dereferenced: the matching constexpr flag is off

    _atlas_bwd_kernel[(triton.cdiv(n_pix, block),)](
        atlas, uv, frames, ptr(opacity), ptr(ge), ptr(gal), ptr(gc), ptr(gg),
        ptr(datlas), ptr(dopac), ptr(dframes), n_pix, h * w, ha, wa,
        G0=GREEN[0], G1=GREEN[1], G2=GREEN[2], HAS_OPAC=opacity is not None,
        HAS_GE=ge is not None, HAS_GAL=gal is not None, HAS_GC=gc is not None, HAS_GG=gg is not None,
        NEED_DATLAS=need_atlas, NEED_DOPAC=need_opac, NEED_DFRAMES=need_frames,
        ACC=acc_dtype(atlas.dtype), BLOCK=block, num_warps=warps,
    )  # fmt: skip
    if datlas is not None:
        datlas = datlas.to(atlas.dtype)
    return datlas, dframes, dopac


# ---------------------------------------------------------------------------------------------------
# torch.library custom ops: opaque to torch.compile (no graph break), with fake (shape) and autograd
# implementations. Gradients the op does not produce come back as empty tensors (custom ops return
# no None); the autograd wrapper turns them into None. uv never gets a gradient from this op.


def _contig(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


@torch.library.custom_op(
    "t2l_fast::sample_atlas",
    mutates_args=(),
    schema="(Tensor atlas, Tensor uv, Tensor frames, Tensor? opacity) -> (Tensor, Tensor, Tensor, Tensor)",
)
def _atlas_op(atlas, uv, frames, opacity):
    return _atlas_fwd(atlas.contiguous(), uv.contiguous(), frames.contiguous(), _contig(opacity))


@_atlas_op.register_fake
def _atlas_fake(atlas, uv, frames, opacity):
    t, h, w, _ = uv.shape
    return (
        atlas.new_empty((t, 3, h, w)),
        atlas.new_empty((t, 1, h, w)),
        atlas.new_empty((t, 3, h, w)),
        atlas.new_empty((t, 3, h, w)),
    )


@torch.library.custom_op(
    "t2l_fast::sample_atlas_backward",
    mutates_args=(),
    schema="(Tensor atlas, Tensor uv, Tensor frames, Tensor? opacity, Tensor? ge, Tensor? gal, Tensor? gc, "
    "Tensor? gg, bool need_atlas, bool need_frames, bool need_opac) -> (Tensor, Tensor, Tensor)",
)
def _atlas_bwd_op(atlas, uv, frames, opacity, ge, gal, gc, gg, need_atlas, need_frames, need_opac):
    atlas, uv, frames, opacity = atlas.contiguous(), uv.contiguous(), frames.contiguous(), _contig(opacity)
    datlas, dframes, dopac = _atlas_bwd(
        atlas, uv, frames, opacity, ge, gal, gc, gg, need_atlas, need_frames, need_opac
    )
    empty = atlas.new_empty(0)
    return (
        empty if datlas is None else datlas,
        empty.clone() if dframes is None else dframes,
        empty.clone() if dopac is None else dopac,
    )


def _atlas_bwd_needs(opacity, ge, gal, gc, gg, need_atlas, need_frames, need_opac):
    """Which gradients the backward really produces (the same rule as ``_atlas_bwd``)."""
    if all(g is None for g in (ge, gal, gc, gg)):
        return False, False, False
    return need_atlas, need_frames and gc is not None, need_opac and opacity is not None


@_atlas_bwd_op.register_fake
def _atlas_bwd_fake(atlas, uv, frames, opacity, ge, gal, gc, gg, need_atlas, need_frames, need_opac):
    na, nf, no = _atlas_bwd_needs(opacity, ge, gal, gc, gg, need_atlas, need_frames, need_opac)
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(atlas, memory_format=contiguous) if na else atlas.new_empty(0),
        torch.empty_like(frames, memory_format=contiguous) if nf else atlas.new_empty(0),
        torch.empty_like(opacity, memory_format=contiguous) if no else atlas.new_empty(0),
    )


def _atlas_setup(ctx, inputs, output):
    atlas, uv, frames, opacity = inputs
    ctx.has_opacity = opacity is not None
    ctx.save_for_backward(atlas, uv, frames, *(() if opacity is None else (opacity,)))
    ctx.set_materialize_grads(False)  # absent upstream grads arrive as None and skip their loads


def _atlas_autograd(ctx, ge, gal, gc, gg):
    atlas, uv, frames, *rest = ctx.saved_tensors
    opacity = rest[0] if ctx.has_opacity else None
    need_atlas, _, need_frames, need_opac = ctx.needs_input_grad
    na, nf, no = _atlas_bwd_needs(opacity, ge, gal, gc, gg, need_atlas, need_frames, need_opac)
    if not (na or nf or no):
        return None, None, None, None
    datlas, dframes, dopac = _atlas_bwd_op(atlas, uv, frames, opacity, ge, gal, gc, gg, na, nf, no)
    return (datlas if na else None), None, (dframes if nf else None), (dopac if no else None)


_atlas_op.register_autograd(_atlas_autograd, setup_context=_atlas_setup)


def sample_atlas_triton(
    atlas: torch.Tensor,
    uv: torch.Tensor,
    frames: torch.Tensor,
    opacity: torch.Tensor | None = None,
) -> AtlasSampleOut:
    """The Triton path of :func:`sample_atlas`, without dispatch (tests, benchmarks). ``uv`` gets no
    gradient."""
    _check(atlas, uv, frames, opacity)
    return AtlasSampleOut(*_atlas_op(atlas, uv, frames, opacity))


def sample_atlas(
    atlas: torch.Tensor,
    uv: torch.Tensor,
    frames: torch.Tensor,
    opacity: torch.Tensor | None = None,
) -> AtlasSampleOut:
    """Sample the edit atlas into the frames and composite; see the module docstring.

    atlas (4, Ha, Wa), uv (T, H, W, 2), frames (T, 3, H, W), opacity (T, H, W) or None ->
    AtlasSampleOut(edit (T, 3, H, W), alpha (T, 1, H, W), composite, greenscreen (T, 3, H, W)), all in
    the atlas dtype.
    """
    _check(atlas, uv, frames, opacity)
    tensors = (atlas, uv, frames) + (() if opacity is None else (opacity,))
    if (
        use_triton(*tensors)
        and uv.numel() > 0
        and atlas.numel() > 0
        and all(x.dtype in FLOAT_DTYPES for x in tensors)
    ):
        if not (uv.requires_grad and torch.is_grad_enabled()):
            return sample_atlas_triton(atlas, uv, frames, opacity)
        if forced("triton"):
            raise KernelUnavailable(f"{ENV_VAR}=triton but the Triton sample_atlas gives no gradient to uv")
    return sample_atlas_reference(atlas, uv, frames, opacity)
