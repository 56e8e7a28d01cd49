"""Configuration: presets, YAML round trip, the reference's flat-key files, overrides, validation."""

from __future__ import annotations

import dataclasses

import pytest

from t2l_fast.config import Config, FitConfig, load_yaml, parse_overrides, preset
from t2l_fast.io import InputError

# The reference implementation's full default image config (configs/image_config.yaml), verbatim keys.
REFERENCE_IMAGE_CONFIG = """\
seed: -1
use_wandb: False
wandb_project: project_name  # enter your project name here
wandb_entity: project_entity  # enter your entity here
device: cuda
log_images_freq: 50
# dataset configuration
results_folder: "results"
resize_input: 512
d_divisible_crops: 1
source_image_every: 75
crops_min_cover: 0.85

# input augmentations
flip_p: 0.5
jitter_p: 0.1
scale_min: 0.8
scale_max: 1.2

# text configuration
bootstrap_scheduler: linear # linear | exponential | none
text_criterion: spherical # spherical | cosine

# loss configuration
bootstrap_epoch: -1
lambda_bootstrap: 10
lambda_bootstrap_min: 0
bootstrapping_min_cover: 1
lambda_structure: 2
lambda_screen: 1
lambda_sparsity: 6
lambda_alpha_l0: 0.01
lambda_alpha_l1: 0.01
lambda_composition: 1
use_negative_bootstrap: False

# CLIP handling configuration
n_aug: 16
clip_model_name: "ViT-B/32"
relevancy_num_layers: 10

# CLIP augmentations
clip_affine_transform_fill: 1

# training configuration
n_epochs: 1000
scheduler_policy: exponential
gamma: 0.99
min_lr: 0.00001
lr: 0.0025
optimizer: madgrad

# CNN backbone configuration
skip_n33d: 128
skip_n33u: 128
skip_n11: 4
num_scales: 7
"""

REFERENCE_EXAMPLE_CONFIG = (
    'image_path: "./data/images/horse.jpg"\n'
    'screen_text: "golden horse"\n'
    'comp_text: "golden horse"\n'
    'src_text: "horse"\n'
    'bootstrap_text: "horse"\n'
    "bootstrap_epoch: 1000\n"
)


def _write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# -- presets ------------------------------------------------------------------------------------------
def test_image_preset_matches_design_defaults():
    cfg = preset("image")
    assert cfg.views.n_aug == 16
    assert cfg.loss.lambda_structure == 2.0
    assert cfg.loss.lambda_screen == 1.0
    assert cfg.loss.lambda_composition == 1.0
    assert cfg.loss.lambda_sparsity == 6.0
    assert cfg.loss.lambda_alpha_l0 == 0.01
    assert cfg.loss.lambda_alpha_l1 == 0.01
    assert cfg.loss.lambda_bootstrap == 10.0
    assert cfg.loss.text_criterion == "spherical"
    assert cfg.optim.steps == 1000
    assert cfg.optim.gamma == 0.99
    assert cfg.optim.lr == 2.5e-3
    assert cfg.optim.min_lr == 1e-5
    assert cfg.optim.momentum == 0.9
    assert cfg.optim.weight_decay == 0.01
    assert (
        cfg.generator.scales,
        cfg.generator.channels_down,
        cfg.generator.channels_up,
        cfg.generator.channels_skip,
    ) == (7, 128, 128, 4)
    assert cfg.data.size == 512 and cfg.data.source_every == 75 and cfg.data.crop_min_cover == 0.85
    assert (cfg.data.flip_p, cfg.data.jitter_p) == (0.5, 0.1)
    assert (cfg.data.scale_min, cfg.data.scale_max) == (0.8, 1.2)
    assert cfg.views.short_side == 224 and cfg.views.max_long_side == 320
    assert cfg.views.structure_max_long_side == 380
    assert cfg.views.min_cover == 0.6
    assert (cfg.views.flip_p, cfg.views.affine_p, cfg.views.perspective_p) == (0.5, 0.8, 0.5)
    assert (cfg.views.degrees, cfg.views.translate, cfg.views.distortion) == (15.0, 0.1, 0.4)
    assert (cfg.views.jitter_p, cfg.views.jitter, cfg.views.grayscale_p) == (0.7, 0.1, 0.15)
    assert cfg == Config()


