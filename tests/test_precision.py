"""fp32 where the README promises it: under the fast path's bf16 autocast only the generator and CLIP
run in reduced precision; augmentation grids, colour, every loss and the directional cosine stay fp32.

CPU autocast casts matmuls to bf16 as CUDA's does, so these run here: each computation inside
``torch.autocast("cpu", bfloat16)`` must equal the same computation outside it.
"""

from __future__ import annotations

import torch

from t2l_fast.augment import ViewParams, draw_example, make_views, warp
from t2l_fast.config import DataConfig, ViewConfig
from t2l_fast.losses import (
    Layers,
    cosine_criterion,
    directional_loss,
    spherical_distance,
)
from t2l_fast.objective import Objective
from tests.conftest import small_config


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _image(h: int = 331, w: int = 517, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, h, w, generator=g)


def test_view_warps_and_colour_stay_fp32_under_autocast():
    image = _image()
    params = ViewParams.draw(12, (213, 320), ViewConfig(jitter_p=1.0), torch.Generator().manual_seed(3))
    want = make_views(image, params, fill=1.0, min_cover=0.6)
    with _bf16():
        got = make_views(image, params, fill=1.0, min_cover=0.6)
    assert got.dtype == torch.float32
    # a bf16 grid moves sampling positions by up to several pixels: values would differ by ~0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_the_grid_itself_is_fp32_under_autocast():
    """A ramp image reads back the sampling position: x-ramp values are the grid's x coordinate."""
    h, w = 257, 769
    ramp = torch.linspace(0, 1, w).view(1, 1, 1, w).expand(1, 1, h, w).contiguous()
    geometry = ViewParams.draw(6, (224, 320), ViewConfig(), torch.Generator().manual_seed(5)).geometry
    want = warp(ramp, geometry, (224, 320))
    with _bf16():
        got = warp(ramp, geometry, (224, 320))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_training_crops_stay_fp32_under_autocast():
    image = _image(401, 603)
    cfg = DataConfig(jitter_p=1.0)
    for seed in range(3):
        want = draw_example(image, cfg, torch.Generator().manual_seed(seed), 129, 64)
        with _bf16():
            got = draw_example(image, cfg, torch.Generator().manual_seed(seed), 129, 64)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_text_distances_and_the_directional_cosine_stay_fp32_under_autocast():
    g = torch.Generator().manual_seed(1)
    out_e, src_e = torch.randn(16, 512, generator=g), torch.randn(16, 512, generator=g)
    texts = torch.randn(14, 512, generator=g)
    # nearly parallel directions: 1 - cos is small, where bf16 products lose most
    out_e = src_e + 0.05 * torch.randn(16, 512, generator=g)
    for fn, args in (
        (directional_loss, (out_e, src_e, out_e[:3] - src_e[:3])),
        (cosine_criterion, (out_e, texts)),
        (spherical_distance, (out_e, texts)),
    ):
        want = fn(*args)
        with _bf16():
            got = fn(*args)
        assert got.dtype == torch.float32, fn.__name__
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=fn.__name__)


def test_every_loss_term_is_fp32_under_autocast(tiny_clip):
    """The objective's terms from what CLIP saw (fp32 embeddings): equal with and without autocast."""
    cfg = small_config()
    cfg.roi_prompt = "cat"
    cfg.loss.bootstrap_steps = 5
    objective = Objective(tiny_clip, cfg, batched=True)
    g = torch.Generator().manual_seed(2)
    source = torch.rand(2, 3, 150, 190, generator=g)
    rgba = torch.rand(2, 4, 150, 190, generator=g)
    layers = Layers.from_rgba(rgba, source)
    draw = objective.draw(2, (150, 190), torch.Generator().manual_seed(4), 3.0)
    n = cfg.views.n_aug * 2
    e = tiny_clip.model.visual.output_dim
    d = tiny_clip.model.visual.transformer.width
    seen = {
        "clip": torch.randn(n, e, generator=g),
        "dir_out": torch.randn(n, e, generator=g),
        "dir_src": torch.randn(n, e, generator=g),
        "screen": torch.randn(n, e, generator=g),
        "tokens": torch.randn(2, 31, d, generator=g),
        "structure_target": torch.rand(2, 31, 31, generator=g),
        "relevancy": torch.rand(2, 224, 224, generator=g),
    }
    want = objective._terms(layers, draw, seen)
    with _bf16():
        got = objective._terms(layers, draw, seen)
    assert set(got) == set(want) >= {"comp_clip", "comp_dir", "screen", "structure", "sparsity", "bootstrap"}
    for name in want:
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=name)
