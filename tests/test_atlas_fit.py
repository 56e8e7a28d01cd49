"""Atlas fitting (``t2l_fast.fit``, ``t2l-fast atlas``) on a synthetic two-layer video with known truth."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import typer
from PIL import Image
from typer.testing import CliRunner

from t2l_fast.cli import atlas as cli_atlas
from t2l_fast.fit import CHECKPOINT_NAME, FitConfig, compute_flow, consistency, fit_atlas
from t2l_fast.io import InputError
from t2l_fast.models.atlas import AtlasData

#: Thresholds the fits below must reach (300 iterations of 4096 pixels, 8 frames of 64x48).
PSNR_MIN_DB = 35.0
IOU_MIN = 0.9


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The fits are many small ops: on a shared 2-core machine one intra-op thread is far faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def texture(h: int, w: int, seed: int, cells: tuple[int, ...]) -> torch.Tensor:
    """A smooth random RGB texture (3, h, w) in [0, 1] (sum of upsampled noise octaves)."""
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(3, h, w)
    for i, c in enumerate(cells):
        noise = torch.rand(1, 3, c, c, generator=g)
        out += F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=False)[0] / (i + 1)
    out -= out.amin(dim=(1, 2), keepdim=True)
    return (out / out.amax(dim=(1, 2), keepdim=True)).clamp(0, 1)


def two_layer_video(
    t: int = 8, h: int = 48, w: int = 64, sprite: int = 16
) -> tuple[torch.Tensor, torch.Tensor]:
    """A textured background panning (2, 1) px per frame under a textured 16x16 sprite moving 4 px per
    frame. Returns frames (T, 3, H, W) uint8 and the sprite's true masks (T, H, W) bool."""
    bg = texture(h + 40, w + 40, 1, (3, 6, 12, 24))
    fg = 1 - texture(sprite, sprite, 2, (2, 4))
    frames, masks = [], []
    for i in range(t):
        f = bg[:, i : i + h, 2 * i : 2 * i + w].clone()
        sx, sy = 8 + 4 * i, 14 + (i % 3)
        f[:, sy : sy + sprite, sx : sx + sprite] = fg
        m = torch.zeros(h, w, dtype=torch.bool)
        m[sy : sy + sprite, sx : sx + sprite] = True
        frames.append(f)
        masks.append(m)
    return (torch.stack(frames) * 255).round().to(torch.uint8), torch.stack(masks)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def check_uv_ranges(atlas: AtlasData) -> None:
    bg, fg = atlas.uv_background, atlas.uv_foreground
    assert bg.min() >= -1 and bg.max() <= 0, (bg.min(), bg.max())
    assert fg.min() >= 0 and fg.max() <= 1, (fg.min(), fg.max())
    assert atlas.alpha.min() >= 0 and atlas.alpha.max() <= 1


@pytest.fixture(scope="module")
def video():
    return two_layer_video()


@pytest.fixture(scope="module")
def fitted(video):
    frames, masks = video
    return fit_atlas(frames, masks, FitConfig(iterations=300, batch=4096), device="cpu", progress=False)


# ----------------------------------------------------------------------------------------------
# The fit
# ----------------------------------------------------------------------------------------------


def test_fit_reconstructs_the_video_and_recovers_the_sprite(video, fitted):
    frames, masks = video
    atlas, stats = fitted
    assert stats.iterations == 300 and not stats.interrupted
    assert stats.psnr > PSNR_MIN_DB, stats.psnr
    assert min(stats.psnr_per_frame) > PSNR_MIN_DB - 3
    assert iou(atlas.alpha > 0.5, masks) > IOU_MIN
    check_uv_ranges(atlas)
    assert not atlas.foreground_is_empty()
    assert atlas.meta["trained_frames"] == 8 and atlas.meta["has_foreground"]
    # the background atlas is one panorama: the pan (14 px x 7 px over the video) widens the crop
    assert atlas.background_box.width > atlas.background_box.height
    assert stats.history and stats.history[-1][0] == 300


def test_fit_refines_loose_masks(video):
    """Masks grown by 2 px: reconstruction pulls the opacity back towards the true sprite."""
    frames, masks = video
    loose = F.max_pool2d(masks.float()[:, None], 5, 1, 2)[:, 0] > 0
    atlas, _ = fit_atlas(frames, loose, FitConfig(iterations=300, batch=4096), device="cpu", progress=False)
    assert iou(atlas.alpha > 0.5, masks) > iou(loose, masks) + 0.03


