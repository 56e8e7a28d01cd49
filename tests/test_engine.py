"""Quality guard of the fast path: same losses and gradients as the reference mode, the same
optimisation behaviour, bounded recompiles, and the NaN guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from t2l_fast import ImageEditor
from t2l_fast.config import RuntimeConfig
from t2l_fast.losses import Layers
from t2l_fast.objective import Objective
from t2l_fast.optim import FusedMADGRAD
from t2l_fast.pipeline.engine import Engine, optimise
from tests.conftest import small_config


def _fixed_views(cfg):
    """Augmentations on but with dropout-free CLIP (CLIP has none) and every random draw seeded."""
    cfg.roi_prompt = "cat"
    cfg.loss.bootstrap_steps = cfg.optim.steps
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
    # bf16 rounding through the random tiny CLIP (measured 0.95; a wrong gradient is near 0)
    assert float(cos) > 0.9


def test_source_side_results_are_reused_for_a_repeated_key(tiny_clip, batch, monkeypatch):
    source, rgba = batch
    cfg = _fixed_views(small_config())
    objective = Objective(tiny_clip, cfg, batched=True)
    calls = {"relevancy": 0}
    original = objective.relevancy

    def counting(src, text=None):
        calls["relevancy"] += 1
        return original(src, text)

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
    # oneDNN's choice of convolution by input size is a CPU-only guard (CUDA takes cuDNN at any size)
    with torch.backends.mkldnn.flags(enabled=False):
        graphs = _unique_graphs(cfg, tiny_clip, image)
    # the compile plan: generator, training crop and objective, each one dynamic graph from its first
    # call, whatever the crop and view sizes (9 graphs here before the plan; a recompile would pass 3)
    assert graphs == 3


def test_a_square_first_crop_does_not_tie_height_to_width(tiny_clip):
    """The first crop of this image is 192x192 (bucket 64), later ones are not: with duck sizing the
    objective's graph took H == W as a guard and compiled again at the first non-square crop."""
    from t2l_fast.augment import draw_crop

    image = torch.rand(3, 151, 197, generator=torch.Generator().manual_seed(4))
    cfg = small_config(steps=4, lambda_structure=1.0)
    cfg.runtime.mode, cfg.runtime.compile, cfg.runtime.compile_backend = "fast", "on", "aot_eager"
    first = draw_crop((151, 197), cfg.data, torch.Generator().manual_seed(cfg.seed), 129, 64)
    assert first.params.size == (192, 192)  # the draw stream's first crop (the run's draws follow)
    with torch.backends.mkldnn.flags(enabled=False):
        assert _unique_graphs(cfg, tiny_clip, image) == 3


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
    # update() now returns the device-side "applied" flag (it was a host bool); skipped steps are
    # counted, and the fp32 fallback taken, when the flags are read back by flush().
    e = Engine(RuntimeConfig(mode="fast", precision="bf16"), torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(3))
    opt = FusedMADGRAD([w], lr=0.1)
    for _ in range(3):
        assert not bool(e.update(opt, e.backward((w * float("nan")).sum())))
    assert torch.equal(w.detach(), torch.ones(3))  # nothing applied
    assert e.nonfinite_steps == 0 and e.amp_dtype == torch.bfloat16  # nothing read back yet
    assert e.flush() == [False, False, False]
    assert e.nonfinite_steps == 3 and e.amp_dtype is None  # fell back to fp32
    assert not bool(
        e.update(opt, e.backward((w**2).sum() * torch.tensor(float("inf"))))
    )  # inf loss: skipped too
    w.grad = torch.tensor([1.0, float("nan"), 0.0])  # a finite loss with a non-finite gradient
    assert not bool(e.update(opt)) and w.grad is None
    assert torch.equal(w.detach(), torch.ones(3))
    assert bool(e.update(opt, e.backward((w**2).sum())))
    assert not torch.equal(w.detach(), torch.ones(3))
    assert e.flush() == [False, False, True] and e.nonfinite_steps == 5
    assert float(opt.updates) == 1  # the schedule advanced once: only after the real update