def test_video_preset_matches_design_defaults():
    cfg = preset("video")
    assert cfg.views.n_aug == 6
    assert cfg.loss.lambda_structure == 3.0
    assert cfg.loss.lambda_screen == 1.0
    assert cfg.loss.lambda_sparsity == 0.1
    assert cfg.loss.lambda_alpha_l0 == 0.005
    assert cfg.loss.lambda_alpha_l1 == 0.01
    assert cfg.optim.steps == 3000
    assert cfg.optim.gamma == 0.999
    assert cfg.optim.min_lr == 1e-5 and cfg.optim.lr == 2.5e-3


def test_presets_are_independent_objects():
    a, b = preset("video"), preset("video")
    a.views.n_aug = 99
    assert b.views.n_aug == 6
    assert preset("image").views.n_aug == 16


def test_unknown_preset_rejected():
    with pytest.raises(InputError, match="nope"):
        preset("nope")


# -- YAML round trip ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["image", "video"])
def test_yaml_round_trip(tmp_path, name):
    cfg = preset(name)
    cfg.prompt = "a golden cat"
    cfg.screen_prompt = "golden fur"
    cfg.roi_prompt = "cat"
    cfg.seed = 123
    cfg.optim.min_lr = 1e-7
    cfg.loss.bootstrap_steps = 250
    cfg.views.fill = 0.0
    path = _write(tmp_path, cfg.to_yaml())
    back = load_yaml(path)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    # types survive (an int stays an int, a float a float, None stays None)
    assert isinstance(back.optim.steps, int) and isinstance(back.optim.lr, float)
    assert back.bootstrap_prompt is None and back.clip_weights is None


def test_yaml_round_trip_over_other_base(tmp_path):
    """A saved image config fully determines the result even over the video preset."""
    cfg = preset("image")
    cfg.prompt = "x"
    back = load_yaml(_write(tmp_path, cfg.to_yaml()), base=preset("video"))
    assert back == cfg


def test_nested_own_format(tmp_path):
    path = _write(tmp_path, "prompt: a cat\nloss:\n  lambda_structure: 5\noptim:\n  steps: 7\n")
    cfg = load_yaml(path)
    assert cfg.prompt == "a cat" and cfg.loss.lambda_structure == 5.0 and cfg.optim.steps == 7
    assert isinstance(cfg.loss.lambda_structure, float)
    # untouched keys keep the image defaults
    assert cfg.loss.lambda_sparsity == 6.0 and cfg.views.n_aug == 16


# -- the reference implementation's flat files --------------------------------------------------------
def test_reference_example_config(tmp_path):
    cfg = load_yaml(_write(tmp_path, REFERENCE_EXAMPLE_CONFIG, "golden_horse.yaml"))
    assert cfg.prompt == "golden horse"
    assert cfg.screen_prompt == "golden horse"
    assert cfg.roi_prompt == "horse"
    assert cfg.bootstrap_prompt == "horse"
    assert cfg.loss.bootstrap_steps == 1000
    assert cfg.effective_bootstrap_steps == 1000
    assert cfg.effective_bootstrap_prompt == "horse"
    # everything else keeps the image defaults
    rest = dataclasses.replace(cfg, prompt="", screen_prompt=None, roi_prompt=None, bootstrap_prompt=None)
    rest.loss.bootstrap_steps = 0
    assert rest == preset("image")
    cfg.validate()


