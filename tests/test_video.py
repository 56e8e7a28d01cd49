"""The video editor: end to end on a synthetic two-layer video, the CLI, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from t2l_fast.kernels import sample_atlas_reference
from typer.testing import CliRunner

from t2l_fast import cli
from t2l_fast.config import preset
from t2l_fast.models.nla import NLAModels, save_nla_checkpoint
from t2l_fast.pipeline import base as pipeline_base
from t2l_fast.pipeline import video as video_pipeline
from t2l_fast.pipeline.crops import CropSampler, foreground_boxes
from t2l_fast.pipeline.video import VideoEditor
from t2l_fast.synthetic import two_layer_scene
from t2l_fast.video_io import read_video
from tests.conftest import FAST_CLI as FAST

runner = CliRunner()


def small_video_config(steps: int = 2, layer: str = "background"):
    cfg = preset("video")
    cfg.prompt = "winter"
    cfg.optim.steps = steps
    cfg.views.n_aug = 2
    cfg.generator.channels_down = cfg.generator.channels_up = 8
    cfg.data.source_every = 2
    cfg.video.layer = layer
    return cfg


@pytest.fixture(scope="module")
def scene():
    return two_layer_scene()


@pytest.fixture
def frames_dir(tmp_path, scene):
    _, frames = scene
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            folder / f"{i:05d}.png"
        )
    return folder


@pytest.fixture
def atlas_dir(tmp_path, scene):
    data, _ = scene
    folder = tmp_path / "atlas"
    folder.mkdir()
    data.save(folder / "atlas.safetensors")
    return folder


# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layer", ["background", "foreground"])
@pytest.mark.parametrize("mode", ["reference", "fast"])
def test_edit_runs_and_renders_every_frame(scene, tiny_clip, layer, mode):
    data, frames = scene
    cfg = small_video_config(layer=layer)
    cfg.runtime.mode = mode
    result = VideoEditor(cfg, device="cpu", clip=tiny_clip)(frames, atlas=data)
    assert result.composite.shape == frames.shape and result.greenscreen.shape == frames.shape
    assert (
        result.atlas_edit.shape[0] == 4 and result.atlas_edit.shape[1:] == data.atlas_image(layer).shape[1:]
    )
    assert len(result.losses) == 2 and {"loss", "comp_clip", "screen", "structure"} <= set(result.losses[0])
    # the final video is the atlas edit sampled at every pixel's UV, composited over the input frames
    opacity = data.alpha if layer == "foreground" else 1 - data.alpha
    expected = sample_atlas_reference(result.atlas_edit, data.to_grid(data.uv(layer), layer), frames, opacity)
    torch.testing.assert_close(result.composite, expected.composite.clamp(0, 1), atol=1e-5, rtol=0)


def test_crop_downscale_feeds_the_generator_a_smaller_atlas(scene, tiny_clip, monkeypatch):
    """video.crop_downscale=2: the generator sees the atlas crop and the render's atlas at half their
    size; the edit still covers the whole atlas and every frame."""
    data, frames = scene
    cfg = small_video_config(steps=1)
    cfg.video.crop_downscale = 2
    crops, inputs = [], []
    draw, at_least = CropSampler.draw, video_pipeline._at_least

    def spy_draw(self, gen):
        crops.append(draw(self, gen))
        return crops[-1]

    def spy_at_least(net, x, smallest):
        inputs.append(tuple(x.shape[-2:]))
        return at_least(net, x, smallest)

    monkeypatch.setattr(CropSampler, "draw", spy_draw)
    monkeypatch.setattr(video_pipeline, "_at_least", spy_at_least)
    result = VideoEditor(cfg, device="cpu", clip=tiny_clip)(frames, atlas=data)
    h, w = crops[0].atlas.shape[-2:]
    assert inputs[0] == (h // 2, w // 2)  # the step's atlas crop
    atlas_h, atlas_w = data.atlas_image("background").shape[1:]
    assert inputs[-1] == (atlas_h // 2, atlas_w // 2)  # the render
    assert result.atlas_edit.shape[1:] == (atlas_h, atlas_w) and result.composite.shape == frames.shape


def test_background_edit_is_occluded_by_the_foreground(scene, tiny_clip):
    data, frames = scene
    result = VideoEditor(small_video_config(steps=1), device="cpu", clip=tiny_clip)(frames, atlas=data)
    solid = data.alpha > 0.9  # pixels of the sprite: the background edit barely shows there
    change = (result.composite - frames).abs().amax(dim=1)
    assert float(change[solid].max()) <= 0.011 + 1e-6
    assert float(change[~solid].max()) > 0.011


def test_crop_sampler_windows_match_the_atlas(scene):
    """The atlas crop and its grid reproduce the window's frames by sampling (up to bilinear error)."""
    data, frames = scene
    cfg = small_video_config()
    run = video_pipeline.VideoRun(cfg, frames, 25.0, data)
    for bucket in (1, 64):
        sampler = CropSampler(run, torch.device("cpu"), 129, bucket)
        crop = sampler.draw(torch.Generator().manual_seed(1))
        assert min(crop.atlas.shape[-2:]) >= 129
        if bucket > 1:
            assert all(
                s % bucket == 0 or s == sampler.padded.shape[-2 + i]
                for i, s in enumerate(crop.atlas.shape[-2:])
            )
        rgba = torch.cat([crop.atlas[0], torch.ones_like(crop.atlas[0, :1])])  # the atlas itself, opaque
        out = sample_atlas_reference(
            rgba, crop.grid, torch.zeros_like(crop.frames), torch.ones_like(crop.opacity)
        )
        background = crop.opacity > 0.5  # off the sprite the frame is the background texture
        diff = (out.composite - crop.frames).abs().amax(dim=1)[background]
        assert float(diff.mean()) < 0.02
        if bucket == 1:  # texel centres hit exactly, the window's last row and column included
            assert float(diff.max()) < 0.005


