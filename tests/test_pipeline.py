"""The library: ImageEditor end to end on the CPU with the tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import t2l_fast
from t2l_fast import ImageEditor, preset
from t2l_fast.io import InputError
from tests.conftest import small_config


def test_public_names():
    for name in ("ImageEditor", "EditResult", "Config", "preset", "load_clip"):
        assert hasattr(t2l_fast, name)


def test_edit_returns_every_layer(tiny_clip, image):
    cfg = small_config(steps=2)
    cfg.roi_prompt = "cat"
    cfg.loss.bootstrap_steps = 2
    result = ImageEditor(cfg, device="cpu", clip=tiny_clip)(image)
    h, w = image.shape[-2:]
    assert result.composite.shape == (3, h, w) and result.greenscreen.shape == (3, h, w)
    assert result.edit.shape == (3, h, w) and result.alpha.shape == (1, h, w)
    assert result.edit_layer.shape == (4, h, w)
    a = result.alpha
    torch.testing.assert_close(result.composite, a * result.edit + (1 - a) * image, atol=1e-5, rtol=0)
    assert len(result.losses) == 2 and result.steps_done == 2 and not result.interrupted
    assert {"loss", "comp_clip", "comp_dir", "screen", "structure", "sparsity", "bootstrap"} <= set(
        result.losses[0]
    )
    assert result.is_test_model


def test_same_seed_same_result_and_different_seed_differs(tiny_clip, image):
    cfg = small_config(steps=2)
    a = ImageEditor(cfg, device="cpu", clip=tiny_clip)(image)
    b = ImageEditor(cfg, device="cpu", clip=tiny_clip)(image)
    torch.testing.assert_close(a.composite, b.composite, atol=0, rtol=0)
    assert a.losses == b.losses
    cfg.seed = 1
    c = ImageEditor(cfg, device="cpu", clip=tiny_clip)(image)
    assert not torch.equal(a.composite, c.composite)


def test_accepts_path_and_pil(tmp_path, tiny_clip, image):
    arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path = tmp_path / "in.png"
    Image.fromarray(arr).save(path)
    editor = ImageEditor(small_config(steps=1), device="cpu", clip=tiny_clip)
    from_path = editor(path)
    from_pil = editor(Image.open(path))
    torch.testing.assert_close(from_path.composite, from_pil.composite)
    torch.testing.assert_close(from_path.source, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)


def test_optimisation_reduces_the_objective(tiny_clip, image):
    """A few steps on a fixed problem lower the loss (tiny CLIP, fp32)."""
    cfg = small_config(steps=12)
    cfg.data.source_every = 1000  # every example is the whole image: a fixed input makes losses comparable
    cfg.data.crop_min_cover = 1.0
    cfg.data.scale_min = cfg.data.scale_max = 1.0
    cfg.data.flip_p = cfg.data.jitter_p = 0.0
    cfg.optim.lr = 1e-2
    result = ImageEditor(cfg, device="cpu", clip=tiny_clip)(image)
    first = np.mean([r["loss"] for r in result.losses[:3]])
    last = np.mean([r["loss"] for r in result.losses[-3:]])
    assert last < first


def test_save_writes_every_output(tmp_path, tiny_clip, image):
    result = ImageEditor(small_config(steps=1), device="cpu", clip=tiny_clip)(image)
    out = tmp_path / "out"
    result.save(out)
    expected = {"composite.png": "RGB", "edit_layer.png": "RGBA", "alpha.png": "L", "greenscreen.png": "RGB"}
    for name, mode in expected.items():
        with Image.open(out / name) as img:
            assert img.mode == mode and img.size == (170, 140)
    cfg = t2l_fast.config.load_yaml(out / "config.yaml")
    assert cfg == result.config
    assert (out / "generator.safetensors").is_file()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_saved_generator_reapplies_without_training(tmp_path, tiny_clip, image):
    cfg = small_config(steps=2)
    result = ImageEditor(cfg, device="cpu", clip=tiny_clip)(image)
    result.save(tmp_path)
    fresh = ImageEditor(preset("image"), device="cpu", clip=tiny_clip)  # generator size comes from the file
    fresh.config.data.size = 0
    again = fresh.apply(tmp_path / "generator.safetensors", image)
    torch.testing.assert_close(again.composite, result.composite, atol=1e-6, rtol=0)
    with pytest.raises(InputError, match="not found"):
        fresh.apply(tmp_path / "nope.safetensors", image)


def test_keyboard_interrupt_keeps_the_current_result(tiny_clip, image):
    def stop(state):
        if state.step == 1:
            raise KeyboardInterrupt

    result = ImageEditor(small_config(steps=5), device="cpu", clip=tiny_clip)(image, callback=stop)
    assert result.interrupted and result.steps_done == 2
    assert result.composite.shape == (3, 140, 170)


def test_previews_every_n_steps(tiny_clip, image):
    cfg = small_config(steps=4)
    cfg.preview_every = 2
    seen = []

    def show(state):
        pictures = None if state.composite is None else (state.composite.shape, state.rgba)
        seen.append((state.step, state.steps, pictures))

    result = ImageEditor(cfg, device="cpu", clip=tiny_clip)(
        image, callback=show, callback_inputs=("composite",)
    )
    assert [(step, steps) for step, steps, _ in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert [p for _, _, p in seen] == [None, ((3, 140, 170), None), None, ((3, 140, 170), None)]
    assert not result.interrupted


def test_the_step_callback_sees_what_it_asks_for_and_stops_the_run(tiny_clip, image):
    """The contract (pipeline/callbacks.py): pictures by name on preview steps, the step's losses,
    and a stop by returning True or by setting ``state.stop``."""
    cfg = small_config(steps=6)
    cfg.preview_every = 1
    editor = ImageEditor(cfg, device="cpu", clip=tiny_clip)
    seen = []

    def watch(state):
        seen.append((dict(state.losses), state.composite, state.rgba))
        return state.step == 2

    result = editor(image, callback=watch, callback_inputs=("composite", "rgba"))
    assert result.interrupted and result.steps_done == 3 and len(seen) == 3
    assert [losses for losses, _, _ in seen] == result.losses  # the same records the result keeps
    _, composite, rgba = seen[-1]  # the last step's pictures are the result's pictures
    torch.testing.assert_close(composite, result.composite)
    torch.testing.assert_close(rgba, result.edit_layer)

    def flag(state):
        state.stop = state.step == 1

    assert editor(image, callback=flag).steps_done == 2
    with pytest.raises(ValueError, match="unknown"):
        editor(image, callback=flag, callback_inputs=("alpha",))


def test_bad_inputs_raise_before_training(tiny_clip, image):
    editor = ImageEditor(small_config(), device="cpu", clip=tiny_clip)
    with pytest.raises(InputError, match="prompt is empty"):
        editor(image, prompt="  ")
    with pytest.raises(InputError, match="at least 129 px"):
        editor(torch.rand(3, 100, 300))
    with pytest.raises(InputError, match="no CUDA"):
        if torch.cuda.is_available():
            raise InputError("no CUDA (skipped: a GPU is present)")
        ImageEditor(small_config(), device="cuda", clip=tiny_clip)


def test_prepare_returns_the_run_and_train_reads_only_it(tiny_clip, image):
    cfg = small_config(steps=1)
    cfg.seed = -1  # drawn per run
    editor = ImageEditor(cfg, device="cpu", clip=tiny_clip)
    run = editor.prepare(image, prompt="a red cat")
    assert run.config.prompt == "a red cat" and run.config.seed >= 0
    assert editor.config.prompt == cfg.prompt != "a red cat" and editor.config.seed == -1  # untouched
    assert run.source.shape == (1, *image.shape)
    run.config.optim.steps = 2  # a change to the run is what trains
    result = editor.train(run)
    assert result.config is run.config and result.steps_done == 2


def test_the_editor_keeps_its_clip_per_model_and_weights(monkeypatch, tiny_clip, image):
    from t2l_fast.pipeline import base as pipeline_base

    loads = []
    monkeypatch.setattr(
        pipeline_base, "load_clip", lambda name, weights, device: loads.append(name) or tiny_clip
    )
    editor = ImageEditor(small_config(), device="cpu")
    first = editor.prepare(image)
    assert editor.load_clip(first) is tiny_clip and editor.load_clip(editor.prepare(image)) is tiny_clip
    assert len(loads) == 1  # the same model and weights: loaded once
    other = editor.prepare(image)
    other.config.clip_weights = "other.safetensors"
    editor.load_clip(other)
    assert len(loads) == 2
    given = ImageEditor(small_config(), device="cpu", clip=tiny_clip)
    given.load_clip(other)
    assert len(loads) == 2  # a CLIP given to the editor serves every run


def test_clip_may_be_given_by_name(image):
    """``clip="test-tiny"`` names the model (as ``cfg.clip`` does); the caller's config is not changed."""
    from t2l_fast import VideoEditor
    from t2l_fast.pipeline.base import Run

    cfg = small_config(steps=1)
    assert cfg.clip != "test-tiny"
    editor = ImageEditor(cfg, device="cpu", clip="test-tiny")
    result = editor(image)
    assert result.is_test_model and result.config.clip == "test-tiny" and result.steps_done == 1
    assert cfg.clip != "test-tiny"
    video = VideoEditor(preset("video"), device="cpu", clip="test-tiny")
    assert video.config.clip == "test-tiny" and video.load_clip(Run(video.config)).is_test_model