def test_atlas_round_trips_through_save_and_load(fitted, tmp_path):
    atlas, _ = fitted
    path = atlas.save(tmp_path / "atlas.safetensors")
    back = AtlasData.load(path)
    for name in ("uv_background", "uv_foreground", "background_atlas", "foreground_atlas"):
        torch.testing.assert_close(getattr(back, name), getattr(atlas, name), rtol=0, atol=0)
    torch.testing.assert_close(back.alpha, atlas.alpha, rtol=0, atol=1e-3)  # stored as float16
    assert back.background_box == atlas.background_box and back.foreground_box == atlas.foreground_box
    assert back.grid == atlas.grid and back.meta == atlas.meta
    torch.testing.assert_close(back.sample("background"), atlas.sample("background"), rtol=0, atol=1e-6)


def test_load_rejects_files_that_are_not_atlases(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(InputError, match="not found"):
        AtlasData.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not safetensors")
    with pytest.raises(InputError, match="not a readable"):
        AtlasData.load(junk)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other))
    with pytest.raises(InputError, match="not a t2l_fast atlas"):
        AtlasData.load(other)


def test_background_only_without_masks(video):
    frames, _ = video
    atlas, stats = fit_atlas(frames, None, FitConfig(iterations=60, batch=4096), device="cpu", progress=False)
    assert not stats.has_foreground
    assert bool((atlas.alpha == 0).all()) and atlas.foreground_is_empty()
    assert bool((atlas.foreground_atlas == 0).all())
    check_uv_ranges(atlas)
    assert stats.psnr > 18.0  # the moving sprite cannot be explained by the background alone


def test_resume_continues_where_it_stopped(video, tmp_path):
    frames, masks = video
    cfg = FitConfig(iterations=40, batch=1024, save_every=10)

    def stop_at_15(iteration: int, psnr: float) -> None:
        if iteration == 15:
            raise KeyboardInterrupt

    _, first = fit_atlas(
        frames, masks, cfg, device="cpu", progress=False, resume_dir=tmp_path, on_step=stop_at_15
    )
    assert first.interrupted and first.iterations == 15
    assert (tmp_path / CHECKPOINT_NAME).is_file()
    _, second = fit_atlas(frames, masks, cfg, device="cpu", progress=False, resume_dir=tmp_path)
    assert second.start_iteration == 15 and second.iterations == 40 and not second.interrupted
    _, third = fit_atlas(
        frames, masks, FitConfig(iterations=50, batch=1024), device="cpu", resume_dir=tmp_path
    )
    assert third.start_iteration == 40 and third.iterations == 50  # more iterations: continue
    with pytest.raises(InputError, match="another video"):
        fit_atlas(frames.flip(0), masks, cfg, device="cpu", progress=False, resume_dir=tmp_path)


@pytest.mark.parametrize(
    ("frames", "masks", "message"),
    [
        (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), None, "at least 3"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.ones(3, 16, 16), "3 masks given for 4 frames"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.ones(4, 8, 16), "masks are 16x8"),
        (torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, 16, 16), "empty in every frame"),
    ],
)
def test_fit_rejects_bad_inputs(frames, masks, message):
    with pytest.raises(InputError, match=message):
        fit_atlas(frames, masks, FitConfig(iterations=1), device="cpu", progress=False)


# ----------------------------------------------------------------------------------------------
# Flow
# ----------------------------------------------------------------------------------------------


def test_dis_flow_of_a_shifted_texture_is_the_shift():
    tex = (texture(80, 104, 3, (4, 8, 16, 32)) * 255).round().to(torch.uint8)
    a, b = tex[:, 8:72, 8:96], tex[:, 6:70, 5:93]  # content moves by (+3, +2) from a to b
    flow = compute_flow(torch.stack([a, b, a]))
    inner = flow.forward[0, 8:-8, 8:-8]
    torch.testing.assert_close(
        inner.median(0).values.median(0).values, torch.tensor([3.0, 2.0]), atol=0.25, rtol=0
    )
    inner_b = flow.backward[0, 8:-8, 8:-8]
    torch.testing.assert_close(
        inner_b.median(0).values.median(0).values, torch.tensor([-3.0, -2.0]), atol=0.25, rtol=0
    )
    assert flow.forward_ok[0, 8:-8, 8:-8].float().mean() > 0.9


