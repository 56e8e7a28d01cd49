"""The bundled samples: the clip is what the code says it is, and the README's quickstart runs on them."""

from __future__ import annotations

import re
import shlex
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


def _quickstart_commands() -> list[list[str]]:
    """The README quickstart's ``t2l-fast`` commands (continuation lines joined), as argument lists."""
    quickstart = (ROOT / "README.md").read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quickstart, re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    lines = [line.split("  #", 1)[0].strip() for line in text.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("t2l-fast ")]


def _without(args: list[str], *options: str) -> list[str]:
    """``args`` less the flag ``--quick`` and each of ``options`` with its value."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg != "--quick":
            out.append(arg)
    return out


def test_every_quickstart_command_has_a_quick_form_that_runs(tmp_path, monkeypatch):
    """Each quickstart command on the shipped samples has its ``--quick`` twin (the same command but
    for where it writes and which atlas it reads), and every ``--quick`` command runs as written, in a
    fresh folder, writing only under out/ (the edits with the tiny CLIP: no weights are downloaded)."""
    commands = _quickstart_commands()
    quick = [c for c in commands if "--quick" in c]
    full = [c for c in commands if "--quick" not in c and c[2].startswith("t2l_fast/samples/")]
    assert len(full) >= 5 and len(quick) >= len(full) + 1  # + the smoke run
    twins = [_without(c, "--out", "--atlas") for c in quick]
    for command in full:
        assert _without(command, "--out", "--atlas") in twins, command
    for command in commands:  # outputs go under out/, never into the checkout
        assert "--out" not in command or command[command.index("--out") + 1].startswith("out/"), command

    (tmp_path / "t2l_fast").symlink_to(ROOT / "t2l_fast")  # the samples, as in a checkout
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for command in quick:
        args = command[1:]
        if args[0] == "edit" and "--clip" not in args:
            args += ["--clip", "test-tiny"]
        result = runner.invoke(cli.app, args)
        assert result.exit_code == 0, (command, result.output)
        out = tmp_path / args[args.index("--out") + 1]
        wanted = {"edit": ("composite.png", "edited.mp4"), "atlas": ("atlas.safetensors",)}[args[0]]
        assert any((out / name).is_file() for name in wanted), (command, sorted(out.iterdir()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t2l_fast"]
    atlas = AtlasData.load(tmp_path / "out/atlas/clip-quick/atlas.safetensors")
    assert (atlas.num_frames, atlas.width, atlas.height) == (8, 192, 108)
    assert not atlas.foreground_is_empty(0.5)  # the masks made a foreground layer


def test_the_readme_layout_names_every_module():
    layout = (ROOT / "README.md").read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    for folder in ("t2l_fast", "kernels", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh") and path.name != "__init__.py":
                assert path.name in layout, f"{path.relative_to(ROOT)} is not in the README's layout"
