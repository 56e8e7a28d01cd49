"""The ``t2l-fast edit`` command: a full run and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import t2l_fast
from t2l_fast import cli
from t2l_fast.cli import edit as edit_command
from t2l_fast.objective import Objective
from t2l_fast.pipeline import base as pipeline_base
from tests.conftest import FAST_CLI as FAST

runner = CliRunner()


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "cat.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any CLIP were loaded: bad input must be caught before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline_base, "load_clip", refuse)


def run(*args):
    return runner.invoke(cli.app, ["edit", *map(str, args)])


def test_three_step_run_writes_every_output(tmp_path, png):
    out = tmp_path / "out"
    result = run(png, "--prompt", "a golden cat", "--steps", 3, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "NOT a real edit" in result.output
    assert f"wrote 6 files to {out}" in result.output
    modes = {"composite.png": "RGB", "edit_layer.png": "RGBA", "alpha.png": "L", "greenscreen.png": "RGB"}
    for name, mode in modes.items():
        with Image.open(out / name) as img:
            assert (img.mode, img.size) == (mode, (200, 150))
    config = (out / "config.yaml").read_text()
    assert "prompt: a golden cat" in config and "steps: 3" in config and "clip: test-tiny" in config
    assert (out / "generator.safetensors").stat().st_size > 0


def test_config_file_is_rerunnable_and_reference_flat_keys_work(tmp_path, png):
    flat = tmp_path / "golden.yaml"
    flat.write_text('comp_text: "golden cat"\nsrc_text: "cat"\nbootstrap_epoch: 2\nn_epochs: 2\n')
    out = tmp_path / "a"
    result = run(png, "--config", flat, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    cfg = (out / "config.yaml").read_text()
    assert "roi_prompt: cat" in cfg and "bootstrap_steps: 2" in cfg
    again = run(png, "--config", out / "config.yaml", "--out", tmp_path / "b", *FAST)
    assert again.exit_code == 0, again.output
    a = np.asarray(Image.open(out / "composite.png"))
    b = np.asarray(Image.open(tmp_path / "b" / "composite.png"))
    assert np.array_equal(a, b)  # same resolved config and seed: the same edit


def test_previews(tmp_path, png):
    out = tmp_path / "out"
    result = run(png, "--prompt", "x", "--steps", 2, "--preview-every", 1, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (out / "previews").iterdir()) == ["step_00001.png", "step_00002.png"]


def test_ctrl_c_writes_current_results_and_exits_130(tmp_path, png, monkeypatch):
    calls = {"n": 0}
    original = Objective.__call__

    def interrupt_second_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:  # step 0 has two examples (crop and whole image)
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Objective, "__call__", interrupt_second_step)
    out = tmp_path / "out"
    result = run(png, "--prompt", "x", "--steps", 5, "--out", out, *FAST)
    assert result.exit_code == 130
    assert (out / "composite.png").is_file() and "(1 step)" in result.output


def _bad(tmp_path, args, message):
    out = tmp_path / "never"
    result = run(*args, "--out", out, *FAST) if "--out" not in map(str, args) else run(*args, *FAST)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_missing_file(tmp_path, no_model):
    _bad(tmp_path, [tmp_path / "nope.png", "--prompt", "x"], "image not found")


def test_not_an_image(tmp_path, no_model):
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    _bad(tmp_path, [fake, "--prompt", "x"], "not an image file")


def test_truncated_image(tmp_path, png, no_model):
    data = png.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    _bad(tmp_path, [cut, "--prompt", "x"], "truncated")


def test_out_is_a_file(tmp_path, png, no_model):
    afile = tmp_path / "file.txt"
    afile.write_text("keep me")
    _bad(tmp_path, [png, "--prompt", "x", "--out", afile], "not a folder")
    assert afile.read_text() == "keep me"


def test_out_cannot_be_created(tmp_path, png, no_model):
    afile = tmp_path / "file.txt"
    afile.write_text("keep me")
    _bad(tmp_path, [png, "--prompt", "x", "--out", afile / "sub"], "cannot be created")


def test_empty_prompt(tmp_path, png, no_model):
    _bad(tmp_path, [png, "--prompt", "  "], "prompt is empty")
    _bad(tmp_path, [png], "prompt is empty")


def test_unknown_config_key(tmp_path, png, no_model):
    _bad(tmp_path, [png, "--prompt", "x", "--set", "loss.lambda_strcture=3"], "'loss.lambda_strcture'")
    bad = tmp_path / "bad.yaml"
    bad.write_text("comp_text: x\nlamda_structure: 2\n")
    _bad(tmp_path, [png, "--config", bad], "'lamda_structure'")


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_not_positive(tmp_path, png, no_model, steps):
    _bad(tmp_path, [png, "--prompt", "x", "--steps", steps], "steps must be > 0")


def test_image_too_small(tmp_path, no_model):
    small = tmp_path / "small.png"
    Image.fromarray(np.zeros((100, 300, 3), dtype=np.uint8)).save(small)
    _bad(tmp_path, [small, "--prompt", "x"], "at least 129 px")


def test_missing_clip_weights_file(tmp_path, png, no_model):
    args = [png, "--prompt", "x", "--clip-weights", tmp_path / "w.safetensors", "--out", tmp_path / "never"]
    result = runner.invoke(cli.app, ["edit", *map(str, args)])
    assert result.exit_code != 0 and "--clip-weights file not found" in result.output


def test_accepted_conversions_are_reported(tmp_path, monkeypatch):
    rgba = tmp_path / "rgba.png"
    pixels = np.random.default_rng(1).integers(0, 255, (140, 150, 4), dtype=np.uint8)
    Image.fromarray(pixels).save(rgba)
    out = tmp_path / "out"
    result = run(rgba, "--prompt", "x", "--steps", 1, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "alpha channel is ignored" in result.output
    assert "for 1 step on" in result.output and f"wrote 6 files to {out}/ (1 step)" in result.output


def test_large_images_are_resized_to_size(tmp_path):
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(big)
    out = tmp_path / "out"
    result = run(big, "--prompt", "x", "--steps", 1, "--size", 150, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert Image.open(out / "composite.png").size == (200, 150)


def test_no_args_shows_help():
    result = runner.invoke(cli.app, [])
    assert "edit" in result.output
    assert torch.__version__  # the CLI imports without touching the GPU


def _png_header(path, width: int, height: int) -> None:
    """A PNG whose header declares width x height (no pixel data): what a decompression bomb shows."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_decompression_bomb_sized_image(tmp_path, no_model):
    bomb = tmp_path / "bomb.png"
    _png_header(bomb, 20000, 12000)
    _bad(tmp_path, [bomb, "--prompt", "x"], "too large (240 MP, above the 100 MP")
    _png_header(bomb, 12000, 9000)  # 108 MP: under PIL's own refusal, above ours
    _bad(tmp_path, [bomb, "--prompt", "x"], "too large (108 MP, above the 100 MP")


