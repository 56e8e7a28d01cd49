"""Layered neural atlases: checkpoint format, precomputation, discretisation, AtlasData sampling."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from t2l_fast.io import InputError
from t2l_fast.models.atlas import AtlasCheckpointError, AtlasData, TexelBox, texel_box
from t2l_fast.models.nla import (
    KEY_ALPHA,
    KEY_ATLAS,
    KEY_BACKGROUND_MAPPING,
    KEY_FOREGROUND_MAPPING,
    NLAMLP,
    NLAModels,
    load_nla_checkpoint,
    positional_encoding,
    precompute_atlas,
    save_nla_checkpoint,
)

T, H, W = 4, 12, 18  # small video for precompute tests
R = 128  # atlas grid for tests


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.float(), b.float()).item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


# ----------------------------------------------------------------------------- networks & format


def test_positional_encoding_order():
    x = torch.tensor([[0.1, -0.3], [0.7, 0.25]])
    freqs = torch.tensor([(2.0**k) * math.pi for k in range(3)])
    rows = []
    for p in x:
        row = []
        for k in range(3):
            row += [math.sin(freqs[k] * p[d]) for d in range(2)]
            row += [math.cos(freqs[k] * p[d]) for d in range(2)]
        rows.append(row)
    torch.testing.assert_close(positional_encoding(x, freqs), torch.tensor(rows), atol=1e-6, rtol=0)


def test_default_architecture_shapes():
    """The original checkpoint's architecture: widths, depths, encodings, skip inputs."""
    m = NLAModels.create(width=256, seed=0)
    fg, bg, atlas, alpha = (
        m.foreground_mapping.state_dict(),
        m.background_mapping.state_dict(),
        m.atlas.state_dict(),
        m.alpha.state_dict(),
    )
    assert (
        len(fg) == 12 and fg["hidden.0.weight"].shape == (256, 3) and fg["hidden.5.weight"].shape == (2, 256)
    )
    assert len(bg) == 8 and bg["hidden.3.weight"].shape == (2, 256)
    assert atlas["hidden.0.weight"].shape == (256, 40)
    assert atlas["hidden.4.weight"].shape == (256, 296) and atlas["hidden.7.weight"].shape == (3, 296)
    assert atlas["hidden.5.weight"].shape == (256, 256)
    assert alpha["hidden.0.weight"].shape == (256, 30) and alpha["hidden.7.weight"].shape == (1, 256)
    assert set(atlas) == {f"hidden.{i}.{p}" for i in range(8) for p in ("weight", "bias")}


