"""Triton composite_rgba (forward and backward) against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, assert_close
from t2l_fast.kernels.composite import (
    CompositeOut,
    composite_rgba,
    composite_rgba_reference,
    composite_rgba_triton,
)

SHAPES = [(1, 1, 1), (2, 5, 7), (3, 13, 19)]  # (B, H, W): odd, non-power-of-two


def _inputs(b: int, h: int, w: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    rgba = torch.rand(b, 4, h, w, generator=g).to(device=device, dtype=dtype)
    bg = torch.rand(b, 3, h, w, generator=g).to(device=device, dtype=dtype)
    return rgba, bg


def _check_against_reference(rgba, bg, dtype, weights=(1, 1, 1, 1), need_bg=True) -> None:
    x = rgba.detach().clone().requires_grad_()
    y = bg.detach().clone().requires_grad_(need_bg)
    xr = rgba.detach().float().requires_grad_()
    yr = bg.detach().float().requires_grad_(need_bg)
    out = composite_rgba_triton(x, y)
    ref = composite_rgba_reference(xr, yr)
    assert isinstance(out, CompositeOut)
    assert out.composite.dtype == dtype and out.greenscreen.dtype == dtype
    assert out.alpha_l1.dtype == torch.float32 and out.alpha_l1.shape == (rgba.shape[0],)
    for o, r in zip(out, ref, strict=True):
        assert o.shape == r.shape
        assert_close(o, r, dtype)
    g = torch.Generator().manual_seed(1)
    ups = [torch.randn(r.shape, generator=g).to(r.device) * wt for r, wt in zip(ref, weights, strict=True)]
    loss = sum((o.float() * u).sum() for o, u, wt in zip(out, ups, weights, strict=True) if wt)
    loss_r = sum((r * u).sum() for r, u, wt in zip(ref, ups, weights, strict=True) if wt)
    loss.backward()
    loss_r.backward()
    assert_close(x.grad, xr.grad, dtype)
    if need_bg:
        if weights[0]:
            assert_close(y.grad, yr.grad, dtype)
        else:
            assert y.grad is None or torch.count_nonzero(y.grad) == 0
    else:
        assert y.grad is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(shape, dtype, device) -> None:
    rgba, bg = _inputs(*shape, dtype, device)
    _check_against_reference(rgba, bg, dtype)


def test_alpha_at_zero_and_one(device) -> None:
    rgba, bg = _inputs(2, 6, 9, torch.float32, device)
    rgba[:, 3] = (torch.arange(54, device=device).view(6, 9) % 2).float()  # exactly 0 or 1
    rgba[1, 3] = 0.0
    _check_against_reference(rgba, bg, torch.float32)


@pytest.mark.parametrize("weights", [(1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 1), (1, 1, 0, 0)], ids=str)
def test_subset_of_outputs_used(weights, device) -> None:
    """Unused outputs give None upstream grads; the kernel must skip them, not read garbage."""
    rgba, bg = _inputs(2, 5, 3, torch.float32, device)
    _check_against_reference(rgba, bg, torch.float32, weights=weights)


def test_background_without_grad(device) -> None:
    rgba, bg = _inputs(1, 7, 5, torch.float32, device)
    _check_against_reference(rgba, bg, torch.float32, need_bg=False)


def test_multiple_blocks_and_noncontiguous(device) -> None:
    # 131 x 129 pixels span several interpreter blocks; a channels-last input exercises .contiguous().
    rgba, bg = _inputs(1, 131, 129, torch.float32, device)
    _check_against_reference(rgba.to(memory_format=torch.channels_last), bg, torch.float32)


def test_gradcheck_float64(device) -> None:
    rgba, bg = _inputs(2, 2, 3, torch.float64, device)
    rgba.requires_grad_()
    bg.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a, b: tuple(composite_rgba_triton(a, b)), (rgba, bg), fast_mode=True
    )


def test_public_function_and_empty_batch(device) -> None:
    rgba, bg = _inputs(2, 4, 3, torch.float32, device)
    for o, r in zip(composite_rgba(rgba, bg), composite_rgba_reference(rgba, bg), strict=True):
        assert_close(o, r, torch.float32)
    empty = composite_rgba(rgba[:0], bg[:0])
    assert empty.composite.shape == (0, 3, 4, 3) and empty.alpha_l1.shape == (0,)
    with pytest.raises(ValueError, match="background"):
        composite_rgba(rgba, bg[:, :2])
