"""Configuration: nested dataclasses with presets, YAML (de)serialisation and ``key=value`` overrides.

Own YAML files are nested (``loss: {lambda_structure: 2}``); the reference implementation's flat
files (``comp_text``, ``lambda_structure``, ``n_epochs``, ...) map through one explicit table,
``REFERENCE_KEYS``. An unknown key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .io import InputError


@dataclass
class DataConfig:
    """The internal dataset: augmented crops of the one input (DESIGN §1)."""

    size: int = 512  # short side the input is resized to (down only; 0 keeps the input size)
    source_every: int = 75  # feed the un-augmented input every N steps
    crop_min_cover: float = 0.85  # random crop covers this..1 of each side
    flip_p: float = 0.5
    jitter_p: float = 0.1
    scale_min: float = 0.8
    scale_max: float = 1.2


@dataclass
class ViewConfig:
    """The augmented views fed to CLIP."""

    n_aug: int = 16
    short_side: int = 224
    max_long_side: int = 320  # augmented views
    structure_max_long_side: int = 380  # un-augmented view of the structure loss
    min_cover: float = 0.6  # views 1..n-1 crop this..1 of each side
    fill: float = 1.0  # value outside the image after affine / perspective warps
    flip_p: float = 0.5
    affine_p: float = 0.8
    degrees: float = 15.0
    translate: float = 0.1
    perspective_p: float = 0.5
    distortion: float = 0.4
    jitter_p: float = 0.7
    jitter: float = 0.1  # brightness, contrast, saturation and hue strength
    grayscale_p: float = 0.15


@dataclass
class GeneratorConfig:
    """Deep-Image-Prior skip encoder-decoder."""

    scales: int = 7
    channels_down: int = 128
    channels_up: int = 128
    channels_skip: int = 4


@dataclass
class LossConfig:
    lambda_composition: float = 1.0
    lambda_screen: float = 1.0
    lambda_structure: float = 2.0
    lambda_sparsity: float = 6.0
    lambda_alpha_l1: float = 0.01
    lambda_alpha_l0: float = 0.01
    lambda_bootstrap: float = 10.0
    bootstrap_steps: int = 0  # relevancy bootstrap over the first N steps; 0: off (the original's default)
    bootstrap_schedule: str = "linear"  # linear (annealed to 0) | none (constant weight)
    text_criterion: str = "spherical"  # spherical | cosine
    relevancy_num_layers: int = 10  # relevancy uses the attention of the blocks after this one


@dataclass
class OptimConfig:
    """MADGRAD with an exponential learning-rate schedule."""

    steps: int = 1000
    lr: float = 2.5e-3
    momentum: float = 0.9
    weight_decay: float = 0.01
    gamma: float = 0.99
    min_lr: float = 1e-5


@dataclass
class VideoConfig:
    """Video edits through a layered neural atlas (DESIGN §2)."""

    atlas: str | None = None  # NLA checkpoint, or an atlas saved by `t2l-fast atlas`
    layer: str = "background"  # background | foreground
    frames: int | None = None  # use the first N frames (default: all)
    trained_frames: int | None = None  # frames the NLA atlas was trained on (default: the video's)
    width: int = 768  # frame size of NLA checkpoints (own atlases carry theirs)
    height: int = 432
    grid: int = 2000  # atlas texels per unit of atlas coordinate (NLA checkpoints)
    frame_distance: int = 2  # the step's frames are t - d, t, t + d
    mask_threshold: float = 0.95  # foreground crops: box of alpha >= this ...
    mask_border: int = 30  # ... grown by this many pixels
    atlas_downscale: int = 3  # the whole background atlas is fed at 1/N resolution
    # the generator sees the step's atlas crop (and the render's atlas) at 1/N resolution: 1 as the
    # original; 2 on a CPU does ~1/4 of the work (an atlas holds ~2 texels per frame pixel)
    crop_downscale: int = 1
    write_frames: bool = False  # also write the edited frames as PNG


@dataclass
class RuntimeConfig:
    """How a run executes (not what it computes): see README, "Fast path"."""

    mode: str = "auto"  # auto (fast on CUDA, reference on CPU) | fast | reference
    precision: str = "auto"  # auto (bf16 in fast mode on CUDA, else fp32) | fp32 | bf16 | fp16
    compile: str = "auto"  # auto (on in fast mode on CUDA) | on | off
    compile_backend: str = "inductor"  # torch.compile backend ("eager" / "aot_eager" to debug)
    cudagraphs: bool = False  # compile with mode="reduce-overhead" (fast mode on CUDA)
    prefetch: bool = False  # draw the next steps' random choices ahead on a thread (image edits)
    variants_per_run: int = 0  # variants trained together at most (0: what memory holds; CPU: 2)
    stack_variants: str = "auto"  # variants' generators as one grouped network: auto (on CUDA) | on | off
    attention: str = "sdpa"  # sdpa | xformers (optional extra; falls back to sdpa when unusable)
    bucket: int = 64  # fast mode: training-example sides rounded to a multiple of this (fixed shapes)
    log_every: int = 10  # read the loss records / NaN-guard flags back to the host every N steps

    @property
    def read_every(self) -> int:
        """``log_every``, at least 1: the steps between two read-backs."""
        return max(1, int(self.log_every))


@dataclass
class Config:
    # Each prompt may be a list of prompts (the reference's video configs): all their template
    # embeddings are used.
    prompt: str | list[str] = ""  # T: describes the whole edited image (comp_text)
    screen_prompt: str | list[str] | None = None  # T_screen: the edit layer alone; defaults to prompt
    roi_prompt: str | list[str] | None = None  # T_ROI: the region of interest in the source (src_text)
    bootstrap_prompt: str | None = None  # relevancy text; defaults to the (first) ROI prompt
    seed: int = 0  # the generator's initialisation (and the draws' unless draw_seed is set); -1: random
    draw_seed: int | None = None  # the augmentation draws (crops, views); None: seed
    clip: str = "ViT-B-32"  # open_clip model name, or "test-tiny"
    clip_weights: str | None = None  # local weights file; None: OpenAI weights from the HF hub
    preview_every: int = 0  # write a preview image every N steps (0: never)
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    # -- derived values -------------------------------------------------------------------------
    @property
    def effective_screen_prompt(self) -> str | list[str]:
        return self.screen_prompt or self.prompt

    @property
    def effective_bootstrap_prompt(self) -> str | None:
        if self.bootstrap_prompt:
            return self.bootstrap_prompt
        roi = self.roi_prompt
        if isinstance(roi, list):
            return roi[0] if roi else None
        return roi or None

    @property
    def effective_bootstrap_steps(self) -> int:
        """Steps over which the relevancy bootstrap is annealed (0 when it is off)."""
        if self.effective_bootstrap_prompt is None or self.loss.lambda_bootstrap <= 0:
            return 0
        return max(0, self.loss.bootstrap_steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def validate(self) -> Config:
        """Raise InputError for values no run can use. Returns self."""

        def blank(value: str | list[str]) -> bool:
            items = value if isinstance(value, list) else [value]
            return not items or any(not isinstance(v, str) or not v.strip() for v in items)

        if blank(self.prompt):
            raise InputError(
                "the prompt is empty: enter a prompt, e.g. --prompt 'a golden cat' "
                "(or comp_text in the config)"
            )
        for name in ("screen_prompt", "roi_prompt", "bootstrap_prompt"):
            value = getattr(self, name)
            if value is not None and blank(value):
                raise InputError(f"{name} is empty: give it some text or leave it out")
        if self.loss.bootstrap_steps > 0 and self.effective_bootstrap_prompt is None:
            raise InputError(
                "the relevancy bootstrap needs the ROI prompt (the region to edit): pass --roi-prompt 'cat' "
                "(or bootstrap_prompt)"
            )
        if self.optim.steps <= 0:
            raise InputError(
                f"steps must be > 0 (got {self.optim.steps}): the number of steps must be a whole number, "
                "e.g. --steps 1000"
            )
        if self.video.frames is not None and self.video.frames <= 0:
            raise InputError(f"frames must be > 0 (got {self.video.frames})")
        if self.preview_every < 0:
            raise InputError(f"preview_every must be >= 0 (got {self.preview_every}; 0: no previews)")
        if self.views.n_aug < 1:
            raise InputError(f"views.n_aug must be >= 1 (got {self.views.n_aug})")
        if self.data.size < 0:
            raise InputError(f"data.size must be >= 0 (got {self.data.size})")
        for key in CHOICES:
            section, name = key.split(".")
            _check_choice(key, getattr(getattr(self, section), name))
        if not 0 < self.data.crop_min_cover <= 1 or not 0 < self.views.min_cover <= 1:
            raise InputError("crop_min_cover and views.min_cover must be in (0, 1]")
        if self.runtime.bucket < 1:
            raise InputError(f"runtime.bucket must be >= 1 (got {self.runtime.bucket})")
        if self.video.crop_downscale < 1:
            raise InputError(f"video.crop_downscale must be >= 1 (got {self.video.crop_downscale})")
        if not 0 < self.data.scale_min <= self.data.scale_max:
            raise InputError("data.scale_min must be > 0 and <= data.scale_max")
        return self


@dataclass
class FitConfig:
    """Settings of the atlas fit (:func:`t2l_fast.fit.fit_atlas`, ``t2l-fast atlas``). Fields marked
    (shape) change the model and must match on resume."""

    iterations: int = 2000
    batch: int | None = None  # pixels per step; None: 65536 on CUDA, 8192 on the CPU
    seed: int = 0
    # learning rates (Adam) and their decay
    lr_texture: float = 0.03
    lr_alpha: float = 0.1
    lr_residual: float = 1e-3
    lr_affine: float = 3e-4
    lr_final: float = 0.1  # the learning rates decay exponentially to this fraction
    # loss weights (NLA's / 5000)
    w_rgb: float = 1.0
    w_gradient: float = 0.2
    w_flow: float = 1e-3
    w_alpha_flow: float = 0.01
    w_rigidity: float = 2e-4
    w_sparsity: float = 0.2
    w_bootstrap: float = 0.4
    bootstrap_until: float = 0.15  # fraction of the iterations with the mask bootstrap
    foreground_samples: float = 0.25  # fraction of each batch drawn from around the masks
    # model (shape)
    residual_cells: tuple[float, ...] = (64.0, 16.0)
    alpha_cells: tuple[float, ...] = (16.0, 4.0, 1.0)
    texture_levels: int = 3
    max_scale: float = 0.8  # NLA's uv_mapping_scale: frame width -> 0.8 of the atlas side at most
    # flow and output
    flow_preset: str = "medium"
    grid: int | None = None  # atlas resolution R; None: 2000 · max(W, H) / 768
    save_every: int = 250  # checkpoint period (iterations) when resume_dir is given
    compile: str = "auto"  # "auto" (CUDA only), "on", "off": RuntimeConfig.compile, for the fit's step
    log_every: int = 25  # progress-bar refresh period

    def __post_init__(self) -> None:
        self.residual_cells = tuple(float(c) for c in self.residual_cells)
        self.alpha_cells = tuple(float(c) for c in self.alpha_cells)

    def validate(self) -> FitConfig:
        """Raise InputError for values no fit can use. Returns self."""
        if self.iterations < 0:
            raise InputError(f"iterations must be >= 0, got {self.iterations}")
        if self.batch is not None and self.batch < 16:
            raise InputError(f"batch must be >= 16, got {self.batch}")
        if self.compile not in CHOICES["runtime.compile"]:
            raise InputError(f"compile must be auto, on or off, got {self.compile!r}")
        return self

    def shape_key(self) -> dict:
        """The settings a checkpoint must agree on to be resumed."""
        return {
            "residual_cells": list(self.residual_cells),
            "alpha_cells": list(self.alpha_cells),
            "texture_levels": self.texture_levels,
            "max_scale": self.max_scale,
            "seed": self.seed,
            "flow_preset": self.flow_preset,
        }


# The allowed values of the string settings that are choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "loss.text_criterion": ("spherical", "cosine"),
    "loss.bootstrap_schedule": ("linear", "none"),
    "video.layer": ("background", "foreground"),
    "runtime.mode": ("auto", "fast", "reference"),
    "runtime.precision": ("auto", "fp32", "bf16", "fp16"),
    "runtime.compile": ("auto", "on", "off"),
    "runtime.attention": ("sdpa", "xformers"),
}


def _check_choice(key: str, value: Any, given: str | None = None) -> None:
    if key in CHOICES and value not in CHOICES[key]:
        name = key if given in (None, key) else f"{given} ({key})"
        raise InputError(f"config key {name} must be one of {', '.join(CHOICES[key])} (got {value!r})")


def preset(name: str = "image") -> Config:
    """The defaults of the paper for ``image`` or ``video`` edits (DESIGN §1)."""
    if name == "image":
        return Config()
    if name == "video":
        cfg = Config()
        cfg.views.n_aug = 6
        cfg.loss.lambda_structure = 3.0
        cfg.loss.lambda_sparsity = 0.1
        cfg.loss.lambda_alpha_l0 = 0.005
        cfg.loss.lambda_alpha_l1 = 0.01
        cfg.optim.steps = 3000
        cfg.optim.gamma = 0.999
        cfg.data.crop_min_cover = 0.95
        cfg.views.fill = 0.0
        cfg.loss.bootstrap_schedule = "none"  # the original's video config (a constant weight)
        return cfg
    raise InputError(f"unknown preset {name!r}: use 'image' or 'video'")


# The reference implementation's flat keys. A dotted path maps the value; a tuple
# (None, allowed) accepts the key only with a value this implementation reproduces; None ignores it.
_Fixed = tuple
REFERENCE_KEYS: dict[str, str | _Fixed | None] = {
    "comp_text": "prompt",
    "screen_text": "screen_prompt",
    "src_text": "roi_prompt",
    "bootstrap_text": "bootstrap_prompt",
    "seed": "seed",
    "log_images_freq": "preview_every",
    "resize_input": "data.size",
    "source_image_every": "data.source_every",
    "crops_min_cover": "data.crop_min_cover",
    "flip_p": "data.flip_p",
    "jitter_p": "data.jitter_p",
    "scale_min": "data.scale_min",
    "scale_max": "data.scale_max",
    "text_criterion": "loss.text_criterion",
    "bootstrap_epoch": "loss.bootstrap_steps",
    "lambda_bootstrap": "loss.lambda_bootstrap",
    "lambda_structure": "loss.lambda_structure",
    "lambda_screen": "loss.lambda_screen",
    "lambda_sparsity": "loss.lambda_sparsity",
    "lambda_alpha_l0": "loss.lambda_alpha_l0",
    "lambda_alpha_l1": "loss.lambda_alpha_l1",
    "lambda_composition": "loss.lambda_composition",
    "relevancy_num_layers": "loss.relevancy_num_layers",
    "n_aug": "views.n_aug",
    "clip_affine_transform_fill": "views.fill",
    "n_epochs": "optim.steps",
    "lr": "optim.lr",
    "gamma": "optim.gamma",
    "min_lr": "optim.min_lr",
    "skip_n33d": "generator.channels_down",
    "skip_n33u": "generator.channels_up",
    "skip_n11": "generator.channels_skip",
    "num_scales": "generator.scales",
    # accepted only with the values this implementation reproduces
    "bootstrap_scheduler": "loss.bootstrap_schedule",
    "lambda_bootstrap_min": (None, (0, 0.0)),
    "bootstrapping_min_cover": (None, (1, 1.0)),
    "use_negative_bootstrap": (None, (False,)),
    "scheduler_policy": (None, ("exponential",)),
    "optimizer": (None, ("madgrad",)),
    "clip_model_name": (None, ("ViT-B/32",)),
    "d_divisible_crops": (None, (1,)),
    "align_corners": (None, (False,)),
    "lambda_clip": (None, (1, 1.0)),
    "input_entire_atlas": (None, (True,)),
    "multiply_foreground_alpha": (None, (True,)),
    "bootstrap_negative_text": (None, ([], "", None)),
    # video (the reference's video configs)
    "checkpoint_path": "video.atlas",
    "maximum_number_of_frames": "video.frames",
    "resx": "video.width",
    "resy": "video.height",
    "grid_atlas_resolution": "video.grid",
    "center_frame_distance": "video.frame_distance",
    "masks_border_expansion": "video.mask_border",
    "mask_alpha_threshold": "video.mask_threshold",
    "entire_atlas_every": "data.source_every",
    "finetune_background": "video.layer",
    "finetune_foreground": "video.layer",
    # logging / paths of the reference: not used here (input, device and output come from the CLI)
    "use_wandb": None,
    "wandb_project": None,
    "wandb_entity": None,
    "device": None,
    "results_folder": None,
    "image_path": None,
    "example_config": None,
    "save_model_starting_epoch": None,
    "return_atlas_alpha": None,
    "bootstrap_negative_map_threshold": None,
}


def _field_types(obj: Any) -> dict[str, Any]:
    """The fields of a settings dataclass and their types (resolved from the annotations)."""
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert ``value`` (from YAML, or a string from the CLI) to the field's type ``hint``: str, bool,
    int, float, ``str | list[str]`` (a prompt or a list of prompts), ``tuple[float, ...]``, each
    optionally ``| None``."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    kind = kinds[0]
    if list[str] in kinds:  # a prompt, or a list of prompts
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        kind = str
    if isinstance(value, str) and kind is not str:
        value = None if value.strip().lower() in ("", "none", "null", "~") else yaml.safe_load(value)
    if value is None:
        if optional:
            return None
        raise InputError(f"config key {key!r} needs a value")
    if kind is str:
        return str(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"config key {key!r} expects true/false, got {value!r}")
        return value
    if kind in (int, float):
        return _number(value, kind, key)
    if typing.get_origin(kind) is tuple:  # tuple[float, ...]
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(_number(v, typing.get_args(kind)[0], key) for v in items)
    return value


def _number(value: Any, kind: type, key: str) -> int | float:
    if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"config key {key!r} expects a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise InputError(f"config key {key!r} expects an integer, got {value!r}")
    return int(value) if kind is int else float(value)


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set a dotted key (``loss.lambda_structure``) or a reference flat key; unknown keys raise."""
    given = key
    if key in REFERENCE_KEYS:
        target = REFERENCE_KEYS[key]
        if target is None:
            return
        if isinstance(target, tuple):
            allowed = target[1]
            parsed = yaml.safe_load(value) if isinstance(value, str) else value
            if parsed not in allowed:
                raise InputError(f"config key {key!r}={parsed!r} is not supported (only {allowed[0]!r})")
            return
        if key == "bootstrap_epoch" and _coerce(value, int, key) <= 0:
            value = 0
        if key in ("finetune_background", "finetune_foreground"):
            if not _coerce(value, bool, key):
                return
            value = key.removeprefix("finetune_")
        if key in ("bootstrap_text", "screen_text", "src_text") and value in ("", []):
            value = None  # the reference writes "" for an optional prompt it does not use
        key = target
    parts = key.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        fields = _field_types(obj)
        if part not in fields:
            raise InputError(f"unknown config key {key!r}: see `t2l-fast edit --help` or a saved config.yaml")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise InputError(f"config key {key!r} is a section: set one of its keys, e.g. {key}.<name>")
            value = _coerce(value, fields[part], key)
            _check_choice(".".join(parts[-2:]), value, given)
            setattr(obj, part, value)
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise InputError(f"unknown config key {key!r}")


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A nested mapping -> (dotted key, value) pairs of its leaves."""
    items = []
    for k, v in data.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            items += flatten(v, path + ".")
        else:
            items.append((path, v))
    return items


def apply_dict(cfg: Config, data: dict[str, Any]) -> Config:
    for key, value in flatten(data):
        set_value(cfg, key, value)
    return cfg


def load_yaml(path: str | Path, base: Config | None = None) -> Config:
    """Read a config file (own nested format or the reference's flat keys) over ``base``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise InputError(f"config file {path} is not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise InputError(f"config file {path} must hold a mapping of keys to values")
    return apply_dict(base or preset("image"), data)


def parse_overrides(cfg, overrides: list[str]):
    """Apply ``key=value`` strings (``--set loss.lambda_structure=3``) to ``cfg`` (a :class:`Config`,
    or another settings dataclass such as the atlas fit's) and return it."""
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        set_value(cfg, key.strip(), value)
    return cfg
