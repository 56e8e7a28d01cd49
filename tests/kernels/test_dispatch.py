"""The dispatcher: Triton for CUDA / interpreter tensors, the reference otherwise, T2L_KERNELS overrides."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from t2l_fast.kernels import KernelUnavailable, triton_blockers, use_triton

composite_mod = importlib.import_module("t2l_fast.kernels.composite")
ssim_mod = importlib.import_module("t2l_fast.kernels.self_similarity")
atlas_mod = importlib.import_module("t2l_fast.kernels.atlas_sample")

# Run in a fresh interpreter without TRITON_INTERPRET: the switch is read when Triton is imported.
PLAIN_CPU_CHECK = textwrap.dedent(
    """
    import os, torch
    import t2l_fast.kernels as K
    import importlib
    comp = importlib.import_module("t2l_fast.kernels.composite")
    ssim = importlib.import_module("t2l_fast.kernels.self_similarity")
    atlas = importlib.import_module("t2l_fast.kernels.atlas_sample")

    def boom(*args, **kwargs):
        raise AssertionError("the Triton path ran on plain CPU")

    comp.composite_rgba_triton = boom
    ssim.self_similarity_triton = ssim.self_similarity_mse_triton = boom
    atlas.sample_atlas_triton = boom

    rgba, bg = torch.rand(1, 4, 3, 5), torch.rand(1, 3, 3, 5)
    tokens, target = torch.randn(2, 6, 8), torch.rand(2, 6, 6)
    a, uv, frames = torch.rand(4, 5, 6), torch.rand(2, 3, 4, 2) * 2 - 1, torch.rand(2, 3, 3, 4)
    calls = [
        (K.composite_rgba, (rgba, bg), K.composite_rgba_reference),
        (K.self_similarity, (tokens,), K.self_similarity_reference),
        (K.self_similarity_mse, (tokens, target), K.self_similarity_mse_reference),
        (K.sample_atlas, (a, uv, frames), K.sample_atlas_reference),
    ]
    os.environ.pop("T2L_KERNELS", None)
    assert not K.use_triton(rgba)
    for fn, args, ref in calls:
        got, want = fn(*args), ref(*args)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), fn.__name__
    os.environ["T2L_KERNELS"] = "triton"
    for fn, args, _ in calls:
        try:
            fn(*args)
        except K.KernelUnavailable as exc:
            assert "TRITON_INTERPRET=1" in str(exc) and "T2L_KERNELS=triton" in str(exc), str(exc)
        else:
            raise AssertionError(f"{fn.__name__}: forced Triton on plain CPU did not raise")
    print("PLAIN-CPU-OK")
    """
)


def test_plain_cpu_falls_back_and_forced_triton_raises() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "T2L_KERNELS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_CPU_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PLAIN-CPU-OK" in proc.stdout


def test_invalid_mode_is_an_error(monkeypatch) -> None:
    monkeypatch.setenv("T2L_KERNELS", "cuda")
    with pytest.raises(ValueError, match="T2L_KERNELS"):
        use_triton(torch.zeros(1))


def test_meta_tensors_are_blocked(monkeypatch) -> None:
    reasons = triton_blockers(torch.zeros(1, device="meta"))
    assert reasons and "meta" in reasons[0]
    monkeypatch.setenv("T2L_KERNELS", "triton")
    with pytest.raises(KernelUnavailable, match="meta"):
        use_triton(torch.zeros(1, device="meta"))


def _forbid(monkeypatch, module, *names: str) -> None:
    def boom(*args, **kwargs):
        raise AssertionError("wrong path")

    for name in names:
        monkeypatch.setattr(module, name, boom)


def _call_every_op(device) -> None:
    """Each public op once, on tiny inputs."""
    composite_mod.composite_rgba(torch.rand(1, 4, 2, 3, device=device), torch.rand(1, 3, 2, 3, device=device))
    tokens = torch.randn(1, 4, 5, device=device)
    ssim_mod.self_similarity(tokens)
    ssim_mod.self_similarity_mse(tokens, torch.rand(1, 4, 4, device=device))
    uv = torch.rand(1, 2, 3, 2, device=device) * 2 - 1
    atlas_mod.sample_atlas(torch.rand(4, 3, 3, device=device), uv, torch.rand(1, 3, 2, 3, device=device))


@pytest.mark.parametrize("mode", ["auto", "triton"])
def test_triton_path_taken(mode, monkeypatch, device) -> None:
    monkeypatch.setenv("T2L_KERNELS", mode)
    _forbid(monkeypatch, composite_mod, "composite_rgba_reference")
    _forbid(monkeypatch, ssim_mod, "self_similarity_reference", "self_similarity_mse_reference")
    _forbid(monkeypatch, atlas_mod, "sample_atlas_reference")
    _call_every_op(device)


def test_torch_mode_takes_the_reference(monkeypatch, device) -> None:
    monkeypatch.setenv("T2L_KERNELS", "torch")
    _forbid(monkeypatch, composite_mod, "composite_rgba_triton")
    _forbid(monkeypatch, ssim_mod, "self_similarity_triton", "self_similarity_mse_triton")
    _forbid(monkeypatch, atlas_mod, "sample_atlas_triton")
    _call_every_op(device)


def test_forced_triton_refuses_uv_gradient(monkeypatch, device) -> None:
    monkeypatch.setenv("T2L_KERNELS", "triton")
    uv = (torch.rand(1, 2, 3, 2, device=device) * 2 - 1).requires_grad_()
    with pytest.raises(KernelUnavailable, match="uv"):
        atlas_mod.sample_atlas(torch.rand(4, 3, 3, device=device), uv, torch.rand(1, 3, 2, 3, device=device))