def test_checkpoint_round_trip(tmp_path):
    models = NLAModels.create(width=32, seed=0)
    path = tmp_path / "checkpoint"
    save_nla_checkpoint(path, models, iteration=1234)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {
        KEY_FOREGROUND_MAPPING,
        KEY_BACKGROUND_MAPPING,
        KEY_ATLAS,
        KEY_ALPHA,
        "iteration",
        "optimizer_all_state_dict",
    }
    assert raw["iteration"] == 1234 and raw["optimizer_all_state_dict"] == {}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint"]  # no temp file left

    loaded = load_nla_checkpoint(path)
    assert loaded.atlas.skip_layers == (4, 7) and loaded.atlas.pe_freqs == 10 and loaded.atlas.width == 32
    assert loaded.alpha.pe_freqs == 5 and loaded.alpha.skip_layers == ()
    assert loaded.foreground_mapping.num_layers == 6 and loaded.background_mapping.num_layers == 4
    assert not any(p.requires_grad for m in loaded.modules().values() for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    xyt = torch.rand(50, 3, generator=g) * 2 - 1
    uv = torch.rand(50, 2, generator=g) * 2 - 1
    with torch.no_grad():
        for name in ("foreground_mapping", "background_mapping", "alpha"):
            torch.testing.assert_close(getattr(loaded, name)(xyt), getattr(models, name)(xyt), atol=0, rtol=0)
        torch.testing.assert_close(loaded.atlas(uv), models.atlas(uv), atol=0, rtol=0)


def test_checkpoint_other_architecture_is_inferred(tmp_path):
    """Widths, depths, encodings and skips come from the shapes, e.g. a mapping with encoding."""
    models = NLAModels(
        foreground_mapping=NLAMLP(3, 2, 24, num_layers=5, pe_freqs=4),
        background_mapping=NLAMLP(3, 2, 16, num_layers=3, pe_freqs=2),
        atlas=NLAMLP(2, 3, 20, num_layers=6, pe_freqs=7, skip_layers=(2, 5)),
        alpha=NLAMLP(3, 1, 12, num_layers=4, pe_freqs=3, skip_layers=(3,)),
    )
    save_nla_checkpoint(tmp_path / "c.pth", models)
    loaded = load_nla_checkpoint(tmp_path / "c.pth")
    for name in ("foreground_mapping", "background_mapping", "atlas", "alpha"):
        a, b = getattr(loaded, name), getattr(models, name)
        assert (a.width, a.num_layers, a.pe_freqs, a.skip_layers) == (
            b.width,
            b.num_layers,
            b.pe_freqs,
            b.skip_layers,
        )


def test_checkpoint_with_optimizer_state_loads_safely(tmp_path):
    """A real NLA checkpoint also holds the Adam state of all four networks; weights_only reads it."""
    models = NLAModels.create(width=8, seed=0)
    params = [p for m in models.modules().values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": params[:4]}, {"params": params[4:]}], lr=1e-4)
    sum(p.square().sum() for p in params).backward()
    opt.step()
    save_nla_checkpoint(tmp_path / "ckpt", models, iteration=7, optimizer_state=opt.state_dict())
    loaded = load_nla_checkpoint(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.atlas.hidden[0].weight, models.atlas.hidden[0].weight)


def _write_ckpt(path, obj):
    torch.save(obj, path)
    return path


def _state(models: NLAModels) -> dict:
    return {key: dict(m.state_dict()) for key, m in models.modules().items()} | {
        "iteration": 0,
        "optimizer_all_state_dict": {},
    }


def test_bad_checkpoints(tmp_path):
    with pytest.raises(AtlasCheckpointError, match="not found"):
        load_nla_checkpoint(tmp_path / "missing.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    with pytest.raises(AtlasCheckpointError, match="not a readable NLA checkpoint"):
        load_nla_checkpoint(garbage)

    with pytest.raises(AtlasCheckpointError, match="not a dict"):
        load_nla_checkpoint(_write_ckpt(tmp_path / "list.pth", [torch.zeros(2)]))

    state = _state(NLAModels.create(width=8, seed=0))
    del state[KEY_ATLAS]
    with pytest.raises(AtlasCheckpointError, match="missing key.*F_atlas_state_dict"):
        load_nla_checkpoint(_write_ckpt(tmp_path / "nokey.pth", state))

    state = _state(NLAModels.create(width=8, seed=0))
    del state[KEY_ALPHA]["hidden.3.bias"]
    with pytest.raises(
        AtlasCheckpointError, match=r"model_F_alpha_state_dict is missing key.*'hidden\.3\.bias'"
    ):
        load_nla_checkpoint(_write_ckpt(tmp_path / "nobias.pth", state))

    state = _state(NLAModels.create(width=8, seed=0))
    del state[KEY_ATLAS]["hidden.3.weight"], state[KEY_ATLAS]["hidden.3.bias"]
    with pytest.raises(AtlasCheckpointError, match=r"F_atlas_state_dict is missing key.*'hidden\.3\.bias'"):
        load_nla_checkpoint(_write_ckpt(tmp_path / "gap.pth", state))

    state = _state(NLAModels.create(width=8, seed=0))
    state[KEY_BACKGROUND_MAPPING]["hidden.2.weight"] = torch.zeros(8, 5)
    with pytest.raises(
        AtlasCheckpointError, match=r"model_F_mapping2_state_dict: 'hidden\.2\.weight' has shape \(8, 5\)"
    ):
        load_nla_checkpoint(_write_ckpt(tmp_path / "shape.pth", state))

    state = _state(NLAModels.create(width=8, seed=0))
    state[KEY_FOREGROUND_MAPPING]["hidden.5.weight"] = torch.zeros(3, 8)  # 3 outputs instead of 2
    with pytest.raises(
        AtlasCheckpointError, match=r"'hidden\.5\.weight' has shape \(3, 8\), expected \(2, 8\)"
    ):
        load_nla_checkpoint(_write_ckpt(tmp_path / "out.pth", state))

    state = _state(NLAModels.create(width=8, seed=0))
    state[KEY_ATLAS]["hidden.0.bias"] = torch.zeros(9)
    with pytest.raises(AtlasCheckpointError, match=r"F_atlas_state_dict: 'hidden\.0\.bias'"):
        load_nla_checkpoint(_write_ckpt(tmp_path / "bias.pth", state))


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled arbitrary code",))


def test_checkpoint_loading_does_not_unpickle_arbitrary_objects(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"x": _Evil()}, f, protocol=2)
    with pytest.raises(AtlasCheckpointError, match="not a readable NLA checkpoint") as e:
        load_nla_checkpoint(path)
    assert isinstance(e.value, InputError)
    assert "\n" not in str(e.value)
    assert "unpickled arbitrary code" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- precompute


def _direct_xyt(num_frames: int, trained_frames: int) -> torch.Tensor:
    """(T·H·W, 3) normalised coordinates, written independently of the library (row-major t, y, x)."""
    t, y, x = torch.meshgrid(torch.arange(num_frames), torch.arange(H), torch.arange(W), indexing="ij")
    half = max(H, W) / 2
    return (
        torch.stack([x / half - 1, y / half - 1, t / (trained_frames / 2) - 1], dim=-1).reshape(-1, 3).float()
    )


def test_precompute_chunked_equals_unchunked():
    models = NLAModels.create(width=32, seed=1)
    chunked = precompute_atlas(models, T, H, W, grid=R, chunk=37)
    whole = precompute_atlas(models, T, H, W, grid=R, chunk=10**9)
    for name in ("uv_background", "uv_foreground", "alpha", "background_atlas", "foreground_atlas"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-6, rtol=0)
    assert chunked.background_box == whole.background_box and chunked.foreground_box == whole.foreground_box

    # ... and both equal a direct, unchunked evaluation with the documented formulas
    with torch.no_grad():
        xyt = _direct_xyt(T, T)
        uv_b = (models.background_mapping(xyt) * 0.5 - 0.5).view(T, H, W, 2)
        uv_f = (models.foreground_mapping(xyt) * 0.5 + 0.5).view(T, H, W, 2)
        alpha = (0.99 * 0.5 * (models.alpha(xyt) + 1) + 0.001).view(T, H, W)
    torch.testing.assert_close(chunked.uv_background, uv_b, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked.uv_foreground, uv_f, atol=1e-6, rtol=0)
    torch.testing.assert_close(chunked.alpha, alpha, atol=1e-6, rtol=0)

    for layer, uv, s in (("background", uv_b, -1.0), ("foreground", uv_f, 0.0)):
        box = chunked.box(layer)
        p = (uv.reshape(-1, 2) - s) * R
        assert box.u0 == math.floor(p[:, 0].min()) and box.v0 == math.floor(p[:, 1].min())
        assert box.u0 + box.width - 1 == math.ceil(p[:, 0].max())
        assert box.v0 + box.height - 1 == math.ceil(p[:, 1].max())
        # texel (row v, col u) of the full grid holds (u/R + s, v/R + s)
        v, u = torch.meshgrid(
            torch.arange(box.v0, box.v0 + box.height), torch.arange(box.u0, box.u0 + box.width), indexing="ij"
        )
        coords = torch.stack([u / R + s, v / R + s], dim=-1).reshape(-1, 2).float()
        with torch.no_grad():
            expect = ((models.atlas(coords) + 1) / 2).view(box.height, box.width, 3).permute(2, 0, 1)
        torch.testing.assert_close(chunked.atlas_image(layer), expect, atol=1e-6, rtol=0)


def test_precompute_frame_count():
    models = NLAModels.create(width=16, seed=2)
    with pytest.raises(InputError, match="trained on 3"):
        precompute_atlas(models, T, H, W, grid=R, trained_frames=3)
    # fewer frames than trained: t is normalised by the trained count
    data = precompute_atlas(models, 2, H, W, grid=R, trained_frames=8)
    with torch.no_grad():
        alpha = (0.99 * 0.5 * (models.alpha(_direct_xyt(2, 8)) + 1) + 0.001).view(2, H, W)
    torch.testing.assert_close(data.alpha, alpha, atol=1e-6, rtol=0)


def test_precompute_trained_size_rescales_pixel_centres():
    """Evaluating at half the trained resolution samples the trained grid at the matching pixel centres."""
    models = NLAModels.create(width=16, seed=3)
    data = precompute_atlas(models, 1, H // 2, W // 2, grid=R, trained_size=(W, H))
    x = (torch.arange(W // 2) + 0.5) * 2 - 0.5
    y = (torch.arange(H // 2) + 0.5) * 2 - 0.5
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    half = max(H, W) / 2
    xyt = torch.stack([xx / half - 1, yy / half - 1, torch.full_like(xx, -1.0)], dim=-1).reshape(-1, 2 + 1)
    with torch.no_grad():
        uv = (models.background_mapping(xyt) * 0.5 - 0.5).view(1, H // 2, W // 2, 2)
    torch.testing.assert_close(data.uv_background, uv, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- discretisation


class _AnalyticAtlas(nn.Module):
    """A smooth atlas function (N, 2) -> (N, 3) in [-1, 1]."""

    def forward(self, uv: torch.Tensor) -> torch.Tensor:
        u, v = uv[:, 0], uv[:, 1]
        return torch.stack([torch.sin(3 * u + 1), torch.cos(2 * v - 0.5), 0.8 * torch.tanh(u - v)], dim=1)


class _AnalyticMapping(nn.Module):
    """A smooth mapping (N, 3) -> (N, 2) inside (-1, 1) with a per-frame pan."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift

    def forward(self, xyt: torch.Tensor) -> torch.Tensor:
        x, y, t = xyt[:, 0], xyt[:, 1], xyt[:, 2]
        return torch.stack([0.6 * x + 0.1 * t + self.shift, 0.5 * y - 0.05 * t], dim=1)


class _ConstAlpha(nn.Module):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def forward(self, xyt: torch.Tensor) -> torch.Tensor:
        return torch.full((xyt.shape[0], 1), self.value)


def _analytic_models(alpha_tanh: float = -1.0) -> NLAModels:
    return NLAModels(
        _AnalyticMapping(0.05), _AnalyticMapping(-0.1), _AnalyticAtlas(), _ConstAlpha(alpha_tanh)
    )


def test_discretisation_texels_and_half_texel_convention():
    data = precompute_atlas(_analytic_models(), T, H, W, grid=R, chunk=100)
    f = _AnalyticAtlas()
    for layer, s in (("background", -1.0), ("foreground", 0.0)):
        box, img = data.box(layer), data.atlas_image(layer)
        # texel (row v, col u) holds the atlas at (u/R + s, v/R + s)
        for v, u in ((0, 0), (box.height - 1, box.width - 1), (box.height // 2, box.width // 3)):
            uv = torch.tensor([[(box.u0 + u) / R + s, (box.v0 + v) / R + s]])
            torch.testing.assert_close(img[:, v, u], ((f(uv) + 1) / 2)[0], atol=1e-6, rtol=0)
        # sampling at the UVs of texel centres returns exactly those texels
        centres = data.texel_coords(layer)  # (h, w, 2)
        g = data.to_grid(centres, layer).unsqueeze(0)
        resampled = F.grid_sample(img.unsqueeze(0), g, mode="bilinear", align_corners=False)[0]
        torch.testing.assert_close(resampled, img, atol=1e-5, rtol=0)
        # every pixel's UV lies inside the crop (in texel-centre units)
        p = data.to_texel(data.uv(layer), layer)
        assert p.min() >= 0 and p[..., 0].max() <= box.width - 1 and p[..., 1].max() <= box.height - 1
        # the sampled layer approximates the continuous atlas closely; without the half texel it does not
        expect = ((f(data.uv(layer).reshape(-1, 2)) + 1) / 2).view(T, H, W, 3).permute(0, 3, 1, 2)
        sampled = data.sample(layer)
        err = (sampled - expect).abs().max().item()
        assert err < 2e-3, err
        naive = 2 * p / torch.tensor([box.width, box.height]) - 1  # the reference's g = 2p/w - 1
        off = F.grid_sample(img.unsqueeze(0).expand(T, -1, -1, -1), naive, align_corners=False)
        assert (off - expect).abs().max().item() > 3 * err


def test_uv_mask_and_layers():
    data = precompute_atlas(_analytic_models(alpha_tanh=-1.0), T, H, W, grid=R)
    for layer in ("background", "foreground"):
        mask = data.uv_mask(layer)
        box = data.box(layer)
        assert mask.shape == (box.height, box.width) and mask.any()
        # the crop is tight: the first and last rows / columns are touched
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    fg, bg = data.layer("foreground"), data.layer("background")
    # one convention: the foreground's opacity is A, the background's 1 - A (the object occludes it)
    assert fg.opacity is data.alpha
    torch.testing.assert_close(bg.opacity, 1 - data.alpha, rtol=0, atol=0)
    torch.testing.assert_close(bg.grid(), data.to_grid(data.uv_background, "background"))
    torch.testing.assert_close(fg.grid(slice(1, 3)), data.to_grid(data.uv_foreground[1:3], "foreground"))
    torch.testing.assert_close(fg.texels, data.to_texel(data.uv_foreground, "foreground"))
    assert fg.atlas.shape[1:] == (data.foreground_box.height, data.foreground_box.width)
    with pytest.raises(ValueError, match="unknown atlas layer"):
        data.layer("middle")
    # tanh = -1 everywhere -> alpha = 0.001: no foreground
    assert data.foreground_is_empty() and data.foreground_empty_frames() == list(range(T))
    full = precompute_atlas(_analytic_models(alpha_tanh=1.0), T, H, W, grid=R)
    assert not full.foreground_is_empty() and full.foreground_empty_frames() == []
    torch.testing.assert_close(full.alpha, torch.full((T, H, W), 0.991))


# ----------------------------------------------------------------------------- synthetic video


def _panning_scene(
    num_frames: int, h: int, w: int, grid: int, pan: tuple[float, float], texture_fn
) -> tuple[AtlasData, torch.Tensor]:
    """A background texture panned by ``pan`` texels per frame; returns the atlas and the true frames.

    Pixel (x, y) of frame t shows the texture at texel position (x + pan_x·t + 3, y + pan_y·t + 2).
    """
    t, y, x = torch.meshgrid(
        torch.arange(num_frames).float(), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"
    )
    px, py = x + pan[0] * t + 3, y + pan[1] * t + 2  # texel positions in the full grid
    u0, v0 = int(math.floor(px.min())) - 1, int(math.floor(py.min())) - 1  # one spare texel around
    box = TexelBox(u0, v0, int(math.ceil(px.max())) - u0 + 2, int(math.ceil(py.max())) - v0 + 2)
    tv, tu = torch.meshgrid(
        torch.arange(box.height).float() + v0, torch.arange(box.width).float() + u0, indexing="ij"
    )
    texture = texture_fn(tu, tv)  # (3, h_box, w_box), defined on full-grid texel positions
    uv_bg = torch.stack([px / grid - 1.0, py / grid - 1.0], dim=-1)  # background: s = -1
    frames = texture_fn(px, py).permute(1, 0, 2, 3)  # (T, 3, H, W)
    fg_box = TexelBox(0, 0, 2, 2)
    data = AtlasData(
        uv_background=uv_bg,
        uv_foreground=torch.full((num_frames, h, w, 2), 0.5 / grid),
        alpha=torch.full((num_frames, h, w), 0.001),
        background_atlas=texture,
        foreground_atlas=torch.zeros(3, 2, 2),
        background_box=box,
        foreground_box=fg_box,
        grid=grid,
    )
    return data, frames


def test_synthetic_panning_video_integer_pan():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(3, 200, 200, generator=g)

    def texture_fn(pu, pv):  # random texture looked up at integer texel positions
        return noise[:, pv.round().long(), pu.round().long()]

    data, frames = _panning_scene(8, 24, 32, 256, (4.0, 1.0), texture_fn)
    layer = data.layer("background")
    out = F.grid_sample(
        layer.atlas.unsqueeze(0).expand(8, -1, -1, -1), layer.grid(), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(out, frames, atol=1e-5, rtol=0)
    torch.testing.assert_close(data.sample("background"), frames, atol=1e-5, rtol=0)
    assert psnr(out, frames) > 80
    # compositing with an empty foreground returns the background
    torch.testing.assert_close(data.composite(torch.zeros_like(frames), out), 0.999 * out)


def test_synthetic_panning_video_subpixel_pan():
    def texture_fn(pu, pv):  # smooth texture: bilinear resampling reproduces it closely
        return 0.5 + 0.4 * torch.stack(
            [torch.sin(pu / 5.0), torch.cos(pv / 4.0 + pu / 9.0), torch.sin((pu - pv) / 7.0)]
        )

    data, frames = _panning_scene(8, 24, 32, 300, (2.37, -0.61), texture_fn)
    out = data.sample("background")
    assert psnr(out, frames) > 45, psnr(out, frames)
    # half a texel off (the reference's g = 2p/w - 1) is visibly worse
    p = data.to_texel(data.uv_background, "background")
    box = data.background_box
    naive = 2 * p / torch.tensor([box.width, box.height]) - 1
    off = F.grid_sample(data.background_atlas.unsqueeze(0).expand(8, -1, -1, -1), naive, align_corners=False)
    assert psnr(off, frames) < psnr(out, frames) - 10


def test_atlas_data_validates_shapes():
    ok = dict(
        uv_background=torch.zeros(2, 4, 5, 2),
        uv_foreground=torch.zeros(2, 4, 5, 2),
        alpha=torch.zeros(2, 4, 5),
        background_atlas=torch.zeros(3, 6, 7),
        foreground_atlas=torch.zeros(3, 2, 2),
        background_box=TexelBox(0, 0, 7, 6),
        foreground_box=TexelBox(0, 0, 2, 2),
        grid=10,
    )
    AtlasData(**ok)
    with pytest.raises(ValueError, match="alpha"):
        AtlasData(**(ok | {"alpha": torch.zeros(2, 4, 4)}))
    with pytest.raises(ValueError, match="background_atlas"):
        AtlasData(**(ok | {"background_box": TexelBox(0, 0, 6, 7)}))


def test_texel_box_covers_all_taps():
    uv = torch.tensor([[-0.5, -0.25], [-0.4901, -0.125]])  # texel positions (500, 750), (509.9, 875)
    box = texel_box(uv, "background", 1000)
    assert box == TexelBox(500, 750, 510 - 500 + 1, 875 - 750 + 1)
    assert texel_box(uv + 1.0, "foreground", 1000) == box
