"""Many looks at once: variants trained together equal their lone runs, skip alone, are checked
before any model loads, and are written as a person compares them."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from t2l_fast import ImageEditor, InputError
from t2l_fast.config import GeneratorConfig, RuntimeConfig
from t2l_fast.losses import Layers
from t2l_fast.models.generator import Generator, GeneratorGroup
from t2l_fast.objective import Objective
from t2l_fast.pipeline.engine import Engine, optimise, optimise_group
from t2l_fast.pipeline.variants import (
    grid_layout,
    make_variants,
    save_variants,
    variants_per_run,
)
from tests.conftest import small_config


def _config():
    cfg = small_config(steps=4, lambda_structure=1.0)
    cfg.runtime.mode = "fast"
    cfg.roi_prompt, cfg.loss.bootstrap_steps = "cat", 3  # bootstrap weight changing per step
    cfg.data.source_every = 2  # the whole image at steps 0 and 2
    cfg.runtime.variants_per_run = 3  # 4 variants: a group of 3, then 1
    return cfg


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 151, 197, generator=torch.Generator().manual_seed(4))  # odd sizes


@pytest.fixture(scope="module")
def group(tiny_clip, image):
    sizes = []
    cfg = _config()
    editor = ImageEditor(cfg, device="cpu", clip=tiny_clip)
    results = editor(
        image,
        prompt=["golden", "wooden"],
        seed=[3, 8],
        callback=lambda s: sizes.append((s.step, s.variant)),
    )
    return results, sizes


def _assert_same_run(got, want):
    assert len(got.losses) == len(want.losses) == 4
    for step, (g, w) in enumerate(zip(got.losses, want.losses, strict=True)):
        assert set(g) == set(w)
        for key in w:
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-8), (step, key)
    for name, w in want.generator_state.items():
        torch.testing.assert_close(got.generator_state[name], w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("k", [1, 3])  # in the first group of 3; alone in the second chunk
def test_each_variant_equals_its_lone_run(tiny_clip, image, group, k):
    results, _ = group
    prompt, seed = [("golden", 3), ("golden", 8), ("wooden", 3), ("wooden", 8)][k]
    cfg = _config()
    cfg.draw_seed = 3  # the group's draw stream: the first variant's seed
    lone = ImageEditor(cfg, device="cpu", clip=tiny_clip)(image, prompt=prompt, seed=seed)
    _assert_same_run(results[k], lone)
    assert results[k].config.prompt == prompt and results[k].config.seed == seed
    assert results[k].config.draw_seed == 3  # its config.yaml re-runs it alone
    assert {"bootstrap", "structure", "comp_dir"} <= set(lone.losses[0])
    other = results[k - 1].generator_state  # a different seed or prompt: a different edit
    assert not torch.equal(other["head.weight"], results[k].generator_state["head.weight"])


def test_the_callback_sees_every_variant_each_step(group):
    _, seen = group
    assert seen == [(s, v) for s in range(4) for v in range(3)] + [(s, 3) for s in range(4)]


class _Objective:
    def __init__(self, nan_steps=()):
        self.nan_steps = set(nan_steps)

    def __call__(self, y, step, gen, cache_key=None, draw=None):
        loss = ((y - draw) ** 2).mean()  # the target drawn ahead, shared by the variants
        return {"loss": loss * float("nan") if step in self.nan_steps else loss}


def _nets():
    torch.manual_seed(0)
    return [
        torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)) for _ in range(2)
    ]


def test_a_non_finite_variant_skips_alone():
    cfg = small_config(steps=5).optim
    cfg.lr = 1e-2
    x = torch.linspace(-1, 1, 15).view(3, 5)
    engine = Engine(RuntimeConfig(mode="fast", log_every=2), torch.device("cpu"))
    nets = _nets()
    objectives = [_Objective(), _Objective(nan_steps=(2,))]

    def group_objective(ys, step, gen, cache_key=None, draw=None):
        return [o(y, step, gen, draw=draw) for o, y in zip(objectives, ys, strict=True)]

    def examples(step, gen):
        target = torch.rand(3, 2, generator=gen)  # differs from step to step
        yield [net(x * (1 + step)) for net in nets], None, 1.0, target

    histories, _ = optimise_group(engine, nets, group_objective, examples, cfg, 9)
    assert np.isnan(histories[1][2]["loss"]) and engine.nonfinite_steps == 1
    lone_nets = _nets()
    for k, net in enumerate(lone_nets):  # each alone, with its own NaN step: the same weights

        def one(step, gen, net=net):
            yield net(x * (1 + step)), None, 1.0, torch.rand(3, 2, generator=gen)

        lone_engine = Engine(RuntimeConfig(mode="fast"), torch.device("cpu"))
        lone, _ = optimise(lone_engine, net, objectives[k], one, cfg, 9)
        assert [h["loss"] for h in lone] == pytest.approx([h["loss"] for h in histories[k]], nan_ok=True)
        for a, b in zip(net.parameters(), nets[k].parameters(), strict=True):
            assert torch.equal(a, b)


def test_a_groups_objective_computes_the_source_side_once_and_each_variants_terms(tiny_clip, monkeypatch):
    """Variants' objective: shared prompts encoded once; one CLIP call with gradient, one for the
    directional source views, one for the structure tokens, one relevancy target per bootstrap
    prompt, whatever the number of variants; each variant's terms and gradient are its lone
    objective's."""
    cfgs = []
    for prompt in ("golden", "wooden", "golden"):  # the third: a seed variant of the first
        cfg = small_config(lambda_structure=1.0)
        cfg.prompt, cfg.roi_prompt, cfg.loss.bootstrap_steps = prompt, "cat", 5
        cfgs.append(cfg)
    texts = []
    encode_text = tiny_clip.encode_text
    monkeypatch.setattr(tiny_clip, "encode_text", lambda t: texts.append(t) or encode_text(t))
    objective = Objective(tiny_clip, cfgs, batched=True)
    # distinct lists: golden and wooden with the templates, each on the green screen, cat, the
    # bootstrap prompt: 6 (12 without sharing)
    assert len(texts) == len({tuple(t) for t in texts}) == 6
    monkeypatch.undo()
    calls = {"image": 0, "tokens": 0, "relevancy": 0}

    def counting(name, fn):
        def call(*args):
            calls[name] += 1
            return fn(*args)

        return call

    objective.encode_image = counting("image", objective.encode_image)
    objective.encode_tokens = counting("tokens", objective.encode_tokens)
    objective.relevancy = counting("relevancy", objective.relevancy)
    source = torch.rand(2, 3, 83, 117, generator=torch.Generator().manual_seed(1))  # odd sizes
    rgbas = [torch.rand(2, 4, 83, 117, generator=torch.Generator().manual_seed(5 + k)) for k in range(3)]
    for rgba in rgbas:
        rgba.requires_grad_(True)
    draw = objective.plan(1, (83, 117), torch.Generator().manual_seed(2), b=2)
    assert float(draw.bootstrap) > 0
    group = objective([Layers.from_rgba(r, source) for r in rgbas], 1, None, draw=draw)
    assert calls == {"image": 2, "tokens": 1, "relevancy": 1}
    grads = torch.autograd.grad(sum(t["loss"] for t in group), rgbas)
    for k, cfg in enumerate(cfgs):
        rgba = rgbas[k].detach().requires_grad_(True)
        lone = Objective(tiny_clip, cfg, batched=True)(Layers.from_rgba(rgba, source), 1, None, draw=draw)
        assert set(lone) == set(group[k]) >= {"comp_dir", "structure", "bootstrap", "screen"}
        for key, value in lone.items():
            torch.testing.assert_close(group[k][key], value, rtol=1e-6, atol=1e-7, msg=key)
        (grad,) = torch.autograd.grad(lone["loss"], rgba)
        torch.testing.assert_close(grads[k], grad, rtol=1e-5, atol=1e-8)
    assert float(group[0]["comp_clip"].detach()) != float(group[1]["comp_clip"].detach())  # prompts differ