def testforeground_boxes():
    alpha = torch.zeros(2, 60, 80)
    alpha[0, 10:20, 30:40] = 1.0
    boxes = foreground_boxes(alpha, 0.95, border=5, smallest=30)
    y, x, h, w = boxes[0].tolist()
    assert h == 30 and w == 30 and y <= 5 and y + h >= 25 and x <= 25 and x + w >= 45
    assert boxes[1].tolist() == [0, 0, 60, 80]  # no object: the whole frame


def test_same_seed_same_video(scene, tiny_clip):
    data, frames = scene
    a = VideoEditor(small_video_config(), device="cpu", clip=tiny_clip)(frames, atlas=data)
    b = VideoEditor(small_video_config(), device="cpu", clip=tiny_clip)(frames, atlas=data)
    assert torch.equal(a.composite, b.composite)


# ---------------------------------------------------------------------------------------------------
def run(*args):
    return runner.invoke(cli.app, ["edit", *map(str, args)])


def test_cli_video_edit_writes_an_mp4(tmp_path, frames_dir, atlas_dir):
    out = tmp_path / "out"
    result = run(
        frames_dir,
        "--atlas",
        atlas_dir,
        "--prompt",
        "winter",
        "--steps",
        2,
        "--write-frames",
        "--out",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert "NOT a real edit" in result.output
    video, fps = read_video(out / "edited.mp4", size=None)
    assert video.shape == (8, 3, 64, 96) and fps == pytest.approx(25.0)
    green, _ = read_video(out / "greenscreen.mp4", size=None)
    assert green.shape == (8, 3, 64, 96)
    for name in ("atlas_edit.png", "atlas_composite.png", "config.yaml", "generator.safetensors"):
        assert (out / name).is_file()
    assert Image.open(out / "atlas_edit.png").mode == "RGBA"
    assert len(list((out / "frames").glob("*.png"))) == 8


def test_cli_video_from_an_mp4_keeps_its_rate(tmp_path, scene, atlas_dir):
    from t2l_fast.video_io import write_video

    _, frames = scene
    clip = write_video(tmp_path / "clip.mp4", frames, fps=12)
    out = tmp_path / "out"
    result = run(clip, "--atlas", atlas_dir, "--prompt", "winter", "--steps", 1, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    video, fps = read_video(out / "edited.mp4", size=None)
    assert video.shape[0] == 8 and fps == pytest.approx(12.0)


def test_cli_video_with_an_nla_checkpoint_and_reference_config(tmp_path, frames_dir):
    ckpt = tmp_path / "checkpoint"
    save_nla_checkpoint(ckpt, NLAModels.create(width=16, seed=0))
    config = tmp_path / "winter.yaml"
    config.write_text(
        f"finetune_background: True\nfinetune_foreground: False\ncheckpoint_path: {ckpt}\n"
        "maximum_number_of_frames: 6\nresx: 96\nresy: 64\ngrid_atlas_resolution: 128\n"
        'screen_text: ["winter scene", "snow"]\ncomp_text: ["winter countryside", "snowy countryside"]\n'
        'src_text: ["countryside", "countryside with trees"]\nn_epochs: 1\n'
    )
    out = tmp_path / "out"
    result = run(frames_dir, "--config", config, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    video, _ = read_video(out / "edited.mp4", size=None)
    assert video.shape == (6, 3, 64, 96)


def _bad(tmp_path, args, message):
    out = tmp_path / "never"
    result = run(*args, "--out", out, *FAST)
    assert result.exit_code != 0
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output and not out.exists()


def test_bad_atlas_inputs(tmp_path, frames_dir, monkeypatch):
    monkeypatch.setattr(pipeline_base, "load_clip", lambda *a, **k: pytest.fail("a model was loaded"))
    _bad(tmp_path, [frames_dir, "--prompt", "x"], "needs an atlas")
    _bad(tmp_path, [frames_dir, "--prompt", "x", "--atlas", tmp_path / "nope"], "atlas not found")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"no checkpoint here")
    _bad(tmp_path, [frames_dir, "--prompt", "x", "--atlas", garbage], "garbage.pt")
    partial = tmp_path / "partial.pt"
    state = {k: m.state_dict() for k, m in NLAModels.create(width=16, seed=0).modules().items()}
    state.pop("model_F_alpha_state_dict")
    torch.save(state, partial)
    _bad(tmp_path, [frames_dir, "--prompt", "x", "--atlas", partial], "model_F_alpha_state_dict")


def test_more_frames_than_the_atlas(tmp_path, frames_dir, scene, monkeypatch):
    monkeypatch.setattr(pipeline_base, "load_clip", lambda *a, **k: pytest.fail("a model was loaded"))
    data, _ = scene
    short = tmp_path / "short.safetensors"
    video_pipeline.AtlasData(
        data.uv_background[:5],
        data.uv_foreground[:5],
        data.alpha[:5],
        data.background_atlas,
        data.foreground_atlas,
        data.background_box,
        data.foreground_box,
        data.grid,
    ).save(short)
    _bad(tmp_path, [frames_dir, "--prompt", "x", "--atlas", short], "the atlas covers 5")
    ckpt = tmp_path / "checkpoint"
    save_nla_checkpoint(ckpt, NLAModels.create(width=16, seed=0))
    _bad(
        tmp_path,
        [
            frames_dir,
            "--prompt",
            "x",
            "--atlas",
            ckpt,
            "--set",
            "video.trained_frames=4",
            "--set",
            "video.width=96",
            "--set",
            "video.height=64",
        ],
        "trained on 4",
    )


def test_bad_videos(tmp_path, atlas_dir):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    _bad(tmp_path, [broken, "--prompt", "x", "--atlas", atlas_dir], "broken.mp4")
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(tmp_path, [empty, "--prompt", "x", "--atlas", atlas_dir], "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (96, 64)).save(mixed / "000.png")
    Image.new("RGB", (90, 60)).save(mixed / "001.png")
    _bad(tmp_path, [mixed, "--prompt", "x", "--atlas", atlas_dir], "001.png")


def test_foreground_edit_on_an_empty_foreground(tmp_path, frames_dir, scene):
    data, _ = scene
    empty = tmp_path / "empty.safetensors"
    video_pipeline.AtlasData(
        data.uv_background,
        data.uv_foreground,
        torch.zeros_like(data.alpha),
        data.background_atlas,
        data.foreground_atlas,
        data.background_box,
        data.foreground_box,
        data.grid,
    ).save(empty)
    _bad(
        tmp_path,
        [frames_dir, "--prompt", "x", "--atlas", empty, "--layer", "foreground"],
        "foreground is empty",
    )


def test_video_options_on_an_image_are_rejected(tmp_path):
    img = tmp_path / "a.png"
    Image.new("RGB", (150, 150)).save(img)
    _bad(tmp_path, [img, "--prompt", "x", "--atlas", tmp_path], "apply to videos only")


def test_fitted_atlas_loads_in_the_video_editor(tmp_path, frames_dir, scene):
    """`t2l-fast atlas` then `t2l-fast edit --atlas`: the two commands a user runs (issue 6)."""
    data, _ = scene
    masks = tmp_path / "masks"
    masks.mkdir()
    for i, a in enumerate(data.alpha):
        Image.fromarray(((a > 0.5).numpy() * 255).astype(np.uint8)).save(masks / f"{i:05d}.png")
    fitted = tmp_path / "fitted"
    result = runner.invoke(
        cli.app,
        [
            "atlas",
            str(frames_dir),
            "--masks",
            str(masks),
            "--out",
            str(fitted),
            "--iterations",
            "40",
            "--size",
            "96x64",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    for layer in ("background", "foreground"):
        out = tmp_path / f"edit-{layer}"
        result = run(
            frames_dir,
            "--atlas",
            fitted,
            "--layer",
            layer,
            "--prompt",
            "winter",
            "--steps",
            1,
            "--out",
            out,
            *FAST,
        )
        assert result.exit_code == 0, result.output
        video, _ = read_video(out / "edited.mp4", size=None)
        assert video.shape == (8, 3, 64, 96)
