"""Reading user images (modes, EXIF, broken files), output checks and whole-or-nothing writes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from t2l_fast.io import (
    InputError,
    atomic_path,
    check_output_dir,
    fit_size,
    read_image,
    save_png,
    to_image_tensor,
)


def _rgb_array(h: int = 12, w: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _as_hwc_float(arr: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float in [0, 1], the reference conversion."""
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1)


# -- read_image: modes --------------------------------------------------------------------------------
def test_read_rgb_png_exact(tmp_path):
    arr = _rgb_array()
    Image.fromarray(arr).save(tmp_path / "a.png")
    img, notes = read_image(tmp_path / "a.png")
    assert img.shape == (3, 12, 20) and img.dtype == torch.float32
    torch.testing.assert_close(img, _as_hwc_float(arr), rtol=0, atol=1e-7)
    assert notes == []  # nothing converted, no EXIF turn


def test_read_greyscale(tmp_path):
    grey = np.arange(12 * 20, dtype=np.uint8).reshape(12, 20)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    img, notes = read_image(tmp_path / "g.png")
    assert img.shape == (3, 12, 20)
    expected = torch.from_numpy(grey.astype(np.float32) / 255.0)
    for c in range(3):
        torch.testing.assert_close(img[c], expected, rtol=0, atol=1e-7)
    assert any("converted to RGB" in n for n in notes)


def test_read_palette(tmp_path):
    palette = [255, 0, 0, 0, 128, 0, 10, 20, 250] + [0] * (256 * 3 - 9)
    idx = np.array([[0, 1, 2, 1], [2, 2, 0, 1]], dtype=np.uint8)
    pal = Image.fromarray(idx, mode="P")
    pal.putpalette(palette)
    pal.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    img, notes = read_image(tmp_path / "p.png")
    colours = np.array(palette[:9], dtype=np.float32).reshape(3, 3) / 255.0
    expected = torch.from_numpy(colours[idx]).permute(2, 0, 1)  # look the palette up by hand
    torch.testing.assert_close(img, expected, rtol=0, atol=1e-7)
    assert any("P image converted" in n for n in notes)


def test_read_rgba_ignores_alpha_keeps_rgb(tmp_path):
    rgb = _rgb_array(8, 10, seed=1)
    alpha = np.random.default_rng(2).integers(0, 256, (8, 10, 1), dtype=np.uint8)
    alpha[0, 0] = 0  # a fully transparent pixel keeps its colour too
    Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA").save(tmp_path / "rgba.png")
    img, notes = read_image(tmp_path / "rgba.png")
    torch.testing.assert_close(img, _as_hwc_float(rgb), rtol=0, atol=1e-7)
    assert any("alpha" in n for n in notes)


def test_read_16bit_png(tmp_path):
    arr = np.zeros((5, 7), dtype=np.uint16)
    arr[2, 3] = 30000
    arr[0, 0] = 65535
    arr[4, 6] = 200  # a dark value: must not be read as 200/255
    Image.fromarray(arr).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as check:
        assert check.mode.startswith("I")  # really a 16-bit file
    img, notes = read_image(tmp_path / "deep.png")
    assert img.shape == (3, 5, 7)
    for c in range(3):
        assert img[c, 2, 3].item() == pytest.approx(30000 / 65535, abs=1e-6)
        assert img[c, 0, 0].item() == pytest.approx(1.0, abs=1e-6)
        assert img[c, 4, 6].item() == pytest.approx(200 / 65535, abs=1e-6)
        assert img[c, 1, 1].item() == 0.0
    assert any("high bit depth" in n for n in notes)


def test_read_16bit_png_all_dark(tmp_path):
    """A 16-bit file whose values all fit in 8 bits is still scaled by 65535."""
    arr = np.full((4, 4), 100, dtype=np.uint16)
    Image.fromarray(arr).save(tmp_path / "dark.png")
    img, _ = read_image(tmp_path / "dark.png")
    assert img.max().item() == pytest.approx(100 / 65535, abs=1e-6)


@pytest.mark.parametrize("orientation, k", [(6, -1), (8, 1)])  # 6: turn clockwise, 8: counter-clockwise
def test_read_exif_rotated_jpeg(tmp_path, orientation, k):
    h, w = 32, 48  # stored (landscape); displayed portrait
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, :] = (0, 0, 255)  # blue
    arr[:8, :8] = (255, 0, 0)  # red block at the stored top-left (one JPEG block)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(arr).save(tmp_path / "r.jpg", quality=95, exif=exif)
    img, notes = read_image(tmp_path / "r.jpg")
    assert img.shape == (3, w, h)  # height and width swapped
    assert "EXIF orientation applied" in notes
    # np.rot90 with k=-1 turns clockwise (orientation 6), k=1 counter-clockwise (orientation 8)
    expected = _as_hwc_float(np.ascontiguousarray(np.rot90(arr, k=k)))
    assert (img - expected).abs().mean().item() < 0.02
    red = img[0] > 0.5
    if orientation == 6:  # stored top-left lands at the top-right
        assert red[:6, -6:].all() and not red[-6:, :6].any()
    else:  # stored top-left lands at the bottom-left
        assert red[-6:, :6].all() and not red[:6, -6:].any()
    assert red.float().sum().item() == pytest.approx(64, abs=12)