def test_reference_full_default_image_config(tmp_path):
    cfg = load_yaml(_write(tmp_path, REFERENCE_IMAGE_CONFIG, "image_config.yaml"))
    assert cfg.seed == -1
    assert cfg.preview_every == 50
    assert cfg.data.size == 512
    assert cfg.data.source_every == 75
    assert cfg.data.crop_min_cover == 0.85
    assert cfg.data.flip_p == 0.5 and cfg.data.jitter_p == 0.1
    assert cfg.data.scale_min == 0.8 and cfg.data.scale_max == 1.2
    assert cfg.loss.text_criterion == "spherical"
    assert cfg.loss.bootstrap_steps == 0  # bootstrap_epoch -1: no bootstrap
    assert cfg.loss.lambda_bootstrap == 10.0
    assert cfg.loss.lambda_structure == 2.0
    assert cfg.loss.lambda_screen == 1.0
    assert cfg.loss.lambda_sparsity == 6.0
    assert cfg.loss.lambda_alpha_l0 == 0.01 and cfg.loss.lambda_alpha_l1 == 0.01
    assert cfg.loss.lambda_composition == 1.0
    assert cfg.loss.relevancy_num_layers == 10
    assert cfg.views.n_aug == 16
    assert cfg.views.fill == 1.0 and isinstance(cfg.views.fill, float)
    assert cfg.optim.steps == 1000
    assert cfg.optim.gamma == 0.99
    assert cfg.optim.min_lr == pytest.approx(1e-5, rel=1e-12)
    assert cfg.optim.lr == 0.0025
    assert cfg.generator.channels_down == 128 and cfg.generator.channels_up == 128
    assert cfg.generator.channels_skip == 4 and cfg.generator.scales == 7
    # no prompt in that file: the bootstrap is off even with a ROI prompt set later
    cfg.prompt, cfg.roi_prompt = "golden horse", "horse"
    assert cfg.effective_bootstrap_steps == 0


def test_reference_full_config_then_example(tmp_path):
    """The reference merges the example over the defaults; loading one over the other does the same."""
    base = load_yaml(_write(tmp_path, REFERENCE_IMAGE_CONFIG, "image_config.yaml"))
    cfg = load_yaml(_write(tmp_path, REFERENCE_EXAMPLE_CONFIG, "ex.yaml"), base=base)
    assert cfg.prompt == "golden horse" and cfg.loss.bootstrap_steps == 1000 and cfg.seed == -1


@pytest.mark.parametrize("key", ["not_a_key", "checkpointt", "lambda_structur"])
def test_unknown_flat_key_named(tmp_path, key):
    with pytest.raises(InputError, match=key):
        load_yaml(_write(tmp_path, REFERENCE_EXAMPLE_CONFIG + f"{key}: 3\n"))


def test_unknown_nested_key_named(tmp_path):
    with pytest.raises(InputError, match=r"loss\.lambda_foo"):
        load_yaml(_write(tmp_path, "loss:\n  lambda_foo: 1\n"))


@pytest.mark.parametrize(
    "line, key",
    [
        ("optimizer: adam", "optimizer"),
        ("scheduler_policy: cosine", "scheduler_policy"),
        ("clip_model_name: ViT-L/14", "clip_model_name"),
        ("bootstrap_scheduler: exponential", "bootstrap_scheduler"),
        ("use_negative_bootstrap: True", "use_negative_bootstrap"),
        ("d_divisible_crops: 32", "d_divisible_crops"),
    ],
)
def test_unsupported_reference_values_rejected(tmp_path, line, key):
    with pytest.raises(InputError, match=key):
        load_yaml(_write(tmp_path, REFERENCE_IMAGE_CONFIG + line + "\n"))


def test_missing_and_bad_yaml_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="not valid YAML"):
        load_yaml(_write(tmp_path, "a: [1, 2\n", "bad.yaml"))
    with pytest.raises(InputError, match="mapping"):
        load_yaml(_write(tmp_path, "- 1\n- 2\n", "list.yaml"))


