"""Triton sample_atlas (forward and backward) against the grid_sample-based torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, assert_close
from t2l_fast.kernels.atlas_sample import (
    AtlasSampleOut,
    sample_atlas,
    sample_atlas_reference,
    sample_atlas_triton,
)

# (T, H, W, Ha, Wa): odd sizes; the last has an atlas smaller than the frame (many pixels per texel,
# so the atomic gradient accumulation sees heavy contention).
SHAPES = [(1, 1, 1, 1, 1), (2, 7, 9, 11, 13), (3, 5, 6, 3, 4)]


def _inputs(t, h, w, ha, wa, dtype, device, opacity: bool, uv_range: float = 1.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    atlas = torch.rand(4, ha, wa, generator=g).to(device=device, dtype=dtype)
    uv = (torch.rand(t, h, w, 2, generator=g) * 2 - 1) * uv_range  # partly outside [-1, 1]
    frames = torch.rand(t, 3, h, w, generator=g)
    op = torch.rand(t, h, w, generator=g).to(device) if opacity else None
    return atlas, uv.to(device), frames.to(device), op


def _check(atlas, uv, frames, opacity, dtype, weights=(1, 1, 1, 1)) -> None:
    leaf = lambda x, dt=None: None if x is None else x.detach().to(dt or x.dtype).clone().requires_grad_()  # noqa: E731
    x, fr, op = leaf(atlas), leaf(frames), leaf(opacity)
    xr, frr, opr = leaf(atlas, torch.float32), leaf(frames, torch.float32), leaf(opacity, torch.float32)
    out = sample_atlas_triton(x, uv, fr, op)
    ref = sample_atlas_reference(xr, uv, frr, opr)
    assert isinstance(out, AtlasSampleOut)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape and o.dtype == dtype
        assert_close(o, r, dtype)
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(r.shape, generator=g).to(r.device) * wt for r, wt in zip(ref, weights, strict=True)]
    sum((o.float() * u).sum() for o, u, wt in zip(out, ups, weights, strict=True) if wt).backward()
    sum((r * u).sum() for r, u, wt in zip(ref, ups, weights, strict=True) if wt).backward()
    # Each texel gathers up to (pixels per texel) * 4 contributions: scale atol with the gradient size.
    scale = max(1.0, xr.grad.abs().max().item())
    assert_close(x.grad, xr.grad, dtype, scale=scale)
    if weights[2]:
        assert_close(fr.grad, frr.grad, dtype)  # upstream grads arrive in the output dtype
    if opacity is not None and opr.grad is None:  # only the edit colour used: it ignores the opacity
        assert op.grad is None or torch.count_nonzero(op.grad) == 0
    elif opacity is not None:
        assert_close(op.grad, opr.grad, dtype, scale=10)


@pytest.mark.parametrize("opacity", [False, True], ids=["no_opacity", "opacity"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, dtype, opacity, device) -> None:
    atlas, uv, frames, op = _inputs(*shape, dtype, device, opacity)
    _check(atlas, uv, frames, op, dtype)


def test_uv_on_texel_centres_borders_and_far_outside(device) -> None:
    t, h, w, ha, wa = 1, 4, 12, 5, 6
    atlas, _, frames, op = _inputs(t, h, w, ha, wa, torch.float32, device, True)
    i = torch.arange(-2, wa + 2, dtype=torch.float32)
    centres = (2 * i + 1) / wa - 1  # ix integer: exactly on a texel (other weight 0)
    edges = 2 * i / wa - 1  # ix = i - 1/2: half-way, incl. exactly -1 and 1
    xs = torch.cat([centres, edges])[:w]
    ys = torch.tensor([-1.0, 1.0, 1.0 / ha - 1.0, 40.0])  # borders, first texel centre, far outside
    uv = torch.stack(torch.broadcast_tensors(xs.view(1, w), ys.view(h, 1)), dim=-1).unsqueeze(0)
    uv[0, 3, :3] = torch.tensor([[-1e9, 0.0], [1e9, 1e9], [-1e30, 0.5]])  # huge (non-finite: unspecified)
    _check(atlas, uv.to(device), frames, op, torch.float32)


def test_alpha_at_zero_and_one(device) -> None:
    atlas, uv, frames, op = _inputs(2, 5, 7, 6, 5, torch.float32, device, True)
    atlas[3] = (torch.arange(30, device=device).view(6, 5) % 2).float()
    op[0] = 1.0
    op[1, :2] = 0.0
    _check(atlas, uv, frames, op, torch.float32)


@pytest.mark.parametrize("weights", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1)], ids=str)
def test_subset_of_outputs_used(weights, device) -> None:
    atlas, uv, frames, op = _inputs(2, 4, 5, 6, 7, torch.float32, device, True)
    _check(atlas, uv, frames, op, torch.float32, weights=weights)


def test_frames_and_opacity_without_grad(device) -> None:
    atlas, uv, frames, op = _inputs(1, 6, 5, 4, 7, torch.float32, device, True)
    x = atlas.clone().requires_grad_()
    sum(o.sum() for o in sample_atlas_triton(x, uv, frames, op)).backward()
    xr = atlas.clone().requires_grad_()
    sum(o.sum() for o in sample_atlas_reference(xr, uv, frames, op)).backward()
    assert_close(x.grad, xr.grad, torch.float32, scale=10)


def test_multiple_blocks(device) -> None:
    # 3 x 61 x 53 pixels > one interpreter block of 8192.
    atlas, uv, frames, op = _inputs(3, 61, 53, 17, 23, torch.float32, device, True)
    _check(atlas, uv, frames, op, torch.float32)


def test_gradcheck_float64(device) -> None:
    atlas, uv, frames, op = _inputs(2, 3, 4, 3, 5, torch.float64, device, True)
    atlas = atlas.requires_grad_()
    frames = frames.double().requires_grad_()
    op = op.double().requires_grad_()
    fn = lambda a, f, o: tuple(sample_atlas_triton(a, uv.double(), f, o))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (atlas, frames, op), fast_mode=True)
    fn_no_op = lambda a: tuple(sample_atlas_triton(a, uv.double(), frames.detach(), None))  # noqa: E731
    assert torch.autograd.gradcheck(fn_no_op, (atlas,), fast_mode=True)


def test_public_function_uv_grad_and_empty(device) -> None:
    atlas, uv, frames, op = _inputs(1, 3, 4, 5, 6, torch.float32, device, False)
    for o, r in zip(sample_atlas(atlas, uv, frames), sample_atlas_reference(atlas, uv, frames), strict=True):
        assert_close(o, r, torch.float32)
    # The kernel gives uv no gradient: when uv asks for one the dispatcher uses the reference.
    uv_g = uv.clone().requires_grad_()
    sample_atlas(atlas, uv_g, frames).composite.sum().backward()
    assert uv_g.grad is not None
    empty = sample_atlas(atlas, uv[:0], frames[:0])
    assert empty.composite.shape == (0, 3, 3, 4)
    with pytest.raises(ValueError, match="frames"):
        sample_atlas(atlas, uv, frames[:, :2])