def test_a_generator_group_computes_each_generators_output_and_gradient():
    """The grouped network (the GPU's default): fp64 so that the generator's ill-conditioned fp32
    gradient does not hide an error; two images, so that each BatchNorm's batch statistics count."""
    cfg = GeneratorConfig(channels_down=8, channels_up=8, channels_skip=4)
    torch.manual_seed(1)
    gens = [Generator(cfg).double() for _ in range(3)]
    x = torch.rand(2, 3, 131, 157, dtype=torch.float64)  # odd sizes: the crop after upsampling
    target = torch.rand(3, 2, 4, 131, 157, dtype=torch.float64)
    out = GeneratorGroup(gens)(x)
    assert out.shape == (3, 2, 4, 131, 157)
    ((out - target) ** 2 * torch.arange(1.0, 4.0, dtype=torch.float64).view(3, 1, 1, 1, 1)).sum().backward()
    for k, g in enumerate(gens):
        ref = copy.deepcopy(g)
        ref.zero_grad(set_to_none=True)
        alone = ref(x)
        torch.testing.assert_close(out[k].detach(), alone.detach(), rtol=1e-10, atol=1e-12)
        ((alone - target[k]) ** 2 * (k + 1)).sum().backward()
        for (name, p), q in zip(g.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12, msg=name)