def test_bad_value_type_in_file(tmp_path):
    with pytest.raises(InputError, match="n_aug"):
        load_yaml(_write(tmp_path, "n_aug: lots\n"))
    with pytest.raises(InputError, match="n_aug"):
        load_yaml(_write(tmp_path, "n_aug: 2.5\n"))


def test_scientific_notation_in_file(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-5 as a string; a number field must still accept it
    cfg = load_yaml(_write(tmp_path, "min_lr: 1e-5\noptim:\n  lr: 3e-3\n"))
    assert cfg.optim.min_lr == 1e-5 and cfg.optim.lr == 3e-3


# -- --set overrides ----------------------------------------------------------------------------------
def test_overrides_apply_with_types():
    cfg = parse_overrides(
        preset("image"),
        [
            "loss.lambda_structure=3",
            "views.n_aug=4",
            "prompt=a red car",
            "optim.lr=1e-3",
            "roi_prompt=car",
            "n_epochs=20",
            "loss.bootstrap_steps=40",
            "views.n_aug=5.0",
        ],
    )
    assert cfg.loss.lambda_structure == 3.0 and isinstance(cfg.loss.lambda_structure, float)
    assert cfg.views.n_aug == 5 and isinstance(cfg.views.n_aug, int)
    assert cfg.prompt == "a red car"
    assert cfg.roi_prompt == "car"
    assert cfg.optim.lr == 1e-3
    assert cfg.optim.steps == 20  # reference flat key works on the command line too
    assert cfg.loss.bootstrap_steps == 40


def test_override_value_keeps_equals_signs():
    cfg = parse_overrides(preset(), ["prompt=a=b"])
    assert cfg.prompt == "a=b"


def test_override_int_field_given_fraction():
    with pytest.raises(InputError, match=r"views\.n_aug.*integer"):
        parse_overrides(preset(), ["views.n_aug=1.5"])


def test_override_number_field_given_text():
    with pytest.raises(InputError, match=r"optim\.lr.*number"):
        parse_overrides(preset(), ["optim.lr=fast"])
    with pytest.raises(InputError, match="seed"):
        parse_overrides(preset(), ["seed=true"])  # a bool is not a number
    with pytest.raises(InputError, match=r"optim\.steps"):
        parse_overrides(preset(), ["optim.steps=nan"])


def test_override_section_key_rejected():
    with pytest.raises(InputError, match="section"):
        parse_overrides(preset(), ["loss=3"])
    with pytest.raises(InputError, match="section"):
        parse_overrides(preset(), ["optim=1"])


def test_override_unknown_and_malformed():
    with pytest.raises(InputError, match=r"loss\.lambda_nope"):
        parse_overrides(preset(), ["loss.lambda_nope=1"])
    with pytest.raises(InputError, match=r"data\.size\.x"):
        parse_overrides(preset(), ["data.size.x=1"])  # descends into a non-section
    with pytest.raises(InputError, match="key=value"):
        parse_overrides(preset(), ["loss.lambda_structure"])
    with pytest.raises(InputError, match="needs a value"):
        parse_overrides(preset(), ["optim.steps="])


def test_override_does_not_touch_other_presets():
    cfg = parse_overrides(preset(), ["views.n_aug=2"])
    assert cfg.views.n_aug == 2
    assert preset().views.n_aug == 16


# -- validate -----------------------------------------------------------------------------------------
def _valid() -> Config:
    cfg = preset()
    cfg.prompt = "a golden cat"
    return cfg


def test_validate_accepts_a_good_config():
    cfg = _valid()
    assert cfg.validate() is cfg


@pytest.mark.parametrize("prompt", ["", "   ", "\t\n"])
def test_validate_empty_prompt(prompt):
    cfg = _valid()
    cfg.prompt = prompt
    with pytest.raises(InputError, match="prompt is empty"):
        cfg.validate()


def test_validate_empty_optional_prompt():
    cfg = _valid()
    cfg.screen_prompt = "  "
    with pytest.raises(InputError, match="screen_prompt"):
        cfg.validate()


@pytest.mark.parametrize("steps", [0, -1])
def test_validate_steps(steps):
    cfg = _valid()
    cfg.optim.steps = steps
    with pytest.raises(InputError, match="steps must be > 0"):
        cfg.validate()


@pytest.mark.parametrize(
    "section, name, value",
    [
        ("views", "n_aug", 0),
        ("data", "size", -1),
        ("loss", "text_criterion", "l2"),
        ("data", "crop_min_cover", 0.0),
        ("views", "min_cover", 1.5),
        ("data", "scale_min", 2.0),
        ("video", "frames", 0),
    ],
)
def test_validate_other_bad_values(section, name, value):
    cfg = _valid()
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(InputError):
        cfg.validate()


# -- derived values -----------------------------------------------------------------------------------
def test_effective_screen_prompt():
    cfg = _valid()
    assert cfg.effective_screen_prompt == "a golden cat"
    cfg.screen_prompt = "gold"
    assert cfg.effective_screen_prompt == "gold"


def test_effective_bootstrap():
    cfg = _valid()
    cfg.optim.steps = 321
    # off by default, as the original's bootstrap_epoch: -1, even with a ROI prompt
    assert cfg.loss.bootstrap_steps == 0 and preset("video").loss.bootstrap_steps == 0
    cfg.roi_prompt = "cat"
    assert cfg.effective_bootstrap_steps == 0
    # asked for: over bootstrap_steps, the relevancy of the ROI prompt
    cfg.loss.bootstrap_steps = 50
    assert cfg.effective_bootstrap_prompt == "cat"
    assert cfg.effective_bootstrap_steps == 50
    # the bootstrap text takes precedence over the ROI prompt for the relevancy map
    cfg.bootstrap_prompt = "cat face"
    assert cfg.effective_bootstrap_prompt == "cat face"
    # a zero weight switches it off too
    cfg.loss.lambda_bootstrap = 0.0
    assert cfg.effective_bootstrap_steps == 0
    # asked for without any region to look for: one clear error
    cfg = _valid()
    cfg.loss.bootstrap_steps = 10
    with pytest.raises(InputError, match="--roi-prompt"):
        cfg.validate()


def test_validate_preview_every():
    cfg = _valid()
    cfg.preview_every = -1
    with pytest.raises(InputError, match="preview_every must be >= 0"):
        cfg.validate()


# -- the atlas fit's settings ---------------------------------------------------------------------------
def test_fit_config_validate():
    assert FitConfig().validate().iterations == 2000
    FitConfig(iterations=0).validate()  # the library fits zero iterations (the initialisation's atlas)
    for kwargs, message in (
        ({"iterations": -1}, "iterations must be >= 0"),
        ({"batch": 8}, "batch must be >= 16"),
        ({"compile": "sometimes"}, "compile must be auto, on or off"),
    ):
        with pytest.raises(InputError, match=message):
            FitConfig(**kwargs).validate()


def test_types_come_from_the_annotations():
    """``--set`` converts by the field's type (typing.get_type_hints), tuples of numbers included."""
    cfg = parse_overrides(FitConfig(), ["residual_cells=[32, 8]", "batch=none", "grid=512"])
    assert cfg.residual_cells == (32.0, 8.0) and cfg.batch is None and cfg.grid == 512
    with pytest.raises(InputError, match="expects a number"):
        parse_overrides(FitConfig(), ["alpha_cells=[1, x]"])
    cfg = parse_overrides(preset(), ["prompt=[a, b]", "roi_prompt=cat", "clip_weights=none"])
    assert cfg.prompt == "[a, b]" and cfg.roi_prompt == "cat" and cfg.clip_weights == "none"
