"""The fast path computes what the reference mode computes, and both follow the original method.

Fast and reference mode are compared term by term over several steps whose crops differ in size
and place (a real photograph, a synthetic two-layer video). The expected values of the original's
formulas are written out here independently of the objective's code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from t2l_fast.kernels import GREEN

from t2l_fast import objective as objective_module
from t2l_fast.augment import ViewParams, draw_example, make_views, render_crop, view_size, whole_patches
from t2l_fast.config import DataConfig, preset
from t2l_fast.io import to_image_tensor
from t2l_fast.losses import Layers, cosine_criterion, expand_templates
from t2l_fast.objective import Objective
from t2l_fast.pipeline.crops import CropSampler
from t2l_fast.pipeline.image import ImageEditor
from t2l_fast.pipeline.video import VideoEditor, VideoRun
from t2l_fast.synthetic import two_layer_scene
from tests.conftest import small_config

SAMPLE = Path(__file__).resolve().parents[1] / "t2l_fast" / "samples" / "chelsea.jpg"


def _draw_with_indices(objective, monkeypatch, *args):
    """The objective's draw, and the template indices it picked (comp, then directional, then
    screen): what the original gathers, for computing its formula independently of the weights."""
    picked = []
    real = objective_module.template_weights
    with monkeypatch.context() as m:
        m.setattr(objective_module, "template_weights", lambda idx, n: picked.append(idx) or real(idx, n))
        draw = objective.draw(*args)
    return draw, picked


def _modes(cfg, mode: str):
    cfg.runtime.mode = mode
    cfg.runtime.precision = "fp32"
    cfg.runtime.compile = "off"
    cfg.runtime.bucket = 1  # the same crops in both modes
    # a frozen generator (lr and min_lr 0: MADGRAD adds eps to any other lr, and the schedule never
    # goes below min_lr, so lr 1e-9 still moved it by ~1e-4·|g|^(1/3) a step from step 1 on, and the
    # cube root amplifies the float rounding of small gradients) keeps the two runs' generators
    # equal, so a difference can only come from the step's own computation
    cfg.optim.lr = cfg.optim.min_lr = 0.0
    return cfg


def _assert_same_terms(fast: list[dict], reference: list[dict]) -> None:
    assert len(fast) == len(reference) >= 5
    for step, (f, r) in enumerate(zip(fast, reference, strict=True)):
        assert set(f) == set(r), step
        for key in r:
            assert f[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), (step, key, f[key], r[key])


# -- 1. fast == reference, with crops that differ from step to step ---------------------------------
def test_image_fast_path_equals_reference_term_by_term(tiny_clip, monkeypatch):
    source, _ = to_image_tensor(SAMPLE)  # 451x300: crops of 0.8-1.2 scale and 0.85-1 cover
    seen_sizes = []

    def run(mode: str):
        cfg = _modes(small_config(steps=5, lambda_structure=2.0), mode)
        cfg.roi_prompt = "cat"
        cfg.loss.bootstrap_steps = 5  # relevancy targets too
        cfg.data.source_every = 3  # the un-augmented input at steps 0 and 3 (its targets cached)
        editor = ImageEditor(cfg, device="cpu", clip=tiny_clip)
        return editor(source).losses

    original = render_crop

    def spy(image, *args, **kwargs):
        out = original(image, *args, **kwargs)
        seen_sizes.append(tuple(out.shape[-2:]))
        return out

    import t2l_fast.pipeline.image as image_module

    monkeypatch.setattr(image_module, "render_crop", spy)
    reference = run("reference")
    fast = run("fast")
    assert len(set(seen_sizes[:5])) >= 4  # the crops really differ from step to step
    _assert_same_terms(fast, reference)
    assert {"comp_clip", "comp_dir", "screen", "structure", "bootstrap"} <= set(fast[1])


@pytest.mark.parametrize("layer", ["background", "foreground"])
def test_video_fast_path_equals_reference_term_by_term(tiny_clip, layer):
    data, frames = two_layer_scene(t=8, h=72, w=100, sprite=40)  # an object big enough to edit

    def run(mode: str):
        cfg = _modes(preset("video"), mode)
        cfg.prompt, cfg.roi_prompt = "winter", "road"
        cfg.optim.steps = 5
        cfg.views.n_aug = 2
        cfg.generator.channels_down = cfg.generator.channels_up = 8
        cfg.data.source_every = 2  # the whole atlas at steps 1 and 3 (its targets cached)
        cfg.data.jitter_p = 0.5
        cfg.loss.bootstrap_steps = 5  # one example's relevancy term per step
        cfg.video.layer = layer
        return VideoEditor(cfg, device="cpu", clip=tiny_clip)(frames, atlas=data).losses

    _assert_same_terms(run("fast"), run("reference"))


def test_a_crops_targets_are_its_own(tiny_clip):
    """Two different crops through the batched objective: each structure term is zero only against
    its own source (a cached target from another crop would not be)."""
    cfg = small_config(lambda_composition=0.0, lambda_screen=0.0, lambda_sparsity=0.0)
    objective = Objective(tiny_clip, cfg, batched=True)
    g = torch.Generator().manual_seed(0)
    for h, w in ((150, 190), (170, 140), (160, 160)):
        crop = torch.rand(1, 3, h, w, generator=g)
        rgba = torch.zeros(1, 4, h, w)  # alpha 0: the output is the crop itself
        terms = objective(Layers.from_rgba(rgba, crop), 0, torch.Generator().manual_seed(1))
        assert float(terms["structure"]) < 1e-10


# -- 2.1 directions from RAW text embeddings ----------------------------------------------------------
def test_directional_loss_uses_raw_text_embeddings(tiny_clip, image, monkeypatch):
    cfg = small_config(lambda_screen=0.0, lambda_structure=0.0, lambda_sparsity=0.0)
    cfg.roi_prompt = "cat"
    objective = Objective(tiny_clip, cfg)
    layers = Layers.from_rgba(
        torch.rand(1, 4, 140, 170, generator=torch.Generator().manual_seed(3)), image[None]
    )
    terms = objective(layers, 0, torch.Generator().manual_seed(5))
    # the same draws again
    draw, (_, dir_idx) = _draw_with_indices(
        objective, monkeypatch, 1, (140, 170), torch.Generator().manual_seed(5)
    )

    def views(x, params):
        return tiny_clip.encode_image(make_views(x, params[0], cfg.views.fill, cfg.views.min_cover))

    out_e, src_e = views(layers.composite, draw.direction), views(layers.source, draw.direction)
    target = tiny_clip.encode_text(expand_templates("a golden cat"))[dir_idx]
    roi = tiny_clip.encode_text(expand_templates("cat"))[dir_idx]

    def loss(dirs):  # the original: mean over views and directions of 1 - cos(out - in, dir)
        return torch.stack([1 - F.cosine_similarity(out_e - src_e, d[None]).mean() for d in dirs]).mean()

    assert float(terms["comp_dir"]) == pytest.approx(float(loss(target - roi)), rel=1e-5)
    normalised = F.normalize(target, dim=-1) - F.normalize(roi, dim=-1)
    assert abs(float(loss(normalised)) - float(loss(target - roi))) > 1e-4  # the test tells them apart


# -- 2.2 CLIP views keep the aspect ratio ------------------------------------------------------------
def test_views_keep_the_aspect_ratio_and_clip_reads_whole_patches(tiny_clip):
    cfg = small_config(lambda_screen=0.0, lambda_structure=0.0, lambda_sparsity=0.0)
    objective = Objective(tiny_clip, cfg, batched=True)
    shapes = []
    encode = tiny_clip.encode_image
    objective.encode_image = lambda x: shapes.append(tuple(x.shape[-2:])) or encode(x)
    layers = Layers.from_rgba(torch.rand(1, 4, 512, 768), torch.rand(1, 3, 512, 768))
    draw = objective.draw(1, (512, 768), torch.Generator().manual_seed(0))
    assert draw.clip[0].size == (213, 320)  # Resize(224, max_size=320) of 512x768
    objective(layers, 0, torch.Generator().manual_seed(0))
    assert shapes == [(213, 320)]  # fed whole (no slicing: no size guard in a compiled graph) ...
    view = torch.rand(2, 3, 213, 320, generator=torch.Generator().manual_seed(1))
    tokens = tiny_clip.encode_tokens(view)
    assert tokens.shape[1] == 1 + 6 * 10  # ... and CLIP's patch embedding reads 6 x 10 whole patches
    torch.testing.assert_close(tokens, tiny_clip.encode_tokens(whole_patches(view, 32)), rtol=0, atol=0)
    assert view_size(410, 730) == (180, 320)  # a 16:9 video window: not squashed to 224 rows


# -- 2.3 bootstrap off unless asked for -----------------------------------------------------------
def test_bootstrap_is_off_with_a_roi_prompt_unless_asked_for(tiny_clip, image):
    cfg = small_config()
    cfg.roi_prompt = "cat"
    layers = Layers.from_rgba(torch.rand(1, 4, 140, 170), image[None])
    assert "bootstrap" not in Objective(tiny_clip, cfg)(layers, 0, torch.Generator().manual_seed(0))
    cfg.loss.bootstrap_steps = 2
    assert "bootstrap" in Objective(tiny_clip, cfg)(layers, 0, torch.Generator().manual_seed(0))


# -- 2.6 one crop scale for both sides -------------------------------------------------------------
def test_training_crops_draw_one_scale_for_both_sides():
    image = torch.rand(1, 3, 300, 451)
    data = DataConfig(jitter_p=0.0, flip_p=0.0, scale_min=1.0, scale_max=1.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        out_h, out_w = draw_example(image, data, gen, min_side=129).shape[-2:]
        # the original's RandomSizeCrop: one s for both sides, so the crop keeps the aspect ratio
        assert abs(out_h / 300 - out_w / 451) < 2.5 / 300


# -- 2.7 separate views for the CLIP loss and the directional loss --------------------------------
def test_clip_and_directional_losses_see_separate_views(tiny_clip, image):
    cfg = small_config(lambda_screen=0.0, lambda_structure=0.0, lambda_sparsity=0.0)
    cfg.roi_prompt = "cat"
    objective = Objective(tiny_clip, cfg)  # reference mode: one CLIP call per loss
    inputs = []
    encode = tiny_clip.encode_image
    objective.encode_image = lambda x: inputs.append(x.detach().clone()) or encode(x)
    layers = Layers.from_rgba(torch.rand(1, 4, 140, 170), image[None])
    objective(layers, 0, torch.Generator().manual_seed(0))
    clip_views, dir_out, dir_src = inputs
    n = cfg.views.n_aug
    assert clip_views.shape[0] == dir_out.shape[0] == dir_src.shape[0] == n
    assert (clip_views[1:] - dir_out[1:]).abs().amax() > 1e-2  # drawn separately
    draw = objective.draw(1, (140, 170), torch.Generator().manual_seed(0))
    assert not torch.equal(draw.clip[0].geometry, draw.direction[0].geometry)
    # the directional pair shares its geometry: the source views are the same warp of the source
    views = make_views(layers.source, draw.direction[0], cfg.views.fill, cfg.views.min_cover)
    torch.testing.assert_close(dir_src, views)


# -- 2.8 the cosine criterion ---------------------------------------------------------------------
def test_cosine_criterion_is_scaled_by_1_2(tiny_clip, image, monkeypatch):
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([[0.0, 3.0]])
    # 1.2 (1 - cos): orthogonal -> 1.2; 45 degrees -> 1.2 (1 - 1/sqrt 2)
    torch.testing.assert_close(cosine_criterion(x, y), torch.tensor([[1.2], [1.2 * (1 - 2**-0.5)]]))
    cfg = small_config(lambda_screen=0.0, lambda_structure=0.0, lambda_sparsity=0.0)
    cfg.loss.text_criterion = "cosine"
    objective = Objective(tiny_clip, cfg)
    layers = Layers.from_rgba(torch.rand(1, 4, 140, 170), image[None])
    terms = objective(layers, 0, torch.Generator().manual_seed(2))
    draw, (comp_idx,) = _draw_with_indices(
        objective, monkeypatch, 1, (140, 170), torch.Generator().manual_seed(2)
    )
    emb = tiny_clip.encode_image(
        make_views(layers.composite, draw.clip[0], cfg.views.fill, cfg.views.min_cover)
    )
    text = tiny_clip.encode_text(expand_templates("a golden cat"))[comp_idx]
    expected = torch.stack([1.2 * (1 - F.cosine_similarity(emb, t[None]).mean()) for t in text]).mean()
    assert float(terms["comp_clip"]) == pytest.approx(float(expected), rel=1e-5)


# -- 2.4 / 2.5 / 2.9 video ----------------------------------------------------------------------------
def _sampler(layer: str, bucket: int, h: int = 150, w: int = 200):
    data, frames = two_layer_scene(t=8, h=h, w=w, sprite=40)
    cfg = preset("video")
    cfg.video.layer = layer
    return CropSampler(VideoRun(cfg, frames, 25.0, data), torch.device("cpu"), 129, bucket), data


def test_background_windows_keep_their_cover_when_bucketed():
    sampler, _ = _sampler("background", bucket=64)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        crop = sampler.draw(gen)
        h, w = crop.frames.shape[-2:]
        assert h % 64 == 0 and w % 64 == 0
        # frame pixels per tensor pixel, read from the texels (1 texel = 1 frame px in this scene)
        # in the window's interior: the window covers slope x (tensor side) frame pixels
        hu, hv = crop.atlas.shape[-1] / 2, crop.atlas.shape[-2] / 2
        slope_v = float(crop.grid[0, h // 2 + 10, w // 2, 1] - crop.grid[0, h // 2 - 10, w // 2, 1]) * hv / 20
        slope_u = float(crop.grid[0, h // 2, w // 2 + 10, 0] - crop.grid[0, h // 2, w // 2 - 10, 0]) * hu / 20
        cover_h, cover_w = slope_v * h / 150, slope_u * w / 200
        assert 0.95 - 0.005 <= cover_h <= 1.0 + 1e-3 and 0.95 - 0.005 <= cover_w <= 1.0 + 1e-3


def test_foreground_atlas_is_cropped_to_the_objects_boxes():
    sampler, data = _sampler("foreground", bucket=1)
    texels = data.to_texel(data.uv("foreground"), "foreground")
    lo = torch.full((2,), 1e9)
    hi = torch.full((2,), -1e9)
    for t, (y, x, bh, bw) in enumerate(sampler.boxes.tolist()):  # the original's get_atlas_bounding_box
        uv = texels[t, y : y + bh, x : x + bw].reshape(-1, 2)
        lo, hi = torch.minimum(lo, uv.amin(0).floor()), torch.maximum(hi, uv.amax(0).ceil())
    v0, u0, rh, rw = sampler.region
    assert (u0, v0) == (int(lo[0]), int(lo[1])) and (rw, rh) == (
        int(hi[0] - lo[0]) + 1,
        int(hi[1] - lo[1]) + 1,
    )
    full = data.atlas_image("foreground")
    assert rh * rw < full.shape[1] * full.shape[2]  # smaller than the box of every pixel's UV
    assert sampler.whole_atlas.shape[-2:] == (rh, rw)
    # the render pads the region's edit back by replicating its border
    edit = torch.rand(1, 4, rh, rw)
    padded = sampler.to_full(edit)
    assert padded.shape[-2:] == full.shape[-2:]
    torch.testing.assert_close(padded[..., v0 : v0 + rh, u0 : u0 + rw], edit)
    torch.testing.assert_close(padded[..., :v0, u0 : u0 + rw], edit[..., :1, :].expand(-1, -1, v0, -1))


def test_background_direct_crop_is_the_atlas_reconstruction():
    sampler, data = _sampler("background", bucket=1)
    crop = sampler.draw(torch.Generator().manual_seed(3))
    recon = data.sample("background")  # the atlas at every pixel's UV: no sprite
    found = False
    for k in range(3):
        rec = sampler.reconstruction(crop, k)[0]
        # find the window in the reconstruction of some frame (the sampler places it)
        for t in range(recon.shape[0]):
            h, w = rec.shape[-2:]
            for y in range(recon.shape[-2] - h + 1):
                for x in range(recon.shape[-1] - w + 1):
                    if (recon[t, :, y : y + h, x : x + w] - rec).abs().max() < 1e-4:
                        found = True
                        break
                if found:
                    break
            if found:
                break
        assert found
        # and it is not the raw frame: the sprite is not in it
        assert (rec - crop.frames[k]).abs().amax() > 0.1
        found = False


def test_foreground_direct_output_is_multiplied_by_alpha(tiny_clip, monkeypatch):
    data, frames = two_layer_scene(t=8, h=72, w=100)
    data.alpha[:] = data.alpha.clamp(max=0.3)  # a faint object: A·C must stay below A
    cfg = _modes(preset("video"), "reference")
    cfg.prompt = "gold"
    cfg.optim.steps = 1
    cfg.views.n_aug = 2
    cfg.generator.channels_down = cfg.generator.channels_up = 8
    cfg.video.layer = "foreground"
    cfg.video.mask_threshold = 0.25
    seen = []
    objective = VideoEditor.objective

    def spy(clip, c, engine):
        inner = objective(clip, c, engine)

        def call(layers, *args, **kwargs):
            seen.append(layers[0])  # the video editor calls it for a group (of one)
            return inner(layers, *args, **kwargs)

        return call

    monkeypatch.setattr(VideoEditor, "objective", staticmethod(spy))
    VideoEditor(cfg, device="cpu", clip=tiny_clip)(frames, atlas=data)
    direct = seen[0][3]  # the frames' three examples, then the direct one
    green = torch.tensor(GREEN).view(1, 3, 1, 1)
    a = direct.alpha  # A·α
    colour = direct.greenscreen - (1 - a) * green  # A·α · (A·C)
    assert float(a.max()) <= 0.3 + 1e-6
    assert float((colour - a * 0.3).max()) <= 1e-5  # A·C <= A: the colour was multiplied by A too


def test_video_bootstrap_is_the_originals_effective_term(tiny_clip, monkeypatch):
    """The original's relevancy loss assigns where it meant to add, so only the step's last example
    counts (the direct crop, or the whole atlas on the steps that feed it), divided by the number of
    examples; its video config keeps the weight constant. Written out here from the formula."""
    data, frames = two_layer_scene(t=8, h=72, w=100, sprite=40)
    cfg = _modes(preset("video"), "reference")
    cfg.prompt, cfg.roi_prompt = "winter", "road"
    cfg.optim.steps = 2
    cfg.views.n_aug = 2
    cfg.generator.channels_down = cfg.generator.channels_up = 8
    cfg.data.source_every = 2  # the whole atlas at step 1: five examples, the atlas last
    cfg.loss.bootstrap_steps = 2
    seen = []
    objective = VideoEditor.objective

    def spy(clip, c, engine):
        inner = objective(clip, c, engine)

        def call(layers, *args, **kwargs):
            seen.append(layers[0])
            return inner(layers, *args, **kwargs)

        return call

    monkeypatch.setattr(VideoEditor, "objective", staticmethod(spy))
    losses = VideoEditor(cfg, device="cpu", clip=tiny_clip)(frames, atlas=data).losses
    assert len(seen) == 3  # step 0: the batch of four; step 1: the batch, then the whole atlas
    boot_text = tiny_clip.encode_text(["road"])[0]

    def mse_of(example):  # MSE(alpha at 224x224, relevancy of the example's input)
        square = F.interpolate(example.source, size=(224, 224), mode="bilinear", align_corners=False)
        relevancy = tiny_clip.relevancy(square, boot_text, cfg.loss.relevancy_num_layers)
        alpha = F.interpolate(example.alpha.float(), size=(224, 224), mode="bilinear", align_corners=False)
        return float(((alpha[:, 0] - relevancy) ** 2).mean().detach())

    expected = [mse_of(seen[0][3]) / 4, mse_of(seen[2]) / 5]  # the last example / N
    for step in range(2):
        assert losses[step]["bootstrap"] == pytest.approx(expected[step], rel=2e-3), step
        rest = losses[step]["loss"] - 10.0 * losses[step]["bootstrap"]  # lambda 10, not annealed
        others = (
            losses[step]["comp_clip"]
            + losses[step]["comp_dir"]
            + losses[step]["screen"]
            + 3.0 * losses[step]["structure"]
            + 0.1 * losses[step]["sparsity"]
        )
        assert rest == pytest.approx(others, rel=1e-5), step


def test_clip_views_fill_as_much_as_the_originals():
    """The original crops, resizes the crop to the view's size, then flips, applies RandomAffine and
    RandomPerspective to it (torchvision, fill outside): the share of fill pixels is computed here
    that way, with torchvision, on an image of ones, and ours must be within 2 points of it."""
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF

    h, w, n = 300, 450, 600
    cfg = preset("image").views
    cfg.jitter_p = cfg.grayscale_p = 0.0  # colour off: a view of ones is its coverage
    size = view_size(h, w, cfg.short_side, cfg.max_long_side)
    ones = torch.ones(1, 1, h, w)
    torch.manual_seed(0)
    bilinear = TF.InterpolationMode.BILINEAR
    theirs = []
    for _ in range(n):
        s = float(torch.empty(1).uniform_(cfg.min_cover, 1))
        i, j, ch, cw = T.RandomCrop.get_params(ones, (int(h * s), int(w * s)))
        view = TF.resize(ones[..., i : i + ch, j : j + cw], list(size), bilinear, antialias=False)
        if float(torch.rand(1)) < cfg.affine_p:
            t = cfg.translate
            angle, shift, scale, shear = T.RandomAffine.get_params(
                [-cfg.degrees, cfg.degrees], [t, t], None, None, [size[1], size[0]]
            )
            view = TF.affine(view, angle, list(shift), scale, list(shear), bilinear, fill=[0.0])
        if float(torch.rand(1)) < cfg.perspective_p:
            start, end = T.RandomPerspective.get_params(size[1], size[0], cfg.distortion)
            view = TF.perspective(view, start, end, bilinear, fill=[0.0])
        theirs.append(1 - float(view.mean()))
    params = ViewParams.draw(n + 1, size, cfg, torch.Generator().manual_seed(0))[1:]  # crops only
    ours = 1 - float(make_views(torch.ones(1, 3, h, w), params, fill=0.0, min_cover=cfg.min_cover).mean())
    original = sum(theirs) / n
    assert 0.2 < original < 0.3  # about a quarter of a view is fill
    assert ours == pytest.approx(original, abs=0.02)


def test_foreground_frames_are_rendered_as_the_originals(tiny_clip, monkeypatch):
    """The original samples the three frames from the jittered atlas crop: the render over its input,
    multiplied by A (A·a·C + (1 - a)·A·F), against the input without the mask on the source side.
    Here the input is the frame window with the atlas crop's jitter; the expected values are written
    out with grid_sample."""
    import t2l_fast.pipeline.video as video_module

    data, frames = two_layer_scene(t=8, h=72, w=100)
    data.alpha[:] = data.alpha.clamp(max=0.6)  # a soft object: 0 < A < 1 where the formulas differ
    cfg = _modes(preset("video"), "reference")
    cfg.prompt = "gold"
    cfg.optim.steps = 1
    cfg.views.n_aug = 2
    cfg.generator.channels_down = cfg.generator.channels_up = 8
    cfg.video.layer = "foreground"
    cfg.video.mask_threshold = 0.25
    cfg.data.jitter_p = 1.0  # always jittered
    crops, colours, sampled, seen = [], [], [], []
    draw, apply_colour, sample_atlas = CropSampler.draw, video_module.apply_colour, video_module.sample_atlas

    def spy_draw(self, gen):
        crops.append(draw(self, gen))
        return crops[-1]

    def spy_colour(x, params):
        colours.append((x, params))
        return apply_colour(x, params)

    def spy_sample(rgba, *args):
        sampled.append(rgba.detach())
        return sample_atlas(rgba, *args)

    monkeypatch.setattr(CropSampler, "draw", spy_draw)
    monkeypatch.setattr(video_module, "apply_colour", spy_colour)
    monkeypatch.setattr(video_module, "sample_atlas", spy_sample)
    objective = VideoEditor.objective

    def spy_objective(clip, c, engine):
        inner = objective(clip, c, engine)

        def call(layers, *args, **kwargs):
            seen.append(layers[0])
            return inner(layers, *args, **kwargs)

        return call

    monkeypatch.setattr(VideoEditor, "objective", staticmethod(spy_objective))
    VideoEditor(cfg, device="cpu", clip=tiny_clip)(frames, atlas=data)
    crop, layers = crops[0], seen[0]
    atlas_in, params = colours[0]
    assert atlas_in is crop.atlas  # the first jitter is the atlas crop's ...
    assert not torch.allclose(layers.source[:3], crop.frames)
    # ... and the frames take the same factors (brightness, contrast, saturation, hue, per frame)
    expected_frames = apply_colour(crop.frames, params.map(lambda t: t.expand(3, *t.shape[1:])))
    torch.testing.assert_close(layers.source[:3], expected_frames)  # not multiplied by A
    rgba = sampled[0]
    colour, a = rgba[:3], rgba[3:]
    taps = F.grid_sample(
        torch.cat([a * colour, a])[None].expand(3, -1, -1, -1),
        crop.grid,
        mode="bilinear",
        align_corners=False,
    )
    big_a = crop.opacity[:, None]
    expected = big_a * (taps[:, :3] + (1 - taps[:, 3:]) * expected_frames)  # A·a·C + (1 - a)·A·F
    torch.testing.assert_close(layers.composite[:3], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layers.alpha[:3], big_a * taps[:, 3:], rtol=1e-5, atol=1e-5)