def test_consistency_flags_disagreeing_and_leaving_vectors():
    fwd = torch.zeros(1, 20, 30, 2)
    fwd[..., 0] = 2.0
    bwd = -fwd.clone()
    bwd[0, 5:10, 10:20] = torch.tensor([3.0, 1.0])  # backward flow disagrees here
    ok = consistency(fwd, bwd)
    assert bool(ok[0, 2:4, :26].all())
    assert not bool(ok[0, 6:9, 10:16].any())  # their forward ends land in the disagreeing block
    assert not bool(ok[0, :, 29].any())  # x + 2 leaves the frame


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def make_app() -> typer.Typer:
    app = typer.Typer()
    app.command("atlas")(cli_atlas.atlas)

    @app.callback()
    def main() -> None:  # a callback keeps "atlas" as a sub-command
        pass

    return app


runner = CliRunner()


def write_folder(folder, images: torch.Tensor) -> None:
    """(T, 3, H, W) uint8 as frames, or (T, H, W) bool as DAVIS masks."""
    folder.mkdir(parents=True)
    for i, img in enumerate(images):
        arr = img.permute(1, 2, 0).numpy() if img.dim() == 3 else img.numpy().astype(np.uint8) * 255
        Image.fromarray(arr).save(folder / f"{i:05d}.png")


@pytest.fixture
def on_disk(video, tmp_path):
    frames, masks = video
    write_folder(tmp_path / "frames", frames)
    write_folder(tmp_path / "masks", masks)
    return tmp_path


def run(*args):
    return runner.invoke(make_app(), ["atlas", *map(str, args)])


def test_command_writes_every_output_and_resumes(on_disk):
    out = on_disk / "out"
    args = (on_disk / "frames", "--masks", on_disk / "masks", "--size", "64x48", "--device", "cpu")
    result = run(*args, "--iterations", 20, "--out", out)
    assert result.exit_code == 0, result.output
    assert f"wrote 6 files to {out}/" in result.output and "PSNR" in result.output
    for name in cli_atlas.OUTPUTS:
        assert (out / name).is_file(), name
    stats = json.loads((out / "fit_stats.json").read_text())
    assert stats["iterations"] == 20 and stats["psnr"] > 10
    atlas = AtlasData.load(out / "atlas.safetensors")
    assert (atlas.num_frames, atlas.height, atlas.width) == (8, 48, 64)
    assert atlas.meta["source"]["masks"] == str(on_disk / "masks")
    result = run(*args, "--iterations", 30, "--out", out)
    assert result.exit_code == 0, result.output
    assert "resuming" in result.output
    assert json.loads((out / "fit_stats.json").read_text())["start_iteration"] == 20


def test_command_without_masks_says_foreground_edits_need_them(on_disk):
    result = run(
        on_disk / "frames", "--size", "64x48", "--iterations", 5, "--device", "cpu", "--out", on_disk / "o"
    )
    assert result.exit_code == 0, result.output
    assert "foreground edits need" in result.output


@pytest.fixture
def no_fit(monkeypatch):
    """Fail the test if fitting starts: bad input must be caught before any heavy work."""

    def refuse(*args, **kwargs):
        raise AssertionError("fit_atlas was called")

    monkeypatch.setattr("t2l_fast.fit.fit_atlas", refuse)