def test_read_jpeg_without_rotation_has_no_exif_note(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 1  # normal orientation
    Image.fromarray(_rgb_array(16, 24)).save(tmp_path / "n.jpg", exif=exif)
    img, notes = read_image(tmp_path / "n.jpg")
    assert img.shape == (3, 16, 24)
    assert not any("EXIF" in n for n in notes)


# -- read_image: errors -------------------------------------------------------------------------------
def test_read_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "nope.png")


def test_read_text_file_named_png(tmp_path):
    (tmp_path / "fake.png").write_text("this is not a picture\n")
    with pytest.raises(InputError, match="not an image"):
        read_image(tmp_path / "fake.png")


def test_read_empty_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError):
        read_image(tmp_path / "empty.png")


def test_read_truncated_png(tmp_path):
    Image.fromarray(_rgb_array(64, 64, seed=3)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    read_image(tmp_path / "full.png")  # the whole file is fine
    with pytest.raises(InputError, match="truncated"):
        read_image(tmp_path / "cut.png")


def test_read_folder(tmp_path):
    (tmp_path / "frames").mkdir()
    with pytest.raises(InputError, match="folder"):
        read_image(tmp_path / "frames")


# -- to_image_tensor ----------------------------------------------------------------------------------
def test_to_image_tensor_pil():
    arr = _rgb_array(6, 9)
    t, _ = to_image_tensor(Image.fromarray(arr))
    torch.testing.assert_close(t, _as_hwc_float(arr), rtol=0, atol=1e-7)


def test_to_image_tensor_path(tmp_path):
    arr = _rgb_array(6, 9)
    Image.fromarray(arr).save(tmp_path / "x.png")
    t, _ = to_image_tensor(str(tmp_path / "x.png"))
    torch.testing.assert_close(t, _as_hwc_float(arr), rtol=0, atol=1e-7)


def test_to_image_tensor_uint8_tensor():
    u8 = torch.tensor([0, 51, 255, 128], dtype=torch.uint8).view(1, 1, 2, 2).expand(1, 3, 2, 2).contiguous()
    t, _ = to_image_tensor(u8)
    assert t.shape == (3, 2, 2) and t.dtype == torch.float32
    torch.testing.assert_close(t[0], torch.tensor([[0.0, 0.2], [1.0, 128 / 255]]), rtol=0, atol=1e-7)


def test_to_image_tensor_float_tensor():
    x = torch.rand(3, 5, 4, dtype=torch.float64)
    t, notes = to_image_tensor(x)
    assert t.dtype == torch.float32 and notes == []
    torch.testing.assert_close(t, x.float())
    t4, _ = to_image_tensor(x[None])
    torch.testing.assert_close(t4, x.float())


def test_to_image_tensor_numpy():
    arr = _rgb_array(4, 5)
    t, _ = to_image_tensor(arr)
    torch.testing.assert_close(t, _as_hwc_float(arr), rtol=0, atol=1e-7)


@pytest.mark.parametrize("bad", [torch.full((3, 2, 2), 1.5), torch.full((3, 2, 2), -0.1)])
def test_to_image_tensor_out_of_range_float(bad):
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        to_image_tensor(bad)


@pytest.mark.parametrize("bad", [torch.rand(4, 5, 5), torch.rand(2, 3, 5, 5), torch.rand(5, 5)])
def test_to_image_tensor_bad_shape(bad):
    with pytest.raises(InputError, match="3, H, W"):
        to_image_tensor(bad)


def test_to_image_tensor_bad_type():
    with pytest.raises(InputError, match="unsupported"):
        to_image_tensor(42)


# -- fit_size -----------------------------------------------------------------------------------------
def test_fit_size_downscales_short_side():
    img = torch.rand(3, 300, 200)
    out = fit_size(img, 100, min_side=50)
    assert out.shape == (3, 150, 100)
    assert out.min() >= 0 and out.max() <= 1
    wide = fit_size(torch.rand(3, 120, 360), 60, min_side=10)
    assert wide.shape == (3, 60, 180)


def test_fit_size_preserves_a_constant_and_a_smooth_image():
    const = torch.full((3, 64, 96), 0.3)
    torch.testing.assert_close(fit_size(const, 32, 8), torch.full((3, 32, 48), 0.3), rtol=0, atol=1e-5)
    # a linear ramp halves to (nearly) the averaged ramp
    x = torch.linspace(0, 1, 96).view(1, 1, -1).expand(3, 64, 96)
    out = fit_size(x, 32, 8)
    ref = x.reshape(3, 64, 48, 2).mean(-1)[:, ::2]
    assert (out[..., 2:-2] - ref[..., 2:-2]).abs().max() < 0.01


def test_fit_size_never_upscales():
    img = torch.rand(3, 100, 150)
    out = fit_size(img, 512, min_side=10)
    assert out.shape == img.shape
    torch.testing.assert_close(out, img, rtol=0, atol=0)
    assert fit_size(img, 0, min_side=10) is img  # 0 keeps the size


def test_fit_size_min_side_error_names_minimum():
    with pytest.raises(InputError, match="129") as info:
        fit_size(torch.rand(3, 100, 300), 512, min_side=129)
    assert "300x100" in str(info.value)
    # downscaling below the minimum is reported too
    with pytest.raises(InputError, match="129"):
        fit_size(torch.rand(3, 400, 400), 100, min_side=129)


# -- check_output_dir ---------------------------------------------------------------------------------
def test_check_output_dir_existing_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        check_output_dir(f)


def test_check_output_dir_under_a_file(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(InputError, match="cannot be created"):
        check_output_dir(f / "sub" / "out")


def test_check_output_dir_fresh_path_creates_nothing(tmp_path):
    before = sorted(tmp_path.iterdir())
    out = check_output_dir(tmp_path / "a" / "b")
    assert out == tmp_path / "a" / "b"
    assert sorted(tmp_path.iterdir()) == before
    assert not (tmp_path / "a").exists()
    (tmp_path / "existing").mkdir()
    assert check_output_dir(tmp_path / "existing") == tmp_path / "existing"


# -- atomic_path --------------------------------------------------------------------------------------
def test_atomic_path_failure_keeps_old_content(tmp_path):
    final = tmp_path / "out.png"
    final.write_bytes(b"old content")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(final) as tmp:
            assert tmp.parent == final.parent and tmp != final
            tmp.write_bytes(b"half-written new")
            raise RuntimeError("boom")
    assert final.read_bytes() == b"old content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]  # no temp file left


def test_atomic_path_keyboard_interrupt(tmp_path):
    final = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_success_replaces(tmp_path):
    final = tmp_path / "out.png"
    final.write_bytes(b"old content")
    with atomic_path(final) as tmp:
        assert tmp.suffix == ".png"  # writers that infer the format still work
        assert final.read_bytes() == b"old content"  # untouched until the block ends
        tmp.write_bytes(b"new content")
    assert final.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


# -- save_png -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels, mode", [(1, "L"), (3, "RGB"), (4, "RGBA")])
def test_save_png_modes(tmp_path, channels, mode):
    g = torch.Generator().manual_seed(channels)
    img = torch.rand(channels, 9, 13, generator=g)
    path = save_png(img, tmp_path / f"{mode}.png")
    assert path == tmp_path / f"{mode}.png"
    with Image.open(path) as pil:
        assert pil.mode == mode
        assert pil.size == (13, 9)  # PIL: (width, height)
        back = np.asarray(pil)
    back = back[..., None] if back.ndim == 2 else back
    expected = np.round(img.permute(1, 2, 0).numpy().astype(np.float64) * 255).astype(np.uint8)
    assert np.abs(back.astype(int) - expected.astype(int)).max() <= 1
    assert sorted(os.listdir(tmp_path)) == [f"{mode}.png"]


def test_save_png_clamps(tmp_path):
    img = torch.tensor([-0.5, 0.5, 1.7]).view(1, 1, 3)
    with Image.open(save_png(img, tmp_path / "c.png")) as pil:
        assert np.asarray(pil).tolist() == [[0, 128, 255]]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_output_file_respects_the_umask(tmp_path, umask):
    """safetensors creates its files 0600: every whole-file write gets the mode a plain open() gives
    (0666 less the umask), as the PNGs and text already did."""
    from t2l_fast.config import preset
    from t2l_fast.io import save_png, save_text
    from t2l_fast.pipeline.base import save_generator
    from t2l_fast.synthetic import two_layer_scene

    atlas, _ = two_layer_scene(t=3, h=16, w=24, grid=32, sprite=6)

    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:  # what the umask gives an ordinary file
            f.write("x")
        save_generator(tmp_path / "generator.safetensors", {"w": torch.zeros(2)}, preset("image"))
        atlas.save(tmp_path / "atlas.safetensors")
        save_png(torch.zeros(3, 4, 4), tmp_path / "composite.png")
        save_text("a: 1\n", tmp_path / "config.yaml")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(modes, oct(0o666 & ~umask)), modes
