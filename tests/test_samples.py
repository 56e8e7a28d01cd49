"""The bundled samples: the clip is what the code says it is, and the README's quickstart runs on them."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from typer.testing import CliRunner

from t2l_fast import cli
from t2l_fast.fit.masks import read_masks
from t2l_fast.models.atlas import AtlasData
from t2l_fast.synthetic import SAMPLES, sample_clip
from t2l_fast.video_io import read_video

ROOT = Path(__file__).resolve().parents[1]
CLIP = SAMPLES / "clip"


def test_the_sample_clip_is_the_documented_composite():
    frames, _ = read_video(CLIP / "frames", size=None)
    t, _, h, w = frames.shape
    assert (t, h, w) == (24, 432, 768)
    masks = read_masks(CLIP / "masks", t, (w, h))
    want_frames, want_masks = sample_clip(t, (w, h))
    assert torch.equal(masks, want_masks)  # the masks are exact
    err = (frames.float() / 255 - want_frames).abs()
    assert float(err.mean()) < 0.01 and float(err.mean()) > 0  # JPEG: close, not identical
    # the object is in every frame and moves right; inside the mask the frame is the cup, not the cat
    assert bool(masks.flatten(1).any(1).all())
    xs = torch.arange(w).float()
    centre = (masks.float().sum(1) * xs).sum(1) / masks.float().sum((1, 2))
    assert bool((centre[1:] > centre[:-1]).all())
    assert float((want_frames[:, 0] - want_frames[:, 2])[masks].mean()) > 0.1  # the red saucer


def test_the_quickstart_names_files_that_ship():
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"t2l_fast/samples/[\w./-]+", quickstart))
    assert {
        "t2l_fast/samples/chelsea.jpg",
        "t2l_fast/samples/clip/frames",
        "t2l_fast/samples/clip/masks",
    } <= named
    for path in named:
        assert (ROOT / path).exists(), path
    assert "../shared" not in quickstart  # only our machines have that folder


def test_the_video_quickstart_runs_on_the_sample_clip(tmp_path, monkeypatch):
    """The README's two video commands (atlas, then a foreground edit), made tiny."""
    monkeypatch.chdir(ROOT)
    runner = CliRunner()
    atlas = tmp_path / "atlas"
    small = ("--frames", "6", "--device", "cpu")
    fit = [
        "atlas",
        "t2l_fast/samples/clip/frames",
        "--masks",
        "t2l_fast/samples/clip/masks",
        "--out",
        str(atlas),
    ]
    result = runner.invoke(cli.app, [*fit, "--size", "192x108", "--iterations", "10", *small])
    assert result.exit_code == 0, result.output
    data = AtlasData.load(atlas / "atlas.safetensors")
    assert (data.num_frames, data.width, data.height) == (6, 192, 108)
    assert not data.foreground_is_empty(0.5)  # the masks made a foreground layer
    out = tmp_path / "cup"
    edit = ["edit", "t2l_fast/samples/clip/frames", "--atlas", str(atlas), "--layer", "foreground"]
    prompts = ["--prompt", "a golden cup", "--roi-prompt", "cup", "--clip", "test-tiny", "--steps", "1"]
    result = runner.invoke(cli.app, [*edit, *prompts, *small, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "edited.mp4").is_file() and (out / "atlas_edit.png").is_file()


def test_the_readme_layout_names_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    for folder in ("t2l_fast", "kernels", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh") and path.name != "__init__.py":
                assert path.name in layout, f"{path.relative_to(ROOT)} is not in the README's layout"