def test_command_rejects_unreadable_video(tmp_path, no_fit):
    bad = tmp_path / "clip.mp4"
    bad.write_bytes(b"this is not a video")
    result = run(bad, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "cannot decode video" in result.output, result.output


def test_command_rejects_too_few_frames(video, tmp_path, no_fit):
    write_folder(tmp_path / "two", video[0][:2])
    result = run(tmp_path / "two", "--size", "64x48", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "needs at least 3" in result.output, result.output


def test_command_rejects_mask_count_mismatch(video, on_disk, no_fit):
    write_folder(on_disk / "five", video[1][:5])
    result = run(on_disk / "frames", "--masks", on_disk / "five", "--size", "64x48", "--out", on_disk / "o")
    assert result.exit_code == 2 and "has 5 masks but the video has 8 frames" in result.output, result.output


def test_command_rejects_mask_size_mismatch(video, on_disk, no_fit):
    small = F.interpolate(video[1][:, None].float(), size=(24, 32))[:, 0] > 0
    write_folder(on_disk / "small", small)
    result = run(on_disk / "frames", "--masks", on_disk / "small", "--size", "64x48", "--out", on_disk / "o")
    assert result.exit_code == 2 and "mask 00000.png is 32x24" in result.output, result.output


def test_command_rejects_masks_empty_everywhere(video, on_disk, no_fit):
    write_folder(on_disk / "empty", torch.zeros_like(video[1]))
    result = run(on_disk / "frames", "--masks", on_disk / "empty", "--size", "64x48", "--out", on_disk / "o")
    assert result.exit_code == 2 and "empty" in result.output, result.output


def test_command_rejects_bad_size(on_disk, no_fit):
    result = run(on_disk / "frames", "--size", "big", "--out", on_disk / "o")
    assert result.exit_code == 2 and "WIDTHxHEIGHT" in result.output, result.output


def test_command_set_overrides_fit_settings(on_disk, monkeypatch):
    seen = {}

    def capture(frames, masks, cfg, **kwargs):
        seen["cfg"] = cfg
        raise KeyboardInterrupt  # stop before any fitting: only the settings are checked

    monkeypatch.setattr("t2l_fast.fit.fit_atlas", capture)
    args = (on_disk / "frames", "--size", "64x48", "--device", "cpu", "--out", on_disk / "o")
    run(*args, "--set", "w_rigidity=1e-3", "--set", "iterations=7", "--batch", 64)
    cfg = seen["cfg"]
    assert cfg.w_rigidity == 1e-3 and cfg.iterations == 7 and cfg.batch == 64
    run(*args, "--set", "iterations=7", "--iterations", 9)  # the flag wins over --set, as in edit
    assert seen["cfg"].iterations == 9


def test_command_rejects_bad_fit_settings(on_disk, no_fit):
    args = (on_disk / "frames", "--size", "64x48", "--out", on_disk / "o")
    result = run(*args, "--set", "w_nope=1")
    assert result.exit_code == 2 and "unknown config key 'w_nope'" in result.output, result.output
    result = run(*args, "--set", "compile=sometimes")
    assert result.exit_code == 2 and "compile must be auto, on or off" in result.output, result.output
    result = run(*args, "--iterations", -1)
    assert result.exit_code == 2 and "iterations must be >= 0" in result.output, result.output
    assert not (on_disk / "o").exists()


def test_command_refuses_zero_iterations(on_disk, no_fit):
    """Zero iterations would fit nothing and still write an atlas: refused, as edit --steps 0."""
    args = (on_disk / "frames", "--size", "64x48", "--out", on_disk / "o")
    for given in (["--iterations", 0], ["--set", "iterations=0"]):
        result = run(*args, *given)
        assert result.exit_code == 2, result.output
        assert result.output.strip() == "error: --iterations must be > 0 (got 0)", result.output
    assert not (on_disk / "o").exists()


def test_command_quick_settings_are_under_the_flags(on_disk, monkeypatch):
    from t2l_fast.request import QUICK_ATLAS, QUICK_FIT

    seen = {}

    def capture(frames, masks, cfg, **kwargs):
        seen["cfg"], seen["frames"] = cfg, frames
        raise KeyboardInterrupt  # stop before any fitting: only the settings are checked

    monkeypatch.setattr("t2l_fast.fit.fit_atlas", capture)
    args = (on_disk / "frames", "--device", "cpu", "--out", on_disk / "o")
    run(*args, "--quick", "--frames", 3)
    width, height = (int(v) for v in QUICK_ATLAS["size"].split("x"))
    assert [f"{k}={getattr(seen['cfg'], k)}" for k in ("iterations", "grid")] == QUICK_FIT
    assert tuple(seen["frames"].shape) == (3, 3, height, width)
    run(*args, "--quick", "--set", "iterations=7", "--size", "64x48")
    assert seen["cfg"].iterations == 7 and tuple(seen["frames"].shape[2:]) == (48, 64)
    run(*args)  # without --quick: the full settings
    assert seen["cfg"].iterations == 2000 and seen["cfg"].grid is None
    assert tuple(seen["frames"].shape[2:]) == (432, 768)
