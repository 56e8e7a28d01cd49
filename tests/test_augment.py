"""Augmentations: view sizes, homographies, warps, colour jitter, CLIP views, training examples."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from t2l_fast.augment import (
    ColourParams,
    ViewParams,
    affine_matrix,
    apply_colour,
    crop_matrix,
    draw_example,
    flip_matrix,
    homography_from_points,
    make_views,
    perspective_matrix,
    resize_view,
    view_size,
    warp,
    whole_patches,
)
from t2l_fast.config import DataConfig, ViewConfig


def _smooth(h: int, w: int) -> torch.Tensor:
    """(1, 3, h, w) smooth image in [0, 1]."""
    y = torch.linspace(0, 1, h).view(-1, 1)
    x = torch.linspace(0, 1, w).view(1, -1)
    r = 0.5 + 0.4 * torch.sin(3 * x + 2 * y)
    g = 0.5 + 0.4 * torch.cos(2 * x - 3 * y)
    b = (x + y) / 2
    return torch.stack([r, g, b]).unsqueeze(0).float()


def _identity_colour(n: int, grayscale: bool = False) -> ColourParams:
    one = torch.ones(n, dtype=torch.float64)
    return ColourParams(
        one, one.clone(), one.clone(), torch.zeros(n, dtype=torch.float64), torch.full((n,), grayscale)
    )


def _no_aug_config(**kw) -> ViewConfig:
    cfg = ViewConfig(
        min_cover=1.0, flip_p=0.0, affine_p=0.0, perspective_p=0.0, jitter_p=0.0, grayscale_p=0.0
    )
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


# -- view_size ----------------------------------------------------------------------------------------
def _torchvision_resize_size(h: int, w: int, size: int, max_size: int) -> tuple[int, int]:
    """torchvision's ``Resize(size, max_size)`` output size, written out from its documented rule."""
    if w <= h:
        short, long = w, h
    else:
        short, long = h, w
    new_short, new_long = size, int(size * long / short)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


@pytest.mark.parametrize(
    "hw, max_long, expected",
    [
        ((512, 512), 320, (224, 224)),
        ((512, 768), 320, (213, 320)),  # 336 > 320: long side 320, short int(320·224/336) = 213
        ((768, 512), 320, (320, 213)),  # portrait keeps its orientation
        ((410, 730), 320, (180, 320)),  # a 16:9 video window
        ((512, 600), 320, (224, 262)),  # aspect kept, not rounded to patches
        ((512, 768), 380, (224, 336)),  # structure view: 336 <= 380
        ((432, 768), 380, (213, 380)),  # 398 > 380: int(380·224/398) = 213
        ((300, 310), 320, (224, 231)),
    ],
)
def test_view_size_values(hw, max_long, expected):
    assert view_size(*hw, short=224, max_long=max_long) == expected


@pytest.mark.parametrize("max_long", [320, 380, 300])
def test_view_size_is_torchvisions_resize(max_long):
    for h in range(130, 1200, 37):
        for w in (130, 224, 333, 512, 768, 1111):
            assert view_size(h, w, 224, max_long) == _torchvision_resize_size(h, w, 224, max_long)
            vh, vw = view_size(h, w, 224, max_long)
            assert abs(vw / vh - w / h) <= 2 / min(vh, vw) * (w / h) + 1e-9  # the aspect ratio is kept


def test_whole_patches_drops_the_remainder():
    x = torch.arange(213 * 320.0).view(1, 1, 213, 320)
    out = whole_patches(x, 32)
    assert out.shape == (1, 1, 192, 320)
    torch.testing.assert_close(out, x[..., :192, :])


def test_resize_view_size_and_values():
    img = _smooth(240, 480)
    out = resize_view(img, 224, 380)
    assert out.shape == (1, 3, 190, 380)  # 448 > 380: long 380, short int(380·224/448) = 190
    # the original's T.Resize(224, max_size=380) on a tensor (torchvision 0.11: no antialiasing)
    ref = TF.resize(img, 224, max_size=380, interpolation=TF.InterpolationMode.BILINEAR, antialias=False)
    torch.testing.assert_close(out, ref)


# -- homographies -------------------------------------------------------------------------------------
def _apply(h: torch.Tensor, pts: torch.Tensor) -> torch.Tensor:
    p = torch.cat([pts, torch.ones(*pts.shape[:-1], 1, dtype=pts.dtype)], -1) @ h.transpose(-1, -2)
    return p[..., :2] / p[..., 2:]


