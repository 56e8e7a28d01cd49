"""Quality guard of the fast path: same losses and gradients as the reference mode, the same
optimisation behaviour, bounded recompiles, and the NaN guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2l_fast import ImageEditor
from t2l_fast.config import RuntimeConfig
from t2l_fast.losses import Layers, Objective
from t2l_fast.pipeline.engine import Engine
from tests.conftest import small_config


def _fixed_views(cfg):
    """Augmentations on but with dropout-free CLIP (CLIP has none) and every random draw seeded."""
    cfg.roi_prompt = "cat"
    cfg.views.n_aug = 3
    return cfg


def _losses_and_grad(objective, rgba, source, autocast=None):
    rgba = rgba.clone().requires_grad_(True)
    ctx = torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        terms = objective(Layers.from_rgba(rgba, source), step=0, gen=torch.Generator().manual_seed(3))
    terms["loss"].backward()
    return {k: float(v.detach()) for k, v in terms.items()}, rgba.grad


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    source = torch.rand(3, 3, 140, 170, generator=g)  # three examples: batched across examples too
    rgba = torch.rand(3, 4, 140, 170, generator=g)
    return source, rgba


def test_fast_path_matches_reference_mode_in_fp32(tiny_clip, batch):
    source, rgba = batch
    cfg = _fixed_views(small_config())
    ref_terms, ref_grad = _losses_and_grad(Objective(tiny_clip, cfg, batched=False), rgba, source)
    fast_terms, fast_grad = _losses_and_grad(Objective(tiny_clip, cfg, batched=True), rgba, source)
    assert set(ref_terms) == set(fast_terms) and "comp_dir" in ref_terms and "bootstrap" in ref_terms
    for k in ref_terms:
        assert fast_terms[k] == pytest.approx(ref_terms[k], rel=1e-4, abs=1e-6), k
    torch.testing.assert_close(fast_grad, ref_grad, rtol=1e-3, atol=1e-6)


def test_fast_path_in_bf16_matches_reference_within_bf16_tolerance(tiny_clip, batch):
    source, rgba = batch
    cfg = _fixed_views(small_config())
    ref_terms, ref_grad = _losses_and_grad(Objective(tiny_clip, cfg, batched=False), rgba, source)
    bf_terms, bf_grad = _losses_and_grad(
        Objective(tiny_clip, cfg, batched=True), rgba, source, torch.bfloat16
    )
    for k in ref_terms:
        assert bf_terms[k] == pytest.approx(ref_terms[k], rel=5e-2, abs=2e-3), k
    cos = torch.nn.functional.cosine_similarity(bf_grad.flatten(), ref_grad.flatten(), dim=0)
    assert float(cos) > 0.98


def test_source_side_results_are_reused_for_a_repeated_key(tiny_clip, batch, monkeypatch):
    source, rgba = batch
    cfg = _fixed_views(small_config())
    objective = Objective(tiny_clip, cfg, batched=True)
    calls = {"relevancy": 0}
    original = objective.relevancy

    def counting(src):
        calls["relevancy"] += 1
        return original(src)

    monkeypatch.setattr(objective, "relevancy", counting)
    layers = Layers.from_rgba(rgba, source)
    a = objective(layers, 0, torch.Generator().manual_seed(0), cache_key=("source",))
    b = objective(layers, 0, torch.Generator().manual_seed(0), cache_key=("source",))
    assert calls["relevancy"] == 1
    assert float(a["loss"]) == pytest.approx(float(b["loss"]))


def _fixed_problem(steps, mode):
    cfg = small_config(steps=steps)
    cfg.data.source_every = 1000  # every example is the whole image: augmentation-free inputs
    cfg.data.crop_min_cover = 1.0
    cfg.data.scale_min = cfg.data.scale_max = 1.0
    cfg.data.flip_p = cfg.data.jitter_p = 0.0
    cfg.optim.lr = 1e-2
    cfg.runtime.mode = mode
    cfg.runtime.compile = "off"
    cfg.runtime.bucket = 1
    return cfg


def test_fast_mode_reduces_the_objective_like_reference_mode(tiny_clip, image):
    histories = {}
    for mode in ("reference", "fast"):
        cfg = _fixed_problem(10, mode)
        cfg.views.min_cover = 1.0  # every view the whole image, no view augmentation: a steady objective
        cfg.views.flip_p = cfg.views.affine_p = cfg.views.perspective_p = 0.0
        cfg.views.jitter_p = cfg.views.grayscale_p = 0.0
        editor = ImageEditor(cfg, device="cpu", clip=tiny_clip)
        result = editor(image)
        assert editor.engine.mode == mode
        histories[mode] = np.array([r["loss"] for r in result.losses])
    for losses in histories.values():
        assert losses[-3:].mean() < losses[:3].mean()
    # same random draws, fp32 on both sides: the two runs follow the same trajectory
    np.testing.assert_allclose(histories["fast"], histories["reference"], rtol=1e-2)


def _unique_graphs(cfg, tiny_clip, image):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    ImageEditor(cfg, device="cpu", clip=tiny_clip)(image)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def test_recompiles_stay_bounded_with_varying_crop_sizes(tiny_clip):
    image = torch.rand(3, 200, 260)
    cfg = small_config(steps=8)
    cfg.data.size = 0
    cfg.data.source_every = 4
    cfg.runtime.mode = "fast"
    cfg.runtime.compile = "on"
    cfg.runtime.compile_backend = "aot_eager"  # dynamo + AOT autograd, without code generation
    graphs = _unique_graphs(cfg, tiny_clip, image)
    # generator: static first shape + one dynamic recompile; CLIP: views and structure tokens,
    # with and without gradient
    assert 0 < graphs <= 8


def test_engine_resolution():
    cpu = torch.device("cpu")
    e = Engine(RuntimeConfig(), cpu)
    assert e.mode == "reference" and e.amp_dtype is None and not e.compile and e.bucket == 1
    e = Engine(RuntimeConfig(mode="fast", precision="bf16"), cpu)
    assert e.fast and e.amp_dtype == torch.bfloat16 and not e.compile and e.bucket == 64
    e = Engine(RuntimeConfig(mode="reference", precision="bf16"), cpu)
    assert e.amp_dtype is None  # the baseline is always fp32
    e = Engine(RuntimeConfig(mode="fast"), cpu, dtype=torch.float32)
    assert e.amp_dtype is None


def test_nan_guard_skips_steps_and_falls_back_to_fp32():
    e = Engine(RuntimeConfig(mode="fast", precision="bf16"), torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(3):
        assert not e.update(opt, e.backward((w * float("nan")).sum()))
    assert torch.equal(w.detach(), torch.ones(3))  # nothing applied
    assert e.nonfinite_steps == 3 and e.amp_dtype is None  # fell back to fp32
    assert not e.update(opt, e.backward((w**2).sum() * torch.tensor(float("inf"))))  # inf loss: skipped too
    w.grad = torch.tensor([1.0, float("nan"), 0.0])  # a finite loss with a non-finite gradient
    assert not e.update(opt) and w.grad is None
    assert e.update(opt, e.backward((w**2).sum()))
    assert not torch.equal(w.detach(), torch.ones(3))


def test_xformers_falls_back_to_sdpa_on_cpu(tiny_clip, caplog):
    assert tiny_clip.set_attention("xformers") == "sdpa"
    assert "xformers attention not used" in caplog.text
    assert tiny_clip.set_attention("sdpa") == "sdpa"
