"""The Deep-Image-Prior skip generator: shapes, minimum size, colour decorrelation, BN, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from t2l_fast.config import GeneratorConfig
from t2l_fast.models.generator import Generator, min_side

SMALL = GeneratorConfig(scales=7, channels_down=8, channels_up=8, channels_skip=4)


def _input(h: int, w: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("hw", [(129, 131), (150, 203), (203, 150)])
def test_output_shape_equals_input_small(hw):
    torch.manual_seed(0)
    g = Generator(SMALL)
    out = g(_input(*hw))
    assert out.shape == (1, 4, *hw)
    assert (out > 0).all() and (out < 1).all()
    assert torch.isfinite(out).all()


def _level_with_min_crops(level, x):
    """The original's rule, written independently: crop the skip and the upsampled deep map to the
    smaller of their sizes (centre crops)."""

    def crop(t, h, w):
        dh, dw = (t.shape[2] - h) // 2, (t.shape[3] - w) // 2
        return t[:, :, dh : dh + h, dw : dw + w]

    deep = level.down(x)
    if level.inner is not None:
        deep = _level_with_min_crops(level.inner, deep)
    deep = torch.nn.functional.interpolate(deep, scale_factor=2, mode="bilinear", align_corners=False)
    if level.skip is None:
        return level.up(crop(deep, min(x.shape[2], deep.shape[2]), min(x.shape[3], deep.shape[3])))
    skip = level.skip(x)
    h, w = min(skip.shape[2], deep.shape[2]), min(skip.shape[3], deep.shape[3])
    return level.up(torch.cat([crop(skip, h, w), crop(deep, h, w)], dim=1))


@pytest.mark.parametrize("skip", [4, 0])
def test_crops_follow_the_input_size_as_the_min_rule_does(skip):
    torch.manual_seed(0)
    g = Generator(GeneratorConfig(scales=7, channels_down=8, channels_up=8, channels_skip=skip))
    for hw in [(129, 131), (203, 150), (257, 191), (192, 320)]:
        x = _input(*hw)
        logits = g.head(_level_with_min_crops(g.body, x))
        rgb = torch.einsum("dc,bchw->bdhw", g.decorrelate, logits[:, :3])
        expected = torch.sigmoid(torch.cat([rgb, logits[:, 3:]], dim=1))
        # the same sample positions; the upsampling op given its output size rounds a few ulps apart
        torch.testing.assert_close(g(x), expected, rtol=1e-5, atol=1e-6)


def test_output_shape_default_config():
    torch.manual_seed(0)
    g = Generator()
    out = g(_input(129, 133))
    assert out.shape == (1, 4, 129, 133)
    assert (out > 0).all() and (out < 1).all()


def test_output_shape_without_skip_channels():
    """With no skip branch the decoder must still crop back to the input size."""
    g = Generator(GeneratorConfig(scales=7, channels_down=8, channels_up=8, channels_skip=0))
    assert g(_input(131, 133)).shape == (1, 4, 131, 133)


def test_fewer_scales():
    g = Generator(GeneratorConfig(scales=3, channels_down=8, channels_up=8, channels_skip=4))
    assert g.min_side == 9
    assert g(_input(9, 15)).shape == (1, 4, 9, 15)
    with pytest.raises(ValueError):
        g(_input(8, 15))


def test_min_side():
    assert min_side(7) == 129
    assert min_side(1) == 3
    # by hand: 7 stride-2 convs (out = ceil(n / 2)) must leave >= 2 px for the reflection pad
    n = 129
    for _ in range(7):
        n = -(-n // 2)
    assert n == 2
    g = Generator(SMALL)
    assert g.min_side == 129
    with pytest.raises(ValueError, match="129"):
        g(_input(128, 200))
    with pytest.raises(ValueError):
        g(_input(200, 128))


def test_decorrelation_matrix():
    g = Generator(SMALL)
    m = g.decorrelate
    # independent construction: the colour covariance square root, first column / 1.6, / max column norm
    ref = [[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]]
    ref = [[row[0] / 1.6, row[1], row[2]] for row in ref]
    norms = [sum(ref[r][c] ** 2 for r in range(3)) ** 0.5 for c in range(3)]
    ref = torch.tensor(ref, dtype=torch.float64) / max(norms)
    torch.testing.assert_close(m.double(), ref, rtol=0, atol=1e-7)
    assert m.norm(dim=0).max().item() == pytest.approx(1.0, abs=1e-6)
    # it is a constant, not a trained parameter, and not saved in checkpoints
    assert all(p is not m for p in g.parameters())
    assert "decorrelate" not in g.state_dict()


def test_output_is_sigmoid_of_decorrelated_logits():
    """RGB = sigmoid(M @ logits[:3]) per pixel (the reference's einsum with M transposed), alpha =
    sigmoid(logits[3])."""
    torch.manual_seed(0)
    g = Generator(SMALL)
    captured = {}
    g.head.register_forward_hook(lambda mod, inp, out: captured.setdefault("logits", out.detach()))
    x = _input(129, 131)
    out = g(x)
    logits = captured["logits"]
    m = g.decorrelate
    rgb = torch.zeros_like(logits[:, :3])
    for d in range(3):  # plain loops: rgb_d = sum_c M[d, c] * logit_c
        for c in range(3):
            rgb[:, d] += m[d, c] * logits[:, c]
    torch.testing.assert_close(out[:, :3], torch.sigmoid(rgb), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[:, 3], torch.sigmoid(logits[:, 3]), rtol=1e-5, atol=1e-6)


def test_batchnorm_has_no_running_stats_and_eval_equals_train():
    torch.manual_seed(0)
    g = Generator(SMALL)
    bns = [m for m in g.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:
        assert bn.track_running_stats is False
        assert bn.running_mean is None and bn.running_var is None and bn.num_batches_tracked is None
    assert not any("running" in k or "num_batches" in k for k in g.state_dict())
    assert [name for name, _ in g.named_buffers()] == ["decorrelate"]
    x = _input(129, 131, batch=2)
    g.train()
    a = g(x)
    g.eval()
    b = g(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # batch statistics: an image's output depends on the rest of the batch
    assert not torch.allclose(g(x[:1]), a[:1], atol=1e-6)


def _conv(cin: int, cout: int, k: int) -> int:
    return cin * cout * k * k + cout  # weights + bias


def _bn(c: int) -> int:
    return 2 * c  # affine weight + bias


def _expected_params(scales: int, d: int, u: int, s: int) -> int:
    """DESIGN §1 / the reference's skip(): per scale a 1x1 skip branch (conv, BN); down: stride-2 3x3
    conv, BN, 3x3 conv, BN; up: BN over skip + deeper channels, 3x3 conv, BN, 1x1 conv, BN except at the
    outermost scale; then a 1x1 conv to 4 channels."""
    total = 0
    for i in range(scales):
        cin = 3 if i == 0 else d
        deeper = d if i == scales - 1 else u
        total += _conv(cin, s, 1) + _bn(s)
        total += _conv(cin, d, 3) + _bn(d) + _conv(d, d, 3) + _bn(d)
        total += _bn(s + deeper) + _conv(s + deeper, u, 3) + _bn(u) + _conv(u, u, 1)
        total += _bn(u) if i > 0 else 0
    return total + _conv(u, 4, 1)


def test_parameter_count_default():
    g = Generator()
    n = sum(p.numel() for p in g.parameters())
    assert n == _expected_params(7, 128, 128, 4)
    # the same sum by hand: outermost scale 24 + 151,680 + 169,224 = 320,928; each of the 6 inner
    # scales 524 + 295,680 + 169,480 = 465,684; head 516
    assert n == 320_928 + 6 * 465_684 + 516 == 3_115_548


OTHER = GeneratorConfig(scales=4, channels_down=16, channels_up=12, channels_skip=2)


@pytest.mark.parametrize("cfg", [SMALL, OTHER])
def test_parameter_count_small(cfg):
    g = Generator(cfg)
    n = sum(p.numel() for p in g.parameters())
    assert n == _expected_params(cfg.scales, cfg.channels_down, cfg.channels_up, cfg.channels_skip)


def test_layer_counts():
    g = Generator(SMALL)
    convs = [m for m in g.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7 * 5 + 1  # skip, 2 down, 2 up per scale + head
    assert sum(m.stride == (2, 2) for m in convs) == 7
    assert sum(isinstance(m, nn.ReflectionPad2d) for m in g.modules()) == 7 * 3  # every 3x3 conv
    assert sum(isinstance(m, nn.BatchNorm2d) for m in g.modules()) == 7 * 6 - 1
    assert all(m.bias is not None for m in convs)


def test_same_seed_same_init():
    torch.manual_seed(123)
    a = Generator(SMALL)
    torch.manual_seed(123)
    b = Generator(SMALL)
    torch.manual_seed(124)
    c = Generator(SMALL)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("weight") and sa[k].dim() == 4)
    x = _input(129, 129)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    g = Generator(SMALL)
    g(_input(129, 131)).square().mean().backward()
    for name, p in g.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