def test_flat_image_is_refused(tmp_path, no_model):
    flat = tmp_path / "grey.png"
    arr = np.full((150, 200, 3), 128, dtype=np.uint8)
    arr[0, 0] = 129  # one grey level of noise is still flat
    Image.fromarray(arr).save(flat)
    _bad(tmp_path, [flat, "--prompt", "x"], "single flat colour")


def test_long_prompt_names_the_dropped_words(tmp_path, png, caplog):
    words = " ".join(f"word{i}" for i in range(60)) + " finalword"
    with caplog.at_level("WARNING"):
        result = run(png, "--prompt", words, *FAST, "--steps", "1", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    warnings = [r.getMessage() for r in caplog.records if "longer than CLIP" in r.getMessage()]
    assert len(warnings) == 1, warnings  # once, not once per template
    assert "finalword" in warnings[0] and "word0 " not in warnings[0]


def test_bootstrap_flag(tmp_path, png):
    out = tmp_path / "o"
    result = run(
        png, "--prompt", "x", "--roi-prompt", "cat", "--bootstrap", *FAST, "--steps", "2", "--out", out
    )
    assert result.exit_code == 0, result.output
    import yaml

    assert yaml.safe_load((out / "config.yaml").read_text())["loss"]["bootstrap_steps"] == 2
    result = run(png, "--prompt", "x", "--bootstrap", *FAST, "--steps", "1", "--out", tmp_path / "p")
    assert result.exit_code == 2 and "--roi-prompt" in result.output


def test_the_input_is_judged_before_the_flags(tmp_path, no_model):
    """An empty folder (or a missing file) is the problem to report, not --size or --frames."""
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(tmp_path, [empty, "--prompt", "x", "--size", 160], f"{empty} is a folder without frame images")
    _bad(tmp_path, [tmp_path / "nope.jpg", "--prompt", "x", "--frames", 3], "image not found")
    _bad(tmp_path, [tmp_path / "nope.mp4", "--prompt", "x", "--size", 160], "video not found")


@pytest.mark.parametrize("flag", ["--prompt", "--roi-prompt"])
def test_prompt_that_is_not_utf8_is_refused(tmp_path, png, no_model, flag):
    # what Python makes of the bytes b"caf\xe9" (Latin-1) on a UTF-8 command line
    text = b"caf\xe9 cat".decode("utf-8", "surrogateescape")
    args = [png, "--prompt", "a cat", flag, text]
    _bad(tmp_path, args, f"{flag} holds bytes that are not UTF-8 text (at character 4)")


def test_a_run_longer_than_a_day_is_said_before_it_starts(tmp_path, png, no_model):
    result = run(png, "--prompt", "x", "--steps", 10**9, "--out", tmp_path / "o", *FAST)
    assert isinstance(result.exception, AssertionError)  # it went on to load the model (refused here)
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    days = 10**9 * edit_command.STEP_SECONDS["cpu"][0] / 86400
    assert warnings == [
        f"warning: 1000000000 steps would take more than {days:,.0f} days on cpu (at least 1 s a step); "
        "Ctrl-C stops the run and keeps the result so far"
    ], result.output
    result = run(png, "--prompt", "x", "--steps", 1000, "--out", tmp_path / "o", *FAST)
    assert "warning:" not in result.output  # a normal run: no warning
    assert edit_command.long_run_warning(10**9, "cuda", video=True).startswith("warning: 1000000000 steps")
    assert edit_command.long_run_warning(86400 // 5, "cpu", video=True) is None  # exactly a day: not more


def test_help_version_and_usage():
    result = runner.invoke(cli.app, ["edit", "--help"], prog_name="t2l-fast")
    assert result.exit_code == 0
    assert result.output.startswith("Usage: t2l-fast edit [OPTIONS] INPUT\n"), result.output
    assert "<bool>" not in result.output and "{" not in result.output
    assert "mp4, mov, webm, mkv, avi" in " ".join(result.output.split())
    assert "auto, cuda, cuda:N or cpu" in result.output and "--quick" in result.output
    for command in ("atlas", "serve", "batch"):
        text = runner.invoke(cli.app, [command, "--help"]).output
        assert "<bool>" not in text and "{" not in text and "cuda:N" in " ".join(text.split()), command
    result = runner.invoke(cli.app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"t2l-fast {t2l_fast.__version__}"


def test_variants_write_each_edit_and_a_sheet_to_compare(tmp_path, png):
    out = tmp_path / "looks"
    result = run(
        png,
        "-p",
        "a golden cat",
        "-p",
        "an icy cat",
        "--seed",
        2,
        "--seed",
        5,
        "--steps",
        2,
        "--out",
        out,
        *FAST,
    )
    assert result.exit_code == 0, result.output
    assert "4 variants trained together" in result.output and "NOT a real edit" in result.output
    names = ["a-golden-cat-s2", "a-golden-cat-s5", "an-icy-cat-s2", "an-icy-cat-s5"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "variants.json", "variants.png"])
    for name in names:  # each what a lone edit writes, its config re-runnable alone
        config = (out / name / "config.yaml").read_text()
        assert "draw_seed: 2" in config and f"seed: {name[-1]}" in config
        with Image.open(out / name / "composite.png") as img:
            assert img.size == (200, 150)
    with Image.open(out / "variants.png") as sheet:
        assert sheet.width > 3 * 200 * 256 // 150  # source and three variants in the first row


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "gold", "-p", "gold"], "'gold' given twice"),
        (["-p", "gold", "-p", " "], "prompt 2 of 2 is empty"),
        (["-p", "gold", "--seed", 1, "--seed", 1], "seed 1 given twice"),
        (
            ["-p", "a", "-p", "b", "-p", "c", "--screen-prompt", "x", "--screen-prompt", "y"],
            "given 2 times for 3",
        ),
    ],
)
def test_bad_variants_are_one_line_before_any_model(tmp_path, png, no_model, args, message):
    out = tmp_path / "out"
    result = run(png, *args, "--out", out, *FAST)
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
