"""The handlers of ``t2l-fast serve`` without a browser: input checks, an image edit with its progress
and outputs, cancelling, the video tab (atlas fit, then an edit), the page's queue, the command."""

from __future__ import annotations

import socket
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from t2l_fast import cli
from t2l_fast.io import InputError
from t2l_fast.serve import App, Limits, checkerboard, extract_images, samples
from t2l_fast.synthetic import two_layer_scene
from tests.test_cli import _png_header

SMALL = "generator.channels_down=8\ngenerator.channels_up=8\nruntime.log_every=1"


@pytest.fixture
def app(tiny_clip, tmp_path):
    return App(tiny_clip, "cpu", tmp_path / "work")


@pytest.fixture
def picture(tmp_path):
    """A 200x150 RGB image file."""
    y, x = np.mgrid[0:150, 0:200]
    arr = np.stack([x * 255 // 200, y * 255 // 150, (x + y) % 256], -1).astype(np.uint8)
    path = tmp_path / "picture.png"
    Image.fromarray(arr).save(path)
    return path


def image_config(app, steps=2, **kw):
    return app.image_config("a golden cat", steps=steps, advanced={"views.n_aug": 2.0}, more=SMALL, **kw)


# ---------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------
def test_bad_images_get_one_readable_line(app, tmp_path, picture):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    with pytest.raises(InputError, match="notes.txt is not an image file"):
        app.load_image(text)
    with pytest.raises(InputError, match="upload an image or pick a sample"):
        app.load_image(None)
    small = App(app.clip, "cpu", tmp_path / "w2", Limits(max_megapixels=0.01))
    with pytest.raises(InputError, match=r"200x150 .* up to 0.01 MP"):
        small.load_image(picture)
    assert app.load_image(picture).size == (200, 150)
    for w, h in ((1, 1), (300, 100)):  # refused on upload, not only when Edit is pressed
        tiny = tmp_path / f"tiny{w}.png"
        Image.new("RGB", (w, h), (90, 30, 10)).save(tiny)
        with pytest.raises(InputError, match=rf"tiny{w}.png is {w}x{h} px; .* at least 129 px"):
            app.load_image(tiny)
    bomb = tmp_path / "bomb.png"  # past PIL's own refusal, which does not give the size
    _png_header(bomb, 20000, 12000)
    with pytest.raises(InputError, match=r"bomb.png is too large \(240 MP\): .* up to 25 MP"):
        app.load_image(bomb)
    for name, path in samples().items():  # the bundled samples load
        assert min(app.load_image(path).size) >= 129, name


def test_bad_settings_get_one_readable_line(app):
    with pytest.raises(InputError, match="enter a prompt"):
        app.image_config("   ")
    with pytest.raises(InputError, match="not key=value"):
        app.image_config("cat", more="generator.channels_down 8")
    with pytest.raises(InputError, match="no_such"):
        app.image_config("cat", more="loss.no_such=1")
    with pytest.raises(InputError, match="steps must be a whole number"):
        app.image_config("cat", steps=0)
    with pytest.raises(InputError, match="needs the ROI prompt"):
        app.image_config("cat", bootstrap=True)
    cfg = app.image_config(
        "cat", " ", "the cat", steps=7, seed=3, advanced={"data.size": 160.0}, bootstrap=True
    )
    assert (cfg.prompt, cfg.screen_prompt, cfg.roi_prompt) == ("cat", None, "the cat")
    assert (cfg.optim.steps, cfg.seed, cfg.data.size, cfg.loss.bootstrap_steps) == (7, 3, 160, 7)
    assert cfg.clip == "test-tiny"


def test_zip_members_cannot_escape_and_are_bounded(tmp_path):
    archive = tmp_path / "frames.zip"
    buf = Image.new("RGB", (8, 8))
    buf.save(tmp_path / "a.png")
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tmp_path / "a.png", "../../evil.png")
        zf.write(tmp_path / "a.png", "clip/00001.png")
        zf.writestr("readme.txt", "ignored")
    out = extract_images(archive, tmp_path / "x" / "frames", "frames", Limits())
    assert sorted(p.name for p in out.iterdir()) == ["00001.png", "evil.png"]
    assert not (tmp_path / "evil.png").exists()
    with pytest.raises(InputError, match="holds 2 images; the page accepts 1"):
        extract_images(archive, tmp_path / "y", "frames", Limits(max_zip_files=1))
    (tmp_path / "bad.zip").write_text("not a zip")
    with pytest.raises(InputError, match="bad.zip is not a zip file"):
        extract_images(tmp_path / "bad.zip", tmp_path / "z", "masks", Limits())


def test_checkerboard_shows_opacity():
    rgba = torch.zeros(4, 24, 24)
    rgba[0] = 1.0
    rgba[3, :, :12] = 1.0  # opaque red on the left, transparent on the right
    arr = np.asarray(checkerboard(rgba, cell=6))
    assert (arr[:, :12] == [255, 0, 0]).all()
    right = arr[:, 12:, 0]
    assert set(np.unique(right)) == {153, 204}  # the two greys of the board


# ---------------------------------------------------------------------------------------------------
# Image edits
# ---------------------------------------------------------------------------------------------------
def test_image_edit_reports_progress_then_every_output(app, picture):
    updates = list(app.edit_image("s1", picture, image_config(app, preview_every=1)))
    statuses = [u["status"] for u in updates if "status" in u]
    assert any("step 1 / 2" in s for s in statuses) and any("step 2 / 2" in s for s in statuses)
    previews = [u for u in updates[:-1] if "preview" in u]
    assert len(previews) == 2 and all("preview_edit" in u for u in previews)  # composite and edit layer
    assert previews[0]["preview"].size == (200, 150)
    plots = [u["losses"] for u in updates if "losses" in u]
    assert len(plots[0]) > 0 and plots[0]["value"].dtype == np.float64

    final = updates[-1]
    assert "done: 2 steps" in final["status"] and "NOT real edits" in final["status"]
    assert set(final["losses"]["step"]) == {1, 2} and "loss" in set(final["losses"]["term"])
    for key in ("composite", "alpha", "greenscreen"):
        assert Image.open(final[key]).size == (200, 150), key
    assert final["edit_layer"].size == (200, 150)
    names = set(zipfile.ZipFile(final["download"]).namelist())
    assert {"composite.png", "edit_layer.png", "alpha.png", "greenscreen.png"} <= names
    assert {"config.yaml", "generator.safetensors"} <= names
    assert app.cancel("s1").startswith("nothing to cancel")  # the run is over


def test_cancel_stops_at_the_current_step_and_keeps_the_result(app, picture):
    assert app.cancel("s2").startswith("nothing to cancel")
    run = app.edit_image("s2", picture, image_config(app, steps=40))
    for update in run:
        if "step 2 / 40" in update.get("status", ""):
            assert app.cancel("other").startswith("nothing")  # another page's button does nothing
            assert app.cancel("s2").startswith("cancelling")
            break
    final = list(run)[-1]
    done = int(final["status"].split("cancelled after ")[1].split()[0])
    assert 2 <= done < 40
    assert {"config.yaml", "generator.safetensors"} <= set(zipfile.ZipFile(final["download"]).namelist())


def test_closing_the_page_stops_the_run(app, picture):
    run = app.edit_image("s3", picture, image_config(app, steps=40))
    for update in run:
        if "step 1 / 40" in update.get("status", ""):
            break
    run.close()  # what the server does when the page goes away: the run is cancelled and waited for
    assert app.cancel("s3").startswith("nothing to cancel")
    assert len(list(app.workdir.glob("image-*/generator.safetensors"))) == 1


def test_a_failing_run_reports_one_line_and_the_app_serves_on(app, picture, monkeypatch):
    from t2l_fast.pipeline.image import ImageEditor

    def boom(self, *args, **kwargs):
        raise RuntimeError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(ImageEditor, "train", boom)
        with pytest.raises(InputError, match="the run failed: RuntimeError: out of memory"):
            list(app.edit_image("s4", picture, image_config(app)))
    assert (
        "done: 1 step, final loss"
        in list(app.edit_image("s4", picture, image_config(app, steps=1)))[-1]["status"]
    )


def test_a_long_prompt_is_said_on_the_page_during_and_after_the_run(app, picture):
    words = " ".join(f"word{i}" for i in range(60)) + " finalword"
    cfg = app.image_config(words, steps=2, advanced={"views.n_aug": 1.0}, more=SMALL)
    statuses = [u["status"] for u in app.edit_image("s5", picture, cfg) if "status" in u]
    said = [s for s in statuses if "note: the prompt is longer than CLIP's 77 tokens" in s]
    assert said == statuses and "finalword" in statuses[-1], statuses  # on every status, the last too
    assert "done: 2 steps" in statuses[-1]


# ---------------------------------------------------------------------------------------------------
# Video edits
# ---------------------------------------------------------------------------------------------------
def _zip_images(path, images):
    with zipfile.ZipFile(path, "w") as zf:
        for i, arr in enumerate(images):
            tmp = path.parent / f"_{i:05d}.png"
            Image.fromarray(arr).save(tmp)
            zf.write(tmp, f"seq/{i:05d}.png")
            tmp.unlink()
    return path


@pytest.fixture(scope="module")
def video_zips(tmp_path_factory):
    """The synthetic two-layer video (8 frames of 96x64) as a frames zip and a masks zip."""
    data, frames = two_layer_scene()
    folder = tmp_path_factory.mktemp("video")
    rgb = [(f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for f in frames]
    masks = [((a > 0.5).numpy() * 255).astype(np.uint8) for a in data.alpha]
    return _zip_images(folder / "frames.zip", rgb), _zip_images(folder / "masks.zip", masks)


def video_config(app, layer="background"):
    return app.video_config("winter", layer=layer, steps=2, more=SMALL + "\nviews.n_aug=2")


def test_fit_then_edit_a_video(app, video_zips):
    frames_zip, masks_zip = video_zips
    fit = list(app.fit_atlas("v", frames_zip, masks_zip, iterations=20, size="96x64"))
    assert any("step 20 / 20" in u.get("status", "") for u in fit)
    final = fit[-1]
    assert "atlas fitted: 20 iterations" in final["status"] and "background only" not in final["status"]
    for key in ("atlas", "reconstruction", "background_atlas", "foreground_atlas"):
        assert final[key] and open(final[key], "rb").read(4), key

    updates = list(app.edit_video("v", frames_zip, final["atlas"], video_config(app, "foreground")))
    result = updates[-1]
    assert "done: 2 steps" in result["status"]
    assert open(result["edited"], "rb").read(12)[4:8] == b"ftyp"  # an MP4 the page can play
    names = set(zipfile.ZipFile(result["download"]).namelist())
    assert {
        "edited.mp4",
        "greenscreen.mp4",
        "atlas_edit.png",
        "config.yaml",
        "generator.safetensors",
    } <= names


def test_foreground_edit_without_masks_says_so(app, video_zips):
    frames_zip, _ = video_zips
    final = list(app.fit_atlas("v2", frames_zip, None, iterations=3, size="96x64"))[-1]
    assert "background only" in final["status"]
    with pytest.raises(InputError, match="foreground edit needs the object's masks"):
        list(app.edit_video("v2", frames_zip, final["atlas"], video_config(app, "foreground")))


def test_bad_video_inputs(app, tmp_path, video_zips):
    frames_zip, _ = video_zips
    with pytest.raises(InputError, match="upload a video"):
        list(app.fit_atlas("v3", None, None))
    text = tmp_path / "clip.txt"
    text.write_text("x")
    with pytest.raises(InputError, match="clip.txt is not a video"):
        list(app.fit_atlas("v3", text, None))
    with pytest.raises(InputError, match="holds no PNG or JPEG images"):
        list(app.fit_atlas("v3", frames_zip, text_zip(tmp_path)))
    with pytest.raises(InputError, match="WIDTHxHEIGHT"):
        list(app.fit_atlas("v3", frames_zip, None, size="big"))
    with pytest.raises(InputError, match="fit an atlas first"):
        list(app.edit_video("v3", frames_zip, None, video_config(app)))
    with pytest.raises(InputError, match="enter a prompt"):
        app.video_config("")


def text_zip(tmp_path):
    path = tmp_path / "masks.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "no images here")
    return path


# ---------------------------------------------------------------------------------------------------
# The page and the command
# ---------------------------------------------------------------------------------------------------
def test_runs_share_one_queue_of_one_and_checks_do_not_wait(app):
    from t2l_fast.serve.page import RUN_QUEUE, build_page

    page = build_page(app)
    fns = {}
    for fn in page.fns.values():
        fns.setdefault(fn.name, []).append(fn)
    runs = fns["edit"] + fns["run_fit"]
    assert len(runs) == 3  # image edit, atlas fit, video edit
    assert all(f.concurrency_id == RUN_QUEUE and f.concurrency_limit == 1 for f in runs)
    for name in ("check", "load", "stop"):
        assert all(f.concurrency_limit is None for f in fns[name]), name


def test_every_run_and_cancel_gets_its_session(app):
    """Gradio injects gr.Request into positional parameters only: a handler that took it after
    ``*values`` ran as session "default", and its Cancel found nothing to cancel."""
    import inspect

    import gradio as gr
    from gradio.helpers import special_args

    from t2l_fast.serve.page import build_page

    page = build_page(app)
    request = gr.Request(username="someone")
    checked = []
    for fn in page.fns.values():
        if "request" not in inspect.signature(fn.fn).parameters:
            continue
        n = len(fn.inputs)
        inputs, *_ = special_args(fn.fn, [f"value {i}" for i in range(n)], request=request)
        assert request in inputs and len(inputs) == n + 1, fn.name
        checked.append(fn.name)
    assert sorted(checked) == ["edit", "edit", "edit_variants", "run_fit", "stop", "stop"], checked


def test_a_bad_fit_request_is_one_status_line_and_leaves_the_other_outputs(app):
    """Like the edits: the fit's bad input is the status's last update, not an exception (which
    would mark every output of the fit with an error badge)."""
    import gradio as gr

    from t2l_fast.serve.page import build_page

    page = build_page(app)
    (fit,) = [f for f in page.fns.values() if f.name == "run_fit"]
    n = len(fit.inputs)
    no_video = [None, None, 20, "96x64", None, "masks"] + [0] * (n - 6)  # the fields, the video missing
    with pytest.warns(UserWarning, match="video"):
        updates = list(fit.fn(gr.Request(username="someone"), *no_video))
    status, *rest = updates[-1]
    assert status.startswith("error: ") and "video" in status and "\n" not in status
    assert len(rest) == len(fit.outputs) - 1 and all(u == gr.skip() for u in rest)


def test_serve_says_in_one_line_when_the_port_is_taken():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = CliRunner().invoke(cli.app, ["serve", "--clip", "test-tiny", "--port", str(port)])
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"error: port {port} on 127.0.0.1 is already in use: stop the other server or pass --port N"
    )


def test_variants_show_live_previews_then_each_composite_and_the_sheet(app, picture):
    cfg = image_config(app, preview_every=1)
    variants = app.variants("a golden cat\n\nan icy cat\n", 2, cfg)  # blank lines left out
    assert [(v.prompt, v.seed) for v in variants] == [
        ("a golden cat", 0),
        ("a golden cat", 1),
        ("an icy cat", 0),
        ("an icy cat", 1),
    ]
    updates = list(app.edit_variants("v1", picture, cfg, variants))
    live = [u["gallery"] for u in updates[:-1] if "gallery" in u]
    sizes = [len(g) for g in live]  # a variant's preview joins as it comes (2 variants a run on the CPU)
    assert sizes[0] == 1 and sizes == sorted(sizes) and sizes[-1] == 4
    statuses = [u["status"] for u in updates[:-1] if "status" in u]
    assert sum("step 2 / 2" in t for t in statuses) == 2  # each run of 2 variants reports its steps
    assert all(image.size == (200, 150) for image, _ in live[-1]) and live[-1][2][1] == "an icy cat\nseed 0"
    final = updates[-1]
    assert "done: 4 of 4 variants, 2 steps" in final["status"] and "NOT real edits" in final["status"]
    sheet, *each = final["gallery"]
    assert sheet[1] == "all variants" and Image.open(sheet[0]).width > 4 * 200  # the sheet: a row of 4+
    assert [c for _, c in each] == [f"{v.prompt}\nseed {v.seed}" for v in variants]
    assert all(Image.open(path).size == (200, 150) for path, _ in each)  # each one downloadable
    names = set(zipfile.ZipFile(final["download"]).namelist())
    assert {"variants.png", "variants.json", "an-icy-cat-s1/composite.png"} <= names


def test_bad_variants_get_one_readable_line(app):
    cfg = image_config(app)
    for text, message in [("", "write one prompt a line"), ("gold\ngold", "'gold' given twice")]:
        with pytest.raises(InputError, match=message):
            app.variants(text, 1, cfg)
    with pytest.raises(InputError, match="seeds per prompt must be at least 1"):
        app.variants("gold", 0, cfg)