def test_homography_affine_hand_values():
    src = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)
    dst = 2 * src + 1  # scale 2, shift 1
    h = homography_from_points(src, dst)
    expected = torch.tensor([[2.0, 0, 1], [0, 2, 1], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(h[0], expected, rtol=0, atol=1e-12)


def test_homography_projective_recovers_known_matrix():
    h0 = torch.tensor(
        [
            [[1.2, 0.1, -0.3], [-0.2, 0.9, 0.25], [0.15, -0.1, 1.0]],
            [[0.8, -0.3, 0.1], [0.2, 1.1, 0.0], [-0.05, 0.2, 1.0]],
        ],
        dtype=torch.float64,
    )
    src = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    src = src.expand(2, 4, 2)
    # hand projection: (x', y') = (h00 x + h01 y + h02, h10 x + h11 y + h12) / (h20 x + h21 y + 1)
    x, y = src[..., 0], src[..., 1]
    den = h0[:, 2:3, 0] * x + h0[:, 2:3, 1] * y + 1
    dst = torch.stack(
        [
            (h0[:, 0:1, 0] * x + h0[:, 0:1, 1] * y + h0[:, 0:1, 2]) / den,
            (h0[:, 1:2, 0] * x + h0[:, 1:2, 1] * y + h0[:, 1:2, 2]) / den,
        ],
        -1,
    )
    h = homography_from_points(src, dst)
    torch.testing.assert_close(h, h0, rtol=0, atol=1e-10)
    torch.testing.assert_close(_apply(h, src), dst, rtol=0, atol=1e-10)


def test_perspective_matrix_moves_corners():
    shifts = torch.tensor([[[0.1, 0.2], [0.3, 0.0], [0.05, 0.05], [0.0, 0.4]]], dtype=torch.float64)
    m = perspective_matrix(shifts)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    # moved inwards by hand: (-1 + 0.1, -1 + 0.2), (1 - 0.3, -1), (1 - 0.05, 1 - 0.05), (-1, 1 - 0.4)
    moved = torch.tensor([[-0.9, -0.8], [0.7, -1.0], [0.95, 0.95], [-1.0, 0.6]], dtype=torch.float64)
    torch.testing.assert_close(_apply(m, moved[None])[0], corners, rtol=0, atol=1e-10)
    torch.testing.assert_close(
        perspective_matrix(torch.zeros(1, 4, 2, dtype=torch.float64))[0],
        torch.eye(3, dtype=torch.float64),
        rtol=0,
        atol=1e-12,
    )


def test_affine_matrix_rotation_is_rigid_in_pixels():
    h, w = 100, 200
    m = affine_matrix(
        torch.tensor([90.0], dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        h,
        w,
    )
    # a point 10 px right of the centre maps 10 px below it (x -> y by a quarter turn), in pixels
    p = torch.tensor([[[10 / (w / 2), 0.0]]], dtype=torch.float64)
    q = _apply(m, p)[0, 0]
    torch.testing.assert_close(q, torch.tensor([0.0, 10 / (h / 2)], dtype=torch.float64), rtol=0, atol=1e-12)


# -- warp ---------------------------------------------------------------------------------------------
def test_identity_warp_is_identity():
    img = _smooth(37, 53)
    out = warp(img, torch.eye(3, dtype=torch.float64)[None], (37, 53), fill=0.7)
    torch.testing.assert_close(out, img, rtol=0, atol=1e-5)


def test_flip_warp_equals_torch_flip():
    ramp = torch.linspace(0, 1, 40).view(1, 1, 1, 40).expand(1, 3, 24, 40).contiguous()
    img = ramp * _smooth(24, 40)  # not symmetric in any way
    out = warp(img, flip_matrix(torch.tensor([True, False])), (24, 40), fill=None)
    torch.testing.assert_close(out[0], torch.flip(img[0], dims=[-1]), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], img[0], rtol=0, atol=1e-5)


def test_centred_half_crop_is_the_centre_region():
    img = _smooth(64, 96)
    one = torch.ones(1, dtype=torch.float64)
    m = crop_matrix(0.5 * one, 0.5 * one, 0 * one, 0 * one)
    # at half the size, output pixel i samples input pixel 16 + i (rows) / 24 + j (cols) exactly
    out = warp(img, m, (32, 48), fill=None)
    torch.testing.assert_close(out, img[..., 16:48, 24:72], rtol=0, atol=1e-5)
    # at full size, the crop is the centre of a 2x bilinear upsampling
    big = warp(img, m, (64, 96), fill=None)
    up = F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False)[..., 32:96, 48:144]
    torch.testing.assert_close(big, up, rtol=0, atol=1e-5)


def test_offset_crop_is_a_shifted_region():
    img = _smooth(64, 64)
    s = torch.tensor([0.25], dtype=torch.float64)
    # centre (+0.5, -0.25) in normalised coordinates = pixel (48, 24); half-extent 8 px
    cx, cy = torch.tensor([0.5], dtype=torch.float64), torch.tensor([-0.25], dtype=torch.float64)
    m = crop_matrix(s, s, cx, cy)
    out = warp(img, m, (16, 16), fill=None)
    torch.testing.assert_close(out, img[..., 16:32, 40:56], rtol=0, atol=1e-5)


def test_rotation_fills_corners():
    h, w = 64, 64
    zero = torch.zeros(1, 3, h, w)
    m = affine_matrix(
        torch.tensor([15.0], dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        torch.zeros(1, dtype=torch.float64),
        h,
        w,
    )
    out = warp(zero, m, (h, w), fill=1.0)
    for corner in (out[..., 0, 0], out[..., 0, -1], out[..., -1, 0], out[..., -1, -1]):
        torch.testing.assert_close(corner, torch.ones_like(corner), rtol=0, atol=1e-6)
    assert out[..., 16:48, 16:48].abs().max() < 1e-6  # the middle is still the (zero) image
    # without fill, outside reads zero
    assert warp(zero, m, (h, w), fill=None).abs().max() == 0


def test_make_views_fill_value_outside():
    img = torch.zeros(1, 3, 224, 224)
    zeros = torch.zeros(2, dtype=torch.float64)
    geometry = affine_matrix(torch.tensor([15.0, -15.0], dtype=torch.float64), zeros, zeros, 224, 224)
    crop = torch.eye(3, dtype=torch.float64).repeat(2, 1, 1)  # the whole image
    params = ViewParams(geometry, crop, _identity_colour(2), (224, 224))
    views = make_views(img, params, fill=1.0, min_cover=1.0)
    assert views.shape == (2, 3, 224, 224)
    assert (views[..., :4, :4] > 0.999).all() and (views[..., -4:, -4:] > 0.999).all()
    assert views[..., 80:144, 80:144].abs().max() < 1e-6


# -- colour -------------------------------------------------------------------------------------------
def test_apply_colour_identity():
    x = torch.rand(3, 3, 10, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(apply_colour(x, _identity_colour(3)), x, rtol=0, atol=1e-5)


def test_apply_colour_grayscale_is_luma():
    x = torch.rand(2, 3, 8, 9, generator=torch.Generator().manual_seed(1))
    out = apply_colour(x, _identity_colour(2, grayscale=True))
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        torch.testing.assert_close(out[:, c], luma, rtol=0, atol=1e-5)


def test_apply_colour_grayscale_per_view():
    x = torch.rand(2, 3, 8, 9, generator=torch.Generator().manual_seed(2))
    p = _identity_colour(2)
    p.grayscale = torch.tensor([False, True])
    out = apply_colour(x, p)
    torch.testing.assert_close(out[0], x[0], rtol=0, atol=1e-5)
    assert (out[1, 0] - out[1, 1]).abs().max() < 1e-6


def test_apply_colour_brightness():
    x = torch.full((1, 3, 4, 4), 0.5)
    p = _identity_colour(1)
    p.brightness = torch.tensor([1.1], dtype=torch.float64)
    torch.testing.assert_close(apply_colour(x, p), torch.full_like(x, 0.55), rtol=0, atol=1e-5)
    p.brightness = torch.tensor([3.0], dtype=torch.float64)
    torch.testing.assert_close(apply_colour(x, p), torch.ones_like(x), rtol=0, atol=1e-5)  # clamped


def test_apply_colour_contrast_and_saturation():
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(3)) * 0.5 + 0.25
    p = _identity_colour(1)
    p.contrast = torch.tensor([0.0], dtype=torch.float64)  # everything becomes the mean luma
    mean_luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).mean()
    torch.testing.assert_close(apply_colour(x, p), torch.full_like(x, mean_luma.item()), rtol=0, atol=1e-5)
    p = _identity_colour(1)
    p.saturation = torch.tensor([0.0], dtype=torch.float64)  # saturation 0 = greyscale
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(apply_colour(x, p), luma.unsqueeze(1).expand_as(x), rtol=0, atol=1e-5)


def test_apply_colour_hue_keeps_luma_and_full_turn_is_identity():
    x = torch.rand(1, 3, 6, 6, generator=torch.Generator().manual_seed(4)) * 0.4 + 0.3
    p = _identity_colour(1)
    p.hue = torch.tensor([0.05], dtype=torch.float64)
    out = apply_colour(x, p)
    assert (out - x).abs().max() > 1e-3  # the colours changed
    luma = lambda t: 0.299 * t[:, 0] + 0.587 * t[:, 1] + 0.114 * t[:, 2]  # noqa: E731
    torch.testing.assert_close(luma(out), luma(x), rtol=0, atol=1e-4)  # YIQ rotation keeps Y
    p.hue = torch.tensor([1.0], dtype=torch.float64)
    torch.testing.assert_close(apply_colour(x, p), x, rtol=0, atol=1e-5)


# -- CLIP views ---------------------------------------------------------------------------------------
def test_make_views_without_augmentation_is_the_resized_image():
    cfg = _no_aug_config()
    img = _smooth(300, 420)
    size = view_size(300, 420, 224, cfg.max_long_side)
    params = ViewParams.draw(4, size, cfg, torch.Generator().manual_seed(0))
    assert params.size == (224, 313)  # int(224·420/300) = 313: the aspect ratio kept
    views = make_views(img, params, fill=cfg.fill, min_cover=cfg.min_cover)
    ref = F.interpolate(img, size=(224, 313), mode="bilinear", antialias=True, align_corners=False)
    assert views.shape == (4, 3, 224, 313)
    for v in views:
        torch.testing.assert_close(v, ref[0], rtol=0, atol=1e-4)


def test_make_views_without_augmentation_at_view_size_is_the_image():
    cfg = _no_aug_config()
    img = _smooth(224, 320)
    size = view_size(224, 320, 224, cfg.max_long_side)
    params = ViewParams.draw(3, size, cfg, torch.Generator().manual_seed(1))
    views = make_views(img, params, fill=cfg.fill, min_cover=cfg.min_cover)
    torch.testing.assert_close(views, img.expand(3, -1, -1, -1), rtol=0, atol=1e-5)


def test_view_zero_is_the_whole_image():
    """Even with crops on, view 0 covers the whole image (flip etc. off)."""
    cfg = _no_aug_config(min_cover=0.6)
    img = _smooth(224, 224)
    params = ViewParams.draw(5, view_size(224, 224), cfg, torch.Generator().manual_seed(2))
    views = make_views(img, params, fill=cfg.fill, min_cover=1.0)
    torch.testing.assert_close(views[0], img[0], rtol=0, atol=1e-5)
    assert (views[1:] - img).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # the others are crops


def test_make_views_full_augmentation_shapes_and_range():
    cfg = ViewConfig(affine_p=1.0, perspective_p=1.0, jitter_p=1.0, grayscale_p=0.5, flip_p=0.5)
    img = _smooth(200, 350)
    size = view_size(200, 350, 224, cfg.max_long_side)
    params = ViewParams.draw(8, size, cfg, torch.Generator().manual_seed(3))
    assert len(params) == 8 and params.geometry.shape == (8, 2, 3, 3)
    views = make_views(img, params, fill=cfg.fill, min_cover=cfg.min_cover)
    assert views.shape == (8, 3, 182, 320)  # 350·224/200 = 392 > 320: long 320, short int(320·224/392)
    assert torch.isfinite(views).all()
    assert views.min() >= 0 and views.max() <= 1
    # views differ from each other
    flat = views.flatten(1)
    assert torch.cdist(flat, flat).fill_diagonal_(1.0).min() > 1e-3


def test_make_views_gradient_flows():
    img = _smooth(160, 160).requires_grad_(True)
    params = ViewParams.draw(3, (224, 224), ViewConfig(), torch.Generator().manual_seed(4))
    make_views(img, params, fill=1.0, min_cover=0.6).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


def test_make_views_batched_equals_per_image():
    cfg = ViewConfig()
    imgs = torch.cat([_smooth(240, 260), 1 - _smooth(240, 260)])
    size = view_size(240, 260)
    p0 = ViewParams.draw(3, size, cfg, torch.Generator().manual_seed(10))
    p1 = ViewParams.draw(3, size, cfg, torch.Generator().manual_seed(11))
    both = ViewParams.cat([p0, p1])
    assert len(both) == 6
    torch.testing.assert_close(both[3:].geometry, p1.geometry, rtol=0, atol=0)
    torch.testing.assert_close(both[:3].colour.hue, p0.colour.hue, rtol=0, atol=0)
    views = make_views(imgs, both, cfg.fill, cfg.min_cover)
    assert views.shape == (6, 3, *size)
    for i, p in enumerate((p0, p1)):
        alone = make_views(imgs[i : i + 1], p, cfg.fill, cfg.min_cover)
        torch.testing.assert_close(views[3 * i : 3 * i + 3], alone, rtol=0, atol=1e-6)
    with pytest.raises(ValueError):
        make_views(imgs, p0, cfg.fill, cfg.min_cover)  # 3 views do not split over 2 images


def test_view_params_seeded():
    cfg = ViewConfig()
    a = ViewParams.draw(6, (224, 256), cfg, torch.Generator().manual_seed(7))
    b = ViewParams.draw(6, (224, 256), cfg, torch.Generator().manual_seed(7))
    c = ViewParams.draw(6, (224, 256), cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a.geometry, b.geometry) and a.size == b.size
    for name in ("brightness", "contrast", "saturation", "hue", "grayscale"):
        assert torch.equal(getattr(a.colour, name), getattr(b.colour, name))
    assert not torch.equal(a.geometry, c.geometry)
    img = _smooth(256, 300)
    va = make_views(img, a, 1.0, cfg.min_cover)
    assert torch.equal(va, make_views(img, b, 1.0, cfg.min_cover))
    assert not torch.allclose(va, make_views(img, c, 1.0, cfg.min_cover))


def test_colour_params_draw_ranges():
    p = ColourParams.draw(400, 1.0, 0.1, 0.0, torch.Generator().manual_seed(0))
    for f in (p.brightness, p.contrast, p.saturation):
        assert f.min() >= 0.9 and f.max() <= 1.1 and f.std() > 0.03
    assert p.hue.abs().max() <= 0.1 and not p.grayscale.any()
    off = ColourParams.draw(50, 0.0, 0.1, 1.0, torch.Generator().manual_seed(0))
    assert (off.brightness == 1).all() and (off.hue == 0).all() and off.grayscale.all()


# -- training examples --------------------------------------------------------------------------------
def test_draw_example_sizes_and_range():
    cfg = DataConfig()
    h, w = 200, 300
    img = _smooth(h, w)
    gen = torch.Generator().manual_seed(0)
    sizes = set()
    for _ in range(25):
        ex = draw_example(img, cfg, gen, min_side=129)
        eh, ew = ex.shape[-2:]
        sizes.add((eh, ew))
        assert ex.shape[:2] == (1, 3)
        for side, out in ((h, eh), (w, ew)):
            assert out >= 129
            lo, hi = math.floor(cfg.scale_min * cfg.crop_min_cover * side), math.ceil(cfg.scale_max * side)
            assert lo <= out <= hi
        assert ex.min() >= 0 and ex.max() <= 1 and torch.isfinite(ex).all()
    assert len(sizes) > 10  # sizes really vary


def test_draw_example_min_side_enforced():
    img = _smooth(140, 150)  # 0.8 * 0.85 * 140 = 95 < 129
    gen = torch.Generator().manual_seed(1)
    for _ in range(10):
        ex = draw_example(img, DataConfig(), gen, min_side=129)
        assert min(ex.shape[-2:]) >= 129


def test_draw_example_bucketed_sizes():
    img = _smooth(200, 300)
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        ex = draw_example(img, DataConfig(), gen, min_side=129, multiple=32)
        eh, ew = ex.shape[-2:]
        assert eh % 32 == 0 and ew % 32 == 0 and min(eh, ew) >= 129
        # nearest multiple of 32 of the unbucketed bounds
        assert 160 - 16 <= eh <= 240 + 16 and 32 * round(0.8 * 0.85 * 300 / 32) <= ew <= 360 + 16


def test_draw_example_without_augmentation_is_the_image():
    cfg = DataConfig(crop_min_cover=1.0, flip_p=0.0, jitter_p=0.0, scale_min=1.0, scale_max=1.0)
    img = _smooth(140, 170)
    ex = draw_example(img, cfg, torch.Generator().manual_seed(0), min_side=129)
    torch.testing.assert_close(ex, img, rtol=0, atol=1e-5)
    cfg.flip_p = 1.0
    ex = draw_example(img, cfg, torch.Generator().manual_seed(0), min_side=129)
    torch.testing.assert_close(ex, torch.flip(img, dims=[-1]), rtol=0, atol=1e-5)


def test_draw_example_seeded():
    img = _smooth(180, 200)
    cfg = DataConfig()
    a = draw_example(img, cfg, torch.Generator().manual_seed(5), 129)
    b = draw_example(img, cfg, torch.Generator().manual_seed(5), 129)
    assert torch.equal(a, b)
    others = [draw_example(img, cfg, torch.Generator().manual_seed(s), 129) for s in (6, 7)]
    assert any(o.shape != a.shape or not torch.allclose(o, a) for o in others)
