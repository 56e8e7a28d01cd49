"""The fused ops under torch.compile: custom ops (no graph break), same values and gradients as the
references, the implementation fixed when a region is traced, and consistent op registrations.

Runs the Triton path (CUDA, or the interpreter on CPU: ``TRITON_INTERPRET=1``); ``aot_eager`` traces
forward and backward through dynamo and AOT autograd without generating code, so it runs on any CPU.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch._dynamo
import torch._dynamo.utils
from t2l_fast.kernels import (
    composite_rgba,
    composite_rgba_reference,
    implementation,
    sample_atlas,
    sample_atlas_reference,
    self_similarity,
    self_similarity_mse,
    self_similarity_mse_reference,
    self_similarity_reference,
)

composite_mod = importlib.import_module("t2l_fast.kernels.composite")
ssim_mod = importlib.import_module("t2l_fast.kernels.self_similarity")
atlas_mod = importlib.import_module("t2l_fast.kernels.atlas_sample")


def _inputs(device):
    g = torch.Generator().manual_seed(0)
    rgba = torch.rand(2, 4, 9, 13, generator=g).to(device).requires_grad_()
    bg = torch.rand(2, 3, 9, 13, generator=g).to(device).requires_grad_()
    tokens = torch.randn(2, 7, 20, generator=g).to(device).requires_grad_()
    target = (torch.rand(2, 7, 7, generator=g) * 2 - 1).to(device)
    atlas = torch.rand(4, 11, 17, generator=g).to(device).requires_grad_()
    uv = (torch.rand(2, 6, 5, 2, generator=g) * 2.2 - 1.1).to(device)  # some taps outside the atlas
    frames = torch.rand(2, 3, 6, 5, generator=g).to(device).requires_grad_()
    opacity = torch.rand(2, 6, 5, generator=g).to(device).requires_grad_()
    return rgba, bg, tokens, target, atlas, uv, frames, opacity


def _objective(ops, rgba, bg, tokens, target, atlas, uv, frames, opacity):
    """A scalar using every output of every fused op, with nontrivial upstream gradients."""
    comp, ss, ss_mse, samp = ops
    c = comp(rgba, bg)
    s = samp(atlas, uv, frames, opacity)
    w = torch.linspace(0.5, 1.5, c.composite.numel(), device=rgba.device).view_as(c.composite)
    total = (w * c.composite).sum() + (c.greenscreen**2).mean() + c.alpha_l1.sum() + 2 * c.alpha_l0.sum()
    total = total + (ss(tokens) ** 2).mean() + 3 * ss_mse(tokens, target)
    total = total + s.edit.mean() + (s.alpha**2).sum() + (s.composite * s.greenscreen).mean()
    return total


PUBLIC = (composite_rgba, self_similarity, self_similarity_mse, sample_atlas)
REFERENCE = (
    composite_rgba_reference,
    self_similarity_reference,
    self_similarity_mse_reference,
    sample_atlas_reference,
)


def _value_and_grads(fn, inputs):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward()
    return out.detach(), [x.grad.clone() for x in inputs if x.requires_grad]


def _forbid(monkeypatch, module, *names):
    def boom(*args, **kwargs):
        raise AssertionError("wrong path")

    for name in names:
        monkeypatch.setattr(module, name, boom)


def test_fused_ops_compile_fullgraph_and_match_the_reference(device, monkeypatch):
    """torch.compile(fullgraph=True) over the public ops on the Triton path: no graph break (it would
    raise), the custom ops in the graph, and outputs and gradients equal to the eager references."""
    inputs = _inputs(device)
    want, want_grads = _value_and_grads(lambda *a: _objective(REFERENCE, *a), inputs)

    # The references must not run: the compiled region takes the Triton custom ops.
    _forbid(monkeypatch, composite_mod, "composite_rgba_reference")
    _forbid(monkeypatch, ssim_mod, "self_similarity_reference", "self_similarity_mse_reference")
    _forbid(monkeypatch, atlas_mod, "sample_atlas_reference")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        keep = lambda g, _: make_boxed_func(g.forward)  # noqa: E731 - run the traced graphs as they are
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    with implementation("triton"):
        compiled = torch.compile(lambda *a: _objective(PUBLIC, *a), backend=backend, fullgraph=True)
        got, got_grads = _value_and_grads(compiled, inputs)
    assert len(graphs) == 1 and not torch._dynamo.utils.counters["graph_break"]
    code = graphs[0].code
    for op in ("composite_rgba", "self_similarity", "self_similarity_mse", "sample_atlas"):
        assert f"t2l_fast.{op}" in code, op
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=2e-5, atol=2e-5)


def test_reference_path_compiles_without_graph_break(device, monkeypatch):
    _forbid(monkeypatch, composite_mod, "composite_rgba_triton")
    _forbid(monkeypatch, ssim_mod, "self_similarity_triton", "self_similarity_mse_triton")
    _forbid(monkeypatch, atlas_mod, "sample_atlas_triton")
    inputs = _inputs(device)
    want, want_grads = _value_and_grads(lambda *a: _objective(REFERENCE, *a), inputs)
    torch._dynamo.reset()
    with implementation("torch"):
        compiled = torch.compile(lambda *a: _objective(PUBLIC, *a), backend="aot_eager", fullgraph=True)
        got, got_grads = _value_and_grads(compiled, inputs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)


def test_the_choice_is_fixed_when_the_region_is_traced(device):
    """Once per run: a compiled region keeps the implementation it was traced with (no per-call
    dispatch, no guard); torch._dynamo.reset() lets the next trace choose again."""
    rgba, bg = _inputs(device)[:2]
    seen = []

    def backend(gm, example_inputs):
        seen.append("t2l_fast.composite_rgba" in gm.code)
        return gm.forward

    fn = torch.compile(lambda r, b: composite_rgba(r, b).composite.sum(), backend=backend, fullgraph=True)
    torch._dynamo.reset()
    with torch.no_grad(), implementation("triton"):
        fn(rgba, bg)
    with torch.no_grad(), implementation("torch"):
        fn(rgba, bg)  # same region: no retrace
    assert seen == [True]
    torch._dynamo.reset()
    with torch.no_grad(), implementation("torch"):
        fn(rgba, bg)
    assert seen == [True, False]


@pytest.mark.parametrize(
    "op, make",
    [
        ("composite_rgba", lambda i: (i[0], i[1])),
        ("self_similarity", lambda i: (i[2],)),
        ("self_similarity_mse", lambda i: (i[2], i[3])),
        ("sample_atlas", lambda i: (i[4], i[5], i[6], i[7])),
        ("sample_atlas", lambda i: (i[4], i[5], i[6], None)),
    ],
)
def test_op_registrations_are_consistent(device, op, make):
    """torch.library.opcheck: schema, fake (shape) implementation, autograd registration and
    dispatch agree with what the op really does."""
    args = make(_inputs(device))
    # The fp32 atomic accumulation of sample_atlas is not bitwise reproducible run to run; its
    # gradient is compared with the reference in test_atlas_sample, so skip only the aot_dispatch test.
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(getattr(torch.ops.t2l_fast, op).default, args, test_utils=tests)


def test_fused_ops_do_not_break_the_objective(tiny_clip):
    """The objective (t2l_fast.losses), traced through its public call: the fused ops it calls add
    no graph break (breaks elsewhere, e.g. host-side random draws, are the objective's own)."""
    from t2l_fast.losses import Layers
    from t2l_fast.objective import Objective
    from tests.conftest import small_config

    cfg = small_config()
    cfg.roi_prompt = "cat"
    objective = Objective(tiny_clip, cfg, batched=True)
    g = torch.Generator().manual_seed(0)
    source = torch.rand(2, 3, 140, 170, generator=g)
    rgba = torch.rand(2, 4, 140, 170, generator=g).requires_grad_()

    def call(rgba, source):
        layers = Layers.from_rgba(rgba, source)
        return objective(layers, 0, torch.Generator().manual_seed(1), cache_key=None)["loss"]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(call)(rgba, source)
    kernels_dir = Path(composite_mod.__file__).resolve().parent
    kernel_breaks = [
        reason
        for reason in explanation.break_reasons
        if any(Path(frame.filename).resolve().parent == kernels_dir for frame in reason.user_stack)
    ]
    assert not kernel_breaks, [str(r.reason)[:300] for r in kernel_breaks]
    # Layers.from_rgba alone (the composite at the top of every step) is one graph.
    torch._dynamo.reset()
    whole = torch.compile(
        lambda r, s: Layers.from_rgba(r, s).composite.sum(), backend="aot_eager", fullgraph=True
    )
    whole(rgba, source).backward()
    assert rgba.grad is not None
