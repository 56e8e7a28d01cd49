"""Triton self_similarity / self_similarity_mse (forward and backward) against the torch reference."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import DTYPES, assert_close
from t2l_fast.kernels.self_similarity import (
    self_similarity,
    self_similarity_mse,
    self_similarity_mse_reference,
    self_similarity_mse_triton,
    self_similarity_reference,
    self_similarity_triton,
)

# (B, K, D): odd sizes; K=150 spans two 128-row interpreter tiles, K=5 is below tl.dot's 16-minimum.
SHAPES = [(1, 5, 7), (2, 37, 50), (2, 150, 33)]


def _tokens(b: int, k: int, d: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, k, d, generator=g) + 0.3).to(device=device, dtype=dtype)


def _target(b: int, k: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return (torch.rand(b, k, k, generator=g) * 2 - 1).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_self_similarity(shape, dtype, device) -> None:
    tokens = _tokens(*shape, dtype, device)
    x = tokens.detach().clone().requires_grad_()
    xr = tokens.detach().float().clone().requires_grad_()
    s = self_similarity_triton(x)
    sr = self_similarity_reference(xr)
    assert s.dtype == torch.float32 and s.shape == sr.shape
    # Similarities are in [-1, 1]; low-precision inputs are exact in fp32 products, so fp32 tolerance
    # up to the summation order (a little wider than fp32 element-wise ops).
    assert_close(s, sr, torch.float32, scale=10)
    # A non-symmetric upstream gradient exercises the G + G^T path.
    up = torch.randn(s.shape, generator=torch.Generator().manual_seed(3)).to(device)
    (s * up).sum().backward()
    (sr * up).sum().backward()
    assert_close(x.grad, xr.grad, dtype, scale=10)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_self_similarity_mse(shape, dtype, device) -> None:
    tokens = _tokens(*shape, dtype, device)
    target = _target(shape[0], shape[1], device)
    x = tokens.detach().clone().requires_grad_()
    xr = tokens.detach().float().clone().requires_grad_()
    loss = self_similarity_mse_triton(x, target)
    loss_r = self_similarity_mse_reference(xr, target)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert_close(loss, loss_r, torch.float32, scale=10)
    (3.0 * loss).backward()
    (3.0 * loss_r).backward()
    scale = xr.grad.abs().max().item() * 10  # gradients are O(1 / (B K K)): atol relative to them
    assert_close(x.grad, xr.grad, dtype, scale=scale)


def test_target_gradient(device) -> None:
    """The target is documented as constant, but if it asks for a gradient it gets the right one."""
    tokens = _tokens(2, 19, 24, torch.float32, device)
    target = _target(2, 19, device)
    t1, t2 = target.clone().requires_grad_(), target.clone().requires_grad_()
    self_similarity_mse_triton(tokens, t1).backward()
    self_similarity_mse_reference(tokens, t2).backward()
    assert_close(t1.grad, t2.grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_zero_norm_tokens(dtype, device) -> None:
    """|t_i| |t_j| < 1e-8 clamps the denominator: S row 0, and the gradient of a zero token is t_j / eps."""
    tokens = _tokens(1, 21, 17, dtype, device)
    tokens[0, 2] = 0
    tokens[0, 9] = 0
    target = _target(1, 21, device)
    x = tokens.detach().clone().requires_grad_()
    xr = tokens.detach().float().clone().requires_grad_()
    s = self_similarity_triton(x)
    sr = self_similarity_reference(xr)
    assert_close(s, sr, torch.float32, scale=10)
    assert torch.all(s[0, 2] == 0) and torch.all(s[0, :, 9] == 0)
    x2 = tokens.detach().clone().requires_grad_()
    xr2 = tokens.detach().float().clone().requires_grad_()
    self_similarity_mse_triton(x2, target).backward()
    self_similarity_mse_reference(xr2, target).backward()
    zero = torch.zeros(21, dtype=torch.bool, device=device)
    zero[[2, 9]] = True
    # The zero rows' gradients are huge (1/eps): compare them relative to their size.
    big = xr2.grad[0, zero]
    assert_close(x2.grad[0, zero], big, dtype, scale=big.abs().max().item() * 10)
    rest = xr2.grad[0, ~zero]
    assert_close(x2.grad[0, ~zero], rest, dtype, scale=rest.abs().max().item() * 10)


def test_gradcheck_float64(device) -> None:
    tokens = _tokens(2, 6, 5, torch.float64, device).requires_grad_()
    target = _target(2, 6, device).double().requires_grad_()
    assert torch.autograd.gradcheck(self_similarity_triton, (tokens,), fast_mode=True)
    assert torch.autograd.gradcheck(self_similarity_mse_triton, (tokens, target), fast_mode=True)


def test_public_functions(device) -> None:
    tokens = _tokens(1, 9, 11, torch.float32, device)
    target = _target(1, 9, device)
    assert_close(self_similarity(tokens), self_similarity_reference(tokens), torch.float32)
    assert_close(
        self_similarity_mse(tokens, target), self_similarity_mse_reference(tokens, target), torch.float32
    )
    with pytest.raises(ValueError, match="target"):
        self_similarity_mse(tokens, target[:, :3])
