"""Each loss against an independent computation on small tensors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from t2l_fast.kernels import composite_rgba, self_similarity_mse

from t2l_fast.config import preset
from t2l_fast.losses import (
    SCREEN_TEMPLATES,
    TEMPLATES,
    Layers,
    Texts,
    bootstrap_weight,
    cosine_distance,
    directional_loss,
    expand_templates,
    sparsity_loss,
    spherical_distance,
)
from t2l_fast.objective import Objective
from tests.conftest import small_config


def test_spherical_distance_hand_values():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # the second is not unit length: it is normalised
    y = torch.tensor([[0.0, 2.0], [1.0, 0.0], [-1.0, 0.0]])
    d = spherical_distance(x, y)
    # orthogonal: chord sqrt(2) -> 2 asin(sqrt(2)/2)^2 = 2 (pi/4)^2; equal: 0; opposite: 2 (pi/2)^2
    expected = torch.tensor([[2 * (math.pi / 4) ** 2, 0.0, 2 * (math.pi / 2) ** 2]] * 2)
    torch.testing.assert_close(d, expected, atol=1e-6, rtol=0)


def test_spherical_distance_matches_numpy_on_random_vectors():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 7, generator=g), torch.randn(3, 7, generator=g)
    xn = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
    yn = y.numpy() / np.linalg.norm(y.numpy(), axis=1, keepdims=True)
    for i in range(4):
        for j in range(3):
            ref = 2 * np.arcsin(np.linalg.norm(xn[i] - yn[j]) / 2) ** 2
            assert abs(float(spherical_distance(x, y)[i, j]) - ref) < 1e-5


def test_directional_loss_hand_value():
    out_e = torch.tensor([[2.0, 1.0], [1.0, 1.0]])
    src_e = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # image directions: (1, 0) and (0, 1)
    dirs = torch.tensor([[1.0, 0.0]])
    # 1 - cos((1,0),(1,0)) = 0 ; 1 - cos((0,1),(1,0)) = 1 -> mean 0.5
    assert float(directional_loss(out_e, src_e, dirs)) == pytest.approx(0.5)
    assert float(cosine_distance(torch.tensor([[1.0, 1.0]]), torch.tensor([[-2.0, -2.0]]))) == pytest.approx(
        2.0
    )


def test_self_similarity_mse_against_loops():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    target = torch.rand(2, 5, 5, generator=g, dtype=torch.float64)
    t = tokens.numpy()
    total = 0.0
    for b in range(2):
        for i in range(5):
            for j in range(5):
                s = t[b, i] @ t[b, j] / max(np.linalg.norm(t[b, i]) * np.linalg.norm(t[b, j]), 1e-8)
                total += (s - target[b, i, j].item()) ** 2
    assert float(self_similarity_mse(tokens, target)) == pytest.approx(total / 50, rel=1e-5)


def test_sparsity_terms_against_numpy():
    g = torch.Generator().manual_seed(2)
    rgba = torch.rand(2, 4, 9, 11, generator=g)
    background = torch.rand(2, 3, 9, 11, generator=g)
    out = composite_rgba(rgba, background)
    a = rgba[:, 3].numpy()
    l1 = a.mean()
    l0 = (2 / (1 + np.exp(-5 * a)) - 1).mean()
    assert float(sparsity_loss(out.alpha_l1, out.alpha_l0, 0.01, 0.02)) == pytest.approx(
        0.01 * l1 + 0.02 * l0, rel=1e-5
    )
    alpha = rgba[:, 3:]
    torch.testing.assert_close(out.composite, alpha * rgba[:, :3] + (1 - alpha) * background)
    green = torch.tensor([0.0, 177 / 255, 64 / 255]).view(1, 3, 1, 1)
    torch.testing.assert_close(out.greenscreen, alpha * rgba[:, :3] + (1 - alpha) * green)


def test_bootstrap_annealing_values():
    assert bootstrap_weight(0, 4, 10.0) == pytest.approx(7.5)
    assert bootstrap_weight(1, 4, 10.0) == pytest.approx(5.0)
    assert bootstrap_weight(3, 4, 10.0) == pytest.approx(0.0)
    assert bootstrap_weight(4, 4, 10.0) == 0.0
    assert bootstrap_weight(0, 0, 10.0) == 0.0


def test_text_templates():
    assert len(TEMPLATES) == 14 and len(SCREEN_TEMPLATES) == 2
    texts = expand_templates("golden horse")
    assert texts[0] == "photo of golden horse." and texts[-1] == "golden horse..." and "golden horse" in texts
    assert expand_templates("cat", SCREEN_TEMPLATES) == [
        "cat over a green screen.",
        "cat in front of a green screen.",
    ]


def test_texts_are_clips_raw_embeddings(tiny_clip):
    cfg = small_config()
    cfg.roi_prompt = "cat"
    texts = Texts.encode(tiny_clip, cfg)
    assert texts.comp.shape[0] == 14 and texts.screen.shape[0] == 2 and texts.src.shape[0] == 14
    # raw, as the original's encode_text: not normalised
    torch.testing.assert_close(texts.comp, tiny_clip.encode_text(expand_templates("a golden cat")))
    assert float((texts.comp.norm(dim=-1) - 1).abs().max()) > 0.1
    assert texts.bootstrap is None  # the bootstrap is off unless asked for (the original's default)
    cfg.loss.bootstrap_steps = 5
    assert Texts.encode(tiny_clip, cfg).bootstrap is not None  # its prompt defaults to the ROI prompt
    cfg.roi_prompt = None
    cfg.loss.bootstrap_steps = 0
    texts = Texts.encode(tiny_clip, cfg)
    assert texts.src is None and texts.bootstrap is None


def test_objective_total_is_the_weighted_sum(tiny_clip, image):
    cfg = small_config(lambda_structure=2.0, lambda_sparsity=6.0, lambda_screen=1.5, lambda_composition=0.5)
    cfg.roi_prompt = "cat"
    cfg.loss.bootstrap_steps = cfg.optim.steps
    objective = Objective(tiny_clip, cfg)
    rgba = torch.rand(1, 4, *image.shape[-2:])
    terms = objective(Layers.from_rgba(rgba, image[None]), step=0, gen=torch.Generator().manual_seed(0))
    w_boot = bootstrap_weight(0, cfg.optim.steps, cfg.loss.lambda_bootstrap)
    expected = (
        0.5 * (terms["comp_clip"] + terms["comp_dir"])
        + 1.5 * terms["screen"]
        + 2.0 * terms["structure"]
        + 6.0 * terms["sparsity"]
        + w_boot * terms["bootstrap"]
    )
    torch.testing.assert_close(terms["loss"], expected)
    # the structure term is zero when the output equals the source (alpha = 0)
    rgba[:, 3] = 0
    terms = objective(Layers.from_rgba(rgba, image[None]), step=0, gen=torch.Generator().manual_seed(0))
    assert float(terms["structure"]) < 1e-10


def test_objective_without_roi_has_no_directional_or_bootstrap(tiny_clip, image):
    objective = Objective(tiny_clip, small_config())
    terms = objective(
        Layers.from_rgba(torch.rand(1, 4, 140, 170), image[None]),
        step=0,
        gen=torch.Generator().manual_seed(0),
    )
    assert "comp_dir" not in terms and "bootstrap" not in terms
    assert {"comp_clip", "screen", "structure", "sparsity", "loss"} <= set(terms)


def test_bootstrap_term_is_mse_to_the_relevancy_map(tiny_clip, image):
    cfg = small_config(lambda_composition=0.0, lambda_screen=0.0, lambda_structure=0.0, lambda_sparsity=0.0)
    cfg.roi_prompt = "cat"
    cfg.loss.bootstrap_steps = 2
    objective = Objective(tiny_clip, cfg)
    rgba = torch.rand(1, 4, 140, 170)
    rgba[:, 3] = 0.25  # constant alpha: the loss is mean((0.25 - R)^2)
    terms = objective(Layers.from_rgba(rgba, image[None]), step=0, gen=torch.Generator().manual_seed(0))
    relevancy = objective.relevancy(image[None])
    assert float(terms["bootstrap"]) == pytest.approx(float(((0.25 - relevancy) ** 2).mean()), rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(
        bootstrap_weight(0, 2, 10.0) * float(terms["bootstrap"]), rel=1e-5
    )


def test_video_preset_objective_runs(tiny_clip, image):
    cfg = preset("video")
    cfg.prompt = "winter"
    layers = Layers.from_rgba(torch.rand(1, 4, 140, 170), image[None])
    terms = Objective(tiny_clip, cfg)(layers, 0, torch.Generator().manual_seed(0))
    assert torch.isfinite(terms["loss"])