def test_a_compiled_generator_group_is_one_graph_for_every_size():
    """Dynamic sizes from the first call: vmap over the generators specialised on the crop size
    (a compile per size, through BatchNorm's batching rule); the grouped network does not."""
    import torch._dynamo

    cfg = GeneratorConfig(channels_down=8, channels_up=8, channels_skip=4)
    group = torch.compile(
        GeneratorGroup([Generator(cfg) for _ in range(2)]), dynamic=True, backend="aot_eager"
    )
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    no_duck = torch.fx.experimental._config.patch(use_duck_shape=False)  # as the engine compiles
    with torch.backends.mkldnn.flags(enabled=False), no_duck:  # oneDNN's choice per size: a CPU guard
        for hw in [(192, 192), (200, 260), (256, 192)]:
            group(torch.rand(1, 3, *hw)).sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_bad_variants_are_one_line_before_any_model_loads():
    with pytest.raises(InputError, match="prompt 2 of 2 is empty"):
        make_variants(["golden", " "])
    with pytest.raises(InputError, match="'golden' given twice"):
        make_variants(["golden", "icy", "golden"])
    with pytest.raises(InputError, match="seed 1 given twice"):
        make_variants(["golden"], [1, 2, 1])
    with pytest.raises(InputError, match="--screen-prompt given 2 times for 3 prompts"):
        make_variants(["a", "b", "c"], screen_prompts=["x", "y"])
    with pytest.raises(InputError, match="for some prompts only"):
        make_variants(["a", "b"], roi_prompts=["horse", None])
    got = make_variants(["a", "b"], [0, 5], screen_prompts=["x"], roi_prompts=["r1", "r2"])
    assert [(v.prompt, v.seed, v.screen_prompt, v.roi_prompt) for v in got] == [
        ("a", 0, "x", "r1"),
        ("a", 5, "x", "r1"),
        ("b", 0, "x", "r2"),
        ("b", 5, "x", "r2"),
    ]
    assert [v.name for v in got] == ["a-s0", "a-s5", "b-s0", "b-s5"]


def test_variants_per_run():
    cpu = torch.device("cpu")
    assert variants_per_run(8, cpu, 0) == 2 and variants_per_run(8, cpu, 5) == 5
    assert variants_per_run(1, cpu, 0) == 1 and variants_per_run(3, cpu, 9) == 3


