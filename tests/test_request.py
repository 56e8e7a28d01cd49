"""The request path (``t2l_fast.request``): every rule a request must meet, tested once here, and each
front-end (``t2l-fast edit`` / ``atlas``, a batch manifest, the web page) shown to reach it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from t2l_fast import request
from t2l_fast.config import preset
from t2l_fast.io import InputError
from t2l_fast.request import (
    OptionError,
    build_config,
    check_input,
    check_kind_options,
    check_object,
    edit_base,
    edit_config,
    fit_config,
    fit_frames,
    flag,
    is_video_input,
    key,
    parse_box,
    whole_number,
)


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def frames(tmp_path, png) -> Path:
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i:05d}.png").write_bytes(png.read_bytes())
    return folder


# ---------------------------------------------------------------------------------------------------
# The input
# ---------------------------------------------------------------------------------------------------
def test_what_is_a_video(tmp_path, png, frames):
    assert is_video_input(frames) and is_video_input(tmp_path / "a.mp4") and not is_video_input(png)
    # a missing folder of frames looks like an image by its name: an atlas says it is a video
    assert not is_video_input(tmp_path / "clip2") and is_video_input(tmp_path / "clip2", atlas="a")
    assert not is_video_input(png, atlas="a")  # an image file stays an image


def test_the_input_is_checked_first(tmp_path, png, frames):
    assert check_input(frames) and not check_input(png)
    with pytest.raises(InputError, match="image not found"):
        check_input(tmp_path / "nope.png")
    with pytest.raises(InputError, match="video not found"):
        check_input(tmp_path / "nope.mp4")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="is a folder without frame images"):
        check_input(tmp_path / "empty")


def test_options_of_the_other_kind_of_input(png):
    with pytest.raises(OptionError, match=r"--atlas, --frames apply to videos only \(") as caught:
        check_kind_options(False, png, {"atlas": "a", "frames": 3, "size": 160, "write_frames": False})
    assert caught.value.option == "atlas"
    with pytest.raises(OptionError, match=r"^size apply to images only$") as caught:
        check_kind_options(True, None, {"size": 160, "layer": "foreground"}, name=key)
    assert caught.value.option == "size"
    check_kind_options(True, png, {"atlas": "a", "preview_every": None, "write_frames": False})


# ---------------------------------------------------------------------------------------------------
# An edit
# ---------------------------------------------------------------------------------------------------
def test_config_precedence(tmp_path):
    """Preset < YAML file < --set < the options; False / None options are not given."""
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("seed: 3\noptim: {steps: 7, lr: 0.5}\nviews: {n_aug: 5}\n")
    cfg = build_config(
        yaml_file, ["optim.steps=9", "seed=4"], preset("video"), seed=5, frames=None, write_frames=False
    )
    assert (cfg.views.n_aug, cfg.optim.lr, cfg.optim.steps, cfg.seed) == (5, 0.5, 9, 5)
    assert cfg.loss.lambda_structure == preset("video").loss.lambda_structure and not cfg.video.write_frames
    cfg = build_config(None, [], None, steps=12, bootstrap=True, atlas=Path("x"))
    assert cfg.loss.bootstrap_steps == 12 and cfg.video.atlas == "x"  # over all the run's steps


def test_quick_settings_are_under_the_file_and_overrides():
    base = edit_base(False, None, ["optim.steps=4"], quick=True)
    assert (base.optim.steps, base.data.size) == (4, 160)
    assert edit_base(True, quick=True).video.frames == 8


def test_edit_config_checks_every_rule(tmp_path, png, frames):
    cfg = edit_config(png, False, prompt="a golden cat", steps=3, seed=1, clip="test-tiny")
    assert (cfg.prompt, cfg.optim.steps, cfg.seed, cfg.clip) == ("a golden cat", 3, 1, "test-tiny")
    with pytest.raises(InputError, match="apply to videos only"):
        edit_config(png, False, prompt="x", layer="foreground")
    with pytest.raises(InputError, match="steps must be > 0"):  # the config's own rules: Config.validate
        edit_config(png, False, prompt="x", steps=0)
    with pytest.raises(OptionError, match="a video job needs an atlas: give atlas"):
        edit_config(frames, True, prompt="x", name=key, run="job")
    assert edit_config(frames, True, prompt="x", require_atlas=False).video.atlas is None
    with pytest.raises(InputError, match="--clip-weights file not found"):
        edit_config(png, False, prompt="x", clip_weights=tmp_path / "w.safetensors")
    latin1 = b"caf\xe9".decode("utf-8", "surrogateescape")
    with pytest.raises(InputError, match="--roi-prompt holds bytes that are not UTF-8"):
        edit_config(png, False, prompt="x", roi_prompt=latin1)
    base = preset("image")
    edit_config(png, False, base, prompt="x", steps=2)
    assert base.prompt == "" and base.optim.steps == 1000  # the base is not changed


def test_whole_number():
    assert whole_number(None, "steps") is None and whole_number(3.0, "steps") == 3
    with pytest.raises(InputError, match=r"steps must be a whole number \(got 2.5\)"):
        whole_number(2.5, "steps")


# ---------------------------------------------------------------------------------------------------
# An atlas fit
# ---------------------------------------------------------------------------------------------------
def test_fit_config():
    cfg = fit_config(["iterations=7", "w_rigidity=1e-3"], batch=64)
    assert (cfg.iterations, cfg.w_rigidity, cfg.batch) == (7, 1e-3, 64)
    assert fit_config(["iterations=7"], iterations=9).iterations == 9  # the option wins over --set
    quick = fit_config(quick=True)
    assert [f"{k}={getattr(quick, k)}" for k in ("iterations", "grid")] == request.QUICK_FIT
    assert fit_config(["iterations=5"], quick=True).iterations == 5  # --set over --quick
    with pytest.raises(InputError, match=r"^--iterations must be > 0 \(got 0\)$"):
        fit_config(iterations=0)
    with pytest.raises(InputError, match="iterations must be >= 0"):  # FitConfig.validate
        fit_config(iterations=-1)
    with pytest.raises(InputError, match="unknown config key 'w_nope'"):
        fit_config(["w_nope=1"])


def test_fit_frames_and_size():
    assert fit_frames(None, None) == (None, (768, 432))
    assert fit_frames(None, None, quick=True) == (request.QUICK_ATLAS["frames"], (192, 108))
    assert fit_frames(5, "64x48", quick=True) == (5, (64, 48))
    with pytest.raises(InputError, match=r"--frames must be at least 3 \(got 2\)"):
        fit_frames(2, None)
    with pytest.raises(InputError, match="the fit size must be WIDTHxHEIGHT"):
        fit_frames(None, "big", name=lambda o: {"size": "the fit size"}.get(o, o))


def test_the_object_box_and_one_way_to_mark_the_object():
    assert parse_box(" 10, 20,30 ,40") == (10.0, 20.0, 30.0, 40.0)
    for text in ("10,20,30", "a,b,c,d", "1,2,3,inf"):
        with pytest.raises(InputError, match="is not X,Y,W,H"):
            parse_box(text)
    names = {"masks": "--masks", "auto": "--masks auto", "box": "--object"}
    check_object("box", False, names)
    check_object("masks", True, names)
    with pytest.raises(InputError, match="--object and --masks are alternatives"):
        check_object("box", True, names)
    with pytest.raises(InputError, match="unknown way to mark the object 'guess'"):
        check_object("guess", False, names)


# ---------------------------------------------------------------------------------------------------
# Each front-end reaches the request path and shows its error as it is
# ---------------------------------------------------------------------------------------------------
def _refuse(monkeypatch, module: str, name: str, calls: list) -> None:
    def refuse(*args, **kwargs):
        calls.append(kwargs)
        raise InputError(f"refused by {name}")

    monkeypatch.setattr(f"{module}.{name}", refuse)


def test_the_edit_command_reaches_it(monkeypatch, png, tmp_path):
    from t2l_fast import cli

    calls: list = []
    _refuse(monkeypatch, "t2l_fast.cli.edit", "edit_config", calls)
    args = [
        "edit",
        str(png),
        "--prompt",
        "x",
        "--steps",
        "3",
        "--set",
        "seed=2",
        "--out",
        str(tmp_path / "o"),
    ]
    result = CliRunner().invoke(cli.app, args)
    assert result.exit_code == 2 and result.output.strip() == "error: refused by edit_config"
    assert calls[0]["prompt"] == "x" and calls[0]["steps"] == 3 and calls[0]["overrides"] == ["seed=2"]


def test_the_atlas_command_reaches_it(monkeypatch, frames, tmp_path):
    from t2l_fast import cli

    calls: list = []
    _refuse(monkeypatch, "t2l_fast.cli.atlas", "fit_config", calls)
    result = CliRunner().invoke(
        cli.app, ["atlas", str(frames), "--iterations", "4", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and result.output.strip() == "error: refused by fit_config"
    assert calls[0]["iterations"] == 4


def test_a_manifest_reaches_it(monkeypatch, png):
    from t2l_fast.batch import load_manifest

    calls: list = []
    _refuse(monkeypatch, "t2l_fast.batch.manifest", "edit_config", calls)
    with pytest.raises(InputError, match=r"^manifest, job 1: refused by edit_config$"):
        load_manifest([{"input": str(png), "prompt": "x", "steps": 3}])
    assert calls[0]["steps"] == 3 and calls[0]["name"] is key and calls[0]["run"] == "job"


def test_the_page_reaches_it(monkeypatch, tmp_path, tiny_clip):
    from t2l_fast.serve import App

    app = App(tiny_clip, "cpu", tmp_path / "w")
    calls: list = []
    _refuse(monkeypatch, "t2l_fast.serve.state", "edit_config", calls)
    with pytest.raises(InputError, match="refused by edit_config"):
        app.image_config("x", steps=3.0)
    with pytest.raises(InputError, match="refused by edit_config"):
        app.video_config("x", layer="foreground")
    assert calls[0]["steps"] == 3 and calls[1]["layer"] == "foreground"
    _refuse(monkeypatch, "t2l_fast.serve.atlas", "fit_config", calls)
    frames_zip = tmp_path / "frames.zip"
    import zipfile

    with zipfile.ZipFile(frames_zip, "w") as zf:
        zf.writestr("00000.png", b"")
    with pytest.raises(InputError, match="refused by fit_config"):
        list(app.fit_atlas("s", frames_zip, None, iterations=5))
    assert calls[2]["iterations"] == 5


def test_flag_names():
    assert flag("preview_every") == "--preview-every" and key("preview_every") == "preview_every"