def test_nan_guard_with_another_optimizer_syncs_but_still_skips():
    e = Engine(RuntimeConfig(mode="fast", precision="bf16"), torch.device("cpu"))
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    assert not bool(e.update(opt, e.backward((w * float("nan")).sum())))
    w.grad = torch.tensor([1.0, float("inf"), 0.0])
    assert not bool(e.update(opt)) and w.grad is None
    assert torch.equal(w.detach(), torch.ones(3))
    assert bool(e.update(opt, e.backward((w**2).sum())))
    assert e.flush() == [False, False, True] and e.nonfinite_steps == 2 and e.amp_dtype == torch.bfloat16


def test_a_non_finite_loss_adds_no_gradient():
    """backward() of a non-finite loss back-propagates zero, so (where the loss's own derivatives are
    finite) the other examples' gradient stays clean; the step is skipped either way (tests above)."""
    w = torch.nn.Parameter(torch.ones(3))
    assert bool(Engine.backward((w**2).sum()))
    assert not bool(Engine.backward((w**2).sum() + torch.tensor(float("nan"))))
    assert not bool(Engine.backward((3 * w).sum() - torch.tensor(float("inf"))))
    torch.testing.assert_close(w.grad, 2 * torch.ones(3))


class _Objective:
    """A tiny objective with the real interface: a few terms, one of them NaN at chosen steps."""

    def __init__(self, nan_steps=()):
        self.nan_steps = set(nan_steps)

    def __call__(self, layers, step, gen, cache_key=None):
        x = layers
        loss = ((x - 0.5) ** 2).mean()
        if step in self.nan_steps:
            loss = loss * float("nan")
        return {"loss": loss, "l1": x.abs().mean(), "const": torch.tensor(float(step))}


def _tiny_run(steps, log_every, nan_steps=(), on_step=None):
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 4)
    cfg = small_config(steps=steps).optim
    cfg.lr = 1e-2
    engine = Engine(RuntimeConfig(mode="fast", log_every=log_every), torch.device("cpu"))
    x = torch.linspace(-1, 1, 8).view(2, 4)

    def examples(step, gen):
        yield net(x), None, 0.25
        yield net(x * 2), ("source",), 0.75

    history, interrupted = optimise(engine, net, _Objective(nan_steps), examples, cfg, 0, on_step=on_step)
    return history, interrupted, engine, net


def test_history_is_exact_and_read_back_only_every_log_every_steps(monkeypatch):
    reads = []
    original = torch.Tensor.tolist

    def counting(self):
        reads.append(self.numel())
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    history, interrupted, engine, _ = _tiny_run(steps=7, log_every=3, nan_steps=(4,))
    assert not interrupted and len(history) == 7
    # Steps 3, 6 and the end: one read of the records and one of the NaN-guard flags each.
    assert len(reads) == 6
    for step, record in enumerate(history):
        assert type(record) is dict and set(record) == {"loss", "l1", "const"}
        assert all(type(v) is float for v in record.values())
        assert record["const"] == 0.25 * step + 0.75 * step  # the weighted sum, in Python floats
    assert np.isnan(history[4]["loss"]) and engine.nonfinite_steps == 1


def test_on_step_sees_the_records_and_can_interrupt():
    seen = {}

    def on_step(step, record):
        seen[step] = dict(record)  # reading the lazy record: one sync, only for this caller
        if step == 2:
            raise KeyboardInterrupt

    history, interrupted, _, _ = _tiny_run(steps=6, log_every=10, on_step=on_step)
    assert interrupted and len(history) == 3
    assert [seen[s] for s in range(3)] == history


def test_skipped_steps_leave_the_generator_unchanged_and_the_rest_train():
    # A NaN loss at the last step: the generator ends exactly where the two-step run ends.
    h_nan, _, e_nan, net_nan = _tiny_run(steps=3, log_every=1, nan_steps=(2,))
    h_two, _, _, net_two = _tiny_run(steps=2, log_every=1)
    for a, b in zip(net_nan.parameters(), net_two.parameters(), strict=True):
        assert torch.equal(a, b)
    assert h_nan[:2] == h_two and e_nan.nonfinite_steps == 1


def test_xformers_falls_back_to_sdpa_on_cpu(tiny_clip, caplog):
    assert tiny_clip.set_attention("xformers") == "sdpa"
    assert "xformers attention not used" in caplog.text
    assert tiny_clip.set_attention("sdpa") == "sdpa"
