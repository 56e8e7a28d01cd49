"""Video variants: the files a person compares (variants.png of the middle frame, variants.mp4 of
every frame, variants.json), and, end to end, from the command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from t2l_fast import batch, cli
from t2l_fast.config import preset
from t2l_fast.pipeline import base as pipeline_base
from t2l_fast.pipeline.variants import grid_layout, make_variants, save_variants
from t2l_fast.pipeline.video import VideoEditResult
from t2l_fast.synthetic import two_layer_scene
from t2l_fast.video_io import read_video
from tests.conftest import FAST_CLI as FAST

runner = CliRunner()

T, H, W = 5, 37, 53  # odd sizes: the sheet's width is odd, the mp4's is made even
FPS = 12.0
VARIANT_FILES = ("edited.mp4", "greenscreen.mp4", "atlas_edit.png", "config.yaml", "generator.safetensors")


def _result(variant, frames, composite, step_loss) -> VideoEditResult:
    cfg = preset("video")
    cfg.prompt, cfg.seed, cfg.draw_seed = variant.prompt, variant.seed, 3
    return VideoEditResult(
        losses=[{"loss": step_loss + 1.0}, {"loss": step_loss}],
        config=cfg,
        generator_state={"head.weight": torch.full((2, 2), step_loss)},
        steps_done=2,
        frames=frames,
        composite=composite,
        greenscreen=composite.flip(1),
        atlas_edit=torch.rand(4, 16, 24),
        atlas_composite=torch.rand(3, 16, 24),
        fps=FPS,
        layer="background",
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("looks")
    gen = torch.Generator().manual_seed(7)
    frames = torch.rand(T, 3, H, W, generator=gen)  # the source: each frame different
    variants = make_variants(["golden", "wooden"], [3])
    composites = [torch.rand(T, 3, H, W, generator=gen) for _ in variants]  # distinct per variant
    pairs = enumerate(zip(variants, composites, strict=True))
    results = [_result(v, frames, c, 0.1 * (k + 1)) for k, (v, c) in pairs]
    paths = save_variants(out, variants, results)
    return out, paths, variants, results, [frames, *composites]


def _tile_error(sheet: torch.Tensor, picture: torch.Tensor, box) -> float:
    """Mean absolute difference of a tile of ``sheet`` (3, gh, gw) in [0, 1] and ``picture`` (3, H, W)
    resized to the tile independently (torch's bicubic, not the sheet's PIL resize)."""
    top, left, th, tw = box
    want = F.interpolate(picture[None], size=(th, tw), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return float((sheet[:, top : top + th, left : left + tw] - want).abs().mean())


def _errors(sheet: torch.Tensor, pictures: list[torch.Tensor], box) -> dict[tuple[int, int], float]:
    """{(picture j, frame s): the tile's error against that frame of that picture}."""
    return {(j, s): _tile_error(sheet, p[s], box) for j, p in enumerate(pictures) for s in range(T)}


def test_variants_mp4_is_the_captioned_sheet_of_every_frame(saved):
    out, paths, _, _, pictures = saved
    assert out / "variants.mp4" in paths
    video, fps = read_video(out / "variants.mp4", size=None)
    (gh, gw), boxes = grid_layout((H, W), 2)
    assert gw % 2 == 1  # the odd case: the mp4 is padded by a (white) column
    assert video.shape == (T, 3, gh + gh % 2, gw + gw % 2) and fps == pytest.approx(FPS)
    video = video.float() / 255
    assert float(video[:, :, :, gw:].mean()) > 0.9  # the padding is white (up to the codec's ringing)
    for t in range(T):
        for i, box in enumerate(boxes):
            # the tile against every picture at every frame: its own picture at this frame is the one
            errors = _errors(video[t], pictures, box)
            own = errors.pop((i, t))
            assert own < 0.06 and own < 0.5 * min(errors.values()), (t, i, own, min(errors.values()))
            top, left, th, tw = box
            assert float(video[t, :, top + th + 2 : top + th + 38, left : left + tw].min()) < 0.5  # a caption


def test_variants_png_is_the_sheet_of_the_middle_frame(saved):
    out, _, _, _, pictures = saved
    sheet = torch.from_numpy(np.array(Image.open(out / "variants.png").convert("RGB"))).permute(2, 0, 1)
    (gh, gw), boxes = grid_layout((H, W), 2)
    assert tuple(sheet.shape) == (3, gh, gw)
    sheet = sheet.float() / 255
    mid = T // 2
    for i, box in enumerate(boxes):
        errors = _errors(sheet, pictures, box)
        own = errors.pop((i, mid))
        assert own < 0.06 and own < 0.5 * min(errors.values()), (i, own, min(errors.values()))
    # the mp4's middle frame shows the same sheet, captions included (up to the video's compression)
    video, _ = read_video(out / "variants.mp4", size=None)
    frame = video[mid, :, :gh, :gw].float() / 255
    assert float((frame - sheet).abs().mean()) < 0.05
    wrong = video[0, :, :gh, :gw].float() / 255  # another frame: visibly another sheet
    assert float((wrong - sheet).abs().mean()) > 0.1


def test_each_variant_folder_and_the_summary(saved):
    out, paths, variants, results, _ = saved
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(v.name for v in variants), "variants.json", "variants.mp4", "variants.png"]
    )
    for v in variants:
        for name in VARIANT_FILES:
            assert (out / v.name / name).is_file() and out / v.name / name in paths
        edited, _ = read_video(out / v.name / "edited.mp4", size=None)
        assert edited.shape[0] == T
    summary = json.loads((out / "variants.json").read_text())
    assert [(s["name"], s["prompt"], s["seed"], s["draw_seed"], s["steps"]) for s in summary] == [
        (v.name, v.prompt, v.seed, 3, 2) for v in variants
    ]
    assert [s["final_losses"] for s in summary] == [r.losses[-1] for r in results]