def test_outputs_a_person_compares(tmp_path, group):
    results, _ = group
    variants = make_variants(["golden", "wooden"], [3, 8])
    save_variants(tmp_path, variants, results)
    sheet = np.asarray(Image.open(tmp_path / "variants.png").convert("RGB")).astype(np.float32) / 255
    (gh, gw), boxes = grid_layout((151, 197), 4)
    assert sheet.shape == (gh, gw, 3) and len(boxes) == 5
    pictures = [results[0].source] + [r.composite for r in results]

    def tile_error(picture, box):
        top, left, th, tw = box
        want = F.interpolate(picture[None], size=(th, tw), mode="bilinear", antialias=True)[0]
        got = torch.from_numpy(sheet[top : top + th, left : left + tw]).permute(2, 0, 1)
        return float((got - want.clamp(0, 1)).abs().mean())

    for i, box in enumerate(boxes):
        errors = [tile_error(p, box) for p in pictures]
        assert errors[i] < 0.06 and errors[i] == min(errors), (
            i,
            errors,
        )  # its own picture (noise: resampling differs)
        top, left, th, tw = box
        assert sheet[top + th + 2 : top + th + 40, left : left + tw].min() < 0.5  # a caption under it
    summary = json.loads((tmp_path / "variants.json").read_text())
    assert [(s["prompt"], s["seed"], s["name"]) for s in summary] == [
        (v.prompt, v.seed, v.name) for v in variants
    ]
    assert summary[2]["final_losses"] == results[2].losses[-1]
    for v in variants:
        assert (tmp_path / v.name / "composite.png").is_file()
        assert (tmp_path / v.name / "generator.safetensors").is_file()


@pytest.mark.parametrize("layer", ["background", "foreground"])
def test_each_video_variant_equals_its_lone_run(tiny_clip, layer):
    """Video variants share the atlas, its windows and the views: variant k of a group of 3 (two
    prompts, two seeds; 4 steps, the whole atlas at steps 1 and 3) gives its lone edit's losses
    and weights."""
    from t2l_fast.pipeline.video import VideoEditor
    from t2l_fast.synthetic import two_layer_scene
    from tests.test_video import small_video_config

    data, frames = two_layer_scene()
    cfg = small_video_config(steps=4, layer=layer)
    cfg.roi_prompt, cfg.loss.bootstrap_steps = "a car", 3
    cfg.runtime.mode, cfg.runtime.variants_per_run = "fast", 3
    results = VideoEditor(cfg, device="cpu", clip=tiny_clip)(
        frames, atlas=data, prompt=["winter", "autumn"], seed=[3, 8]
    )
    assert [(r.config.prompt, r.config.seed, r.config.draw_seed) for r in results] == [
        ("winter", 3, 3),
        ("winter", 8, 3),
        ("autumn", 3, 3),
        ("autumn", 8, 3),
    ]
    cfg.draw_seed = 3
    for k in (2, 3):  # in the group of 3; alone in the second chunk
        prompt, seed = results[k].config.prompt, results[k].config.seed
        lone = VideoEditor(cfg, device="cpu", clip=tiny_clip)(frames, atlas=data, prompt=prompt, seed=seed)
        _assert_same_run(results[k], lone)
        torch.testing.assert_close(results[k].composite, lone.composite, rtol=1e-5, atol=1e-6)
    assert {"bootstrap", "comp_dir"} <= set(results[0].losses[0])
    assert not torch.equal(results[0].atlas_edit, results[2].atlas_edit)


def test_compiled_video_variants_keep_the_lone_edits_compile_plan(tiny_clip):
    """Three video variants as one grouped network, compiled (aot_eager) over 4 steps of changing
    windows: the lone edit's three graphs (generators, objective for the group, no graph break)."""
    import torch._dynamo

    from t2l_fast.pipeline.video import VideoEditor
    from t2l_fast.synthetic import two_layer_scene
    from tests.test_video import small_video_config

    data, frames = two_layer_scene()
    cfg = small_video_config(steps=4)
    cfg.runtime.mode, cfg.runtime.compile, cfg.runtime.compile_backend = "fast", "on", "aot_eager"
    cfg.runtime.stack_variants, cfg.runtime.variants_per_run = "on", 3
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.backends.mkldnn.flags(enabled=False):  # oneDNN's choice per size: a CPU-only guard
        VideoEditor(cfg, device="cpu", clip=tiny_clip)(
            frames, atlas=data, prompt=["winter", "autumn", "spring"]
        )
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 3