# ---------------------------------------------------------------------------------------------------
# End to end: the command line and a batch (VideoEditor.prepare_variants / train_variants)
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_dirs(tmp_path_factory):
    """A synthetic two-layer video as a folder of frames (8 of 96x64) and its atlas folder."""
    data, frames = two_layer_scene()
    root = tmp_path_factory.mktemp("clip")
    (root / "frames").mkdir()
    for i, f in enumerate(frames):
        Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            root / "frames" / f"{i:05d}.png"
        )
    (root / "atlas").mkdir()
    data.save(root / "atlas" / "atlas.safetensors")
    return root / "frames", root / "atlas"


def _edit(*args):
    return runner.invoke(cli.app, ["edit", *map(str, args)])


def test_bad_video_variants_are_one_line_before_any_model(tmp_path, clip_dirs, monkeypatch):
    monkeypatch.setattr(pipeline_base, "load_clip", lambda *a, **k: pytest.fail("a model was loaded"))
    frames, atlas = clip_dirs
    out = tmp_path / "never"
    for args, message in [
        (["-p", "gold", "-p", "gold"], "'gold' given twice"),
        (["-p", "gold", "--seed", 1, "--seed", 1], "seed 1 given twice"),
        (["-p", "a", "-p", "b", "-p", "c", "--roi-prompt", "x", "--roi-prompt", "y"], "given 2 times for 3"),
    ]:
        result = _edit(frames, "--atlas", atlas, *args, "--out", out, *FAST)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and not out.exists()


def test_cli_video_variants_write_each_edit_and_the_sheets(tmp_path, clip_dirs):
    frames, atlas = clip_dirs
    out = tmp_path / "looks"
    variants = ["-p", "winter", "-p", "autumn", "--seed", 4]
    result = _edit(frames, "--atlas", atlas, *variants, "--steps", 1, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "2 variants trained together" in result.output and "8 frames, 96x64" in result.output
    assert "the background of" in result.output and "NOT a real edit" in result.output
    names = ["winter-s4", "autumn-s4"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*names, "variants.json", "variants.mp4", "variants.png"]
    )
    for name in names:  # each what a lone video edit writes, its config re-runnable alone
        for file in (*VARIANT_FILES, "atlas_composite.png"):
            assert (out / name / file).is_file(), (name, file)
        edited, fps = read_video(out / name / "edited.mp4", size=None)
        assert edited.shape == (8, 3, 64, 96) and fps == pytest.approx(25.0)
        config = (out / name / "config.yaml").read_text()
        assert config.startswith(f"prompt: {name[:-3]}\n") and "\nseed: 4\ndraw_seed: 4\n" in config
    (gh, gw), _ = grid_layout((64, 96), 2)
    video, fps = read_video(out / "variants.mp4", size=None)
    assert video.shape == (8, 3, gh, gw) and fps == pytest.approx(25.0)
    with Image.open(out / "variants.png") as sheet:
        assert sheet.size == (gw, gh)
    summary = json.loads((out / "variants.json").read_text())
    assert [(s["name"], s["draw_seed"], s["steps"]) for s in summary] == [(n, 4, 1) for n in names]


def test_batch_trains_video_variants_together_as_their_lone_edits(tmp_path, clip_dirs):
    frames, atlas = clip_dirs
    small = {"generator.channels_down": 8, "generator.channels_up": 8, "views.n_aug": 2}
    job = {"input": str(frames), "atlas": str(atlas), "steps": 1, "set": small, "name": "v"}
    out = tmp_path / "results"
    summary = batch.run([{**job, "prompt": ["winter", "autumn"]}], out, clip="test-tiny", device="cpu")
    assert summary.ok and [r.variants for r in summary.records] == [2, 2]
    assert "2 jobs were trained together" in (out / "summary.md").read_text()
    for name, prompt in (("v-winter", "winter"), ("v-autumn", "autumn")):
        assert read_video(out / name / "edited.mp4", size=None)[0].shape == (8, 3, 64, 96)
        config = (out / name / "config.yaml").read_text()
        assert config.startswith(f"prompt: {prompt}\n") and "\nseed: 0\ndraw_seed: 0\n" in config
    # the second variant equals its lone edit on the group's draw stream
    lone = tmp_path / "lone"
    sets = [a for k, v in small.items() for a in ("--set", f"{k}={v}")]
    args = ["-p", "autumn", "--steps", 1, "--set", "draw_seed=0", "--clip", "test-tiny", "--device", "cpu"]
    result = _edit(frames, "--atlas", atlas, *args, *sets, "--out", lone)
    assert result.exit_code == 0, result.output
    grouped = load_file(out / "v-autumn" / "generator.safetensors")
    alone = load_file(lone / "generator.safetensors")
    assert grouped.keys() == alone.keys()
    for key in alone:
        torch.testing.assert_close(grouped[key], alone[key], rtol=1e-5, atol=1e-7, msg=key)
