"""One path from a request to a run: the inputs, prompts, options and overrides of any front-end
(``t2l-fast edit`` / ``atlas``, a batch manifest's job, the web page) become a validated
:class:`~t2l_fast.config.Config` or :class:`~t2l_fast.config.FitConfig` here, before any model loads.

Every rule a request must meet lives here or in the configs' own ``validate`` (values no run can use);
the front-ends only translate their inputs into these arguments and format the :class:`InputError`
(a line of the manifest in front, an error notice on the page). An error names an option as the
front-end does, through ``name``: ``--steps`` on the command line (:func:`flag`, the default), ``steps``
in a manifest (:func:`key`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from .config import Config, FitConfig, load_yaml, parse_overrides, preset, set_value
from .io import InputError
from .video_io import FRAME_EXTENSIONS, VIDEO_EXTENSIONS, list_frame_files, parse_size

#: How a front-end names an option in its errors: ``"steps"`` -> ``"--steps"`` (CLI) or ``"steps"``.
Name = Callable[[str], str]


def flag(option: str) -> str:
    """An option as the command line names it: ``preview_every`` -> ``--preview-every``."""
    return "--" + option.replace("_", "-")


def key(option: str) -> str:
    """An option as a manifest names it: itself."""
    return option


# The options of an edit that apply to one kind of input only.
IMAGE_ONLY = ("size", "preview_every")
VIDEO_ONLY = ("atlas", "layer", "frames", "write_frames")

# Options whose config key is not their own name; every other option is the top-level key it names.
FLAG_KEYS = {
    "steps": "optim.steps",
    "size": "data.size",
    "atlas": "video.atlas",
    "layer": "video.layer",
    "frames": "video.frames",
    "write_frames": "video.write_frames",
}

# --quick: the smallest settings that still run every part of a command, so that each quickstart
# command finishes in about two minutes or less on a 2-core CPU (it checks the installation; the
# result is not a useful edit). Applied over the preset, under --config, --set and the flags.
QUICK_EDIT = {
    "image": ["optim.steps=2", "data.size=160", "views.n_aug=1"]
    + ["generator.channels_down=32", "generator.channels_up=32"],
    "video": ["optim.steps=1", "views.n_aug=1", "video.frames=8"]
    + ["generator.channels_down=32", "generator.channels_up=32"],
}
QUICK_ATLAS: dict[str, Any] = {"frames": 8, "size": "192x108"}  # the atlas flags' values when not given
QUICK_FIT = ["iterations=50", "grid=256"]  # under --set (grid: a smaller atlas, smaller edit crops)
DEFAULT_FIT_SIZE = "768x432"


# ---------------------------------------------------------------------------------------------------
# The input
# ---------------------------------------------------------------------------------------------------
def is_video_input(path: Path, atlas: Any = None) -> bool:
    """A folder of frames or a video file (by extension) is a video; anything else an image. A path
    that is not a file, given with an atlas, is a video too (a missing folder of frames looks like an
    image file by its name)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() in VIDEO_EXTENSIONS:
        return True
    return atlas is not None and not path.is_file()


def check_input(path: Path) -> bool:
    """The input's own problems first (before any option is judged against it); -> is it a video."""
    path = Path(path)
    if not path.exists():
        kind = "video" if path.suffix.lower() in VIDEO_EXTENSIONS else "image"
        raise InputError(f"{kind} not found: {path}")
    if path.is_dir() and not list_frame_files(path):
        raise InputError(
            f"{path} is a folder without frame images ({', '.join(FRAME_EXTENSIONS)}): give an image, "
            "a video file or a folder of frames"
        )
    return is_video_input(path)


def misplaced_options(video: bool, options: Mapping[str, Any]) -> list[str]:
    """The given options (not None or False) that do not apply to this kind of input."""
    other = VIDEO_ONLY if not video else IMAGE_ONLY
    return [k for k in other if options.get(k) is not None and options.get(k) is not False]


def check_kind_options(video: bool, path: Path | None, options: Mapping[str, Any], name: Name = flag) -> None:
    """Image-only options on a video, or video-only options on an image, are an error."""
    given = misplaced_options(video, options)
    if given:
        kind = "images" if video else "videos"
        where = f" ({path})" if path is not None else ""
        raise OptionError(f"{', '.join(map(name, given))} apply to {kind} only{where}", given[0])


class OptionError(InputError):
    """An :class:`InputError` caused by one option (``option``): a manifest points at its line."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


# ---------------------------------------------------------------------------------------------------
# An edit
# ---------------------------------------------------------------------------------------------------
def build_config(
    config: Path | str | None, overrides: Iterable[str], base: Config | None = None, **options: Any
) -> Config:
    """Preset, then the YAML file, then ``--set key=value``, then the explicit options (None or False:
    not given), each applied as its config key through the same ``set_value`` as ``--set``.
    ``bootstrap=True`` applies the relevancy bootstrap over all the run's steps. Not validated."""
    cfg = base or preset("image")
    cfg = load_yaml(config, cfg) if config is not None else cfg
    parse_overrides(cfg, list(overrides))
    bootstrap = options.pop("bootstrap", False)
    for option, value in options.items():
        if value is not None and value is not False:
            set_value(cfg, FLAG_KEYS.get(option, option), str(value) if isinstance(value, Path) else value)
    if bootstrap:
        cfg.loss.bootstrap_steps = cfg.optim.steps
    return cfg


def edit_base(
    video: bool, config: Path | str | None = None, overrides: Iterable[str] = (), quick: bool = False
) -> Config:
    """The config an edit's options apply over: the image or video preset, the ``--quick`` settings,
    the YAML file, then the overrides."""
    base = preset("video" if video else "image")
    if quick:
        parse_overrides(base, QUICK_EDIT["video" if video else "image"])
    return build_config(config, overrides, base)


def edit_config(
    source: Path | None,
    video: bool,
    base: Config | None = None,
    *,
    config: Path | str | None = None,
    overrides: Iterable[str] = (),
    quick: bool = False,
    name: Name = flag,
    run: str = "edit",
    require_atlas: bool = True,
    **options: Any,
) -> Config:
    """The validated config of an edit of ``source`` (an image, or a video when ``video``): the
    options (``prompt``, ``steps``, ``atlas``, ...; None or False: not given) over ``base`` (copied),
    or over :func:`edit_base` of ``config``, ``overrides`` and ``quick``. Raises :class:`InputError`
    for every rule an edit request must meet; ``run`` names the request in them ("edit", "job").
    ``require_atlas=False``: a video's atlas is given later (the page asks for it when the edit starts)."""
    check_kind_options(video, source, options, name)
    if base is None:
        base = edit_base(video, config, overrides, quick)
    cfg = build_config(None, [], copy.deepcopy(base), **options)
    check_text(cfg, name)
    cfg.validate()
    if video and require_atlas and cfg.video.atlas is None:
        raise OptionError(
            f"a video {run} needs an atlas: give {name('atlas')} (a folder made by `t2l-fast atlas`, "
            "or an NLA checkpoint)",
            "atlas",
        )
    check_clip_weights(cfg.clip_weights, name)
    return cfg


def check_clip_weights(path: Path | str | None, name: Name = flag) -> None:
    """Local CLIP weights, when given, must be a file (checked before any model loads)."""
    if path is not None and not Path(path).is_file():
        raise InputError(f"{name('clip_weights')} file not found: {path}")


def check_text(cfg: Config, name: Name = flag) -> None:
    """Prompts must be text: bytes that are not UTF-8 (kept by Python as surrogate escapes from the
    command line) would reach CLIP as garbage."""
    for option in ("prompt", "screen_prompt", "roi_prompt", "bootstrap_prompt"):
        value = getattr(cfg, option, None)
        shown = name(option) if option != "bootstrap_prompt" else "--set bootstrap_prompt"
        check_utf8([value] if isinstance(value, str) else list(value or []), shown)


def check_utf8(texts: Iterable[str | None], shown: str) -> None:
    """Each text must be UTF-8 (``shown``: the option, as the error names it)."""
    for text in texts:
        try:
            (text or "").encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InputError(
                f"{shown} holds bytes that are not UTF-8 text (at character {exc.start + 1}): "
                "write the prompt in UTF-8"
            ) from None


def whole_number(value: float | None, option: str) -> int | None:
    """A number field (a float on the page) -> int; None stays None."""
    if value is None:
        return None
    if value != int(value):
        raise InputError(f"{option} must be a whole number (got {value:g})")
    return int(value)


# ---------------------------------------------------------------------------------------------------
# An atlas fit
# ---------------------------------------------------------------------------------------------------
def fit_config(overrides: Iterable[str] = (), *, quick: bool = False, name: Name = flag, **options: Any):
    """The fit's validated settings: defaults, the ``--quick`` settings, ``--set key=value`` (through
    the editor's ``set_value``), then the explicit options (None: not given). A fit of zero
    iterations is refused (the library accepts it: the atlas of the initialisation)."""
    overrides = [*QUICK_FIT, *overrides] if quick else list(overrides)
    cfg = parse_overrides(FitConfig(), overrides)
    for option, value in options.items():
        if value is not None:
            set_value(cfg, option, value)
    cfg.validate()
    if cfg.iterations < 1:
        raise OptionError(f"{name('iterations')} must be > 0 (got {cfg.iterations})", "iterations")
    return cfg


def fit_frames(
    frames: int | None, size: str | None, quick: bool = False, name: Name = flag
) -> tuple[int | None, tuple[int, int]]:
    """The fit's frame count (None: all) and frame size (W, H) from the options (None: not given)."""
    if quick:
        frames = QUICK_ATLAS["frames"] if frames is None else frames
        size = size or str(QUICK_ATLAS["size"])
    if frames is not None and frames < 3:
        raise OptionError(f"{name('frames')} must be at least 3 (got {frames})", "frames")
    return frames, parse_size(size or DEFAULT_FIT_SIZE, name("size"))


def parse_box(text: str) -> tuple[float, float, float, float]:
    """``X,Y,W,H`` -> four numbers (pixels of the video as given); InputError when malformed."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(v == v and abs(v) != float("inf") for v in values):
        raise InputError(
            f"--object {text!r} is not X,Y,W,H: four numbers, the box's left, top, width and height "
            "in pixels of the first frame (e.g. --object 620,180,110,100)"
        )
    return values


#: How the object of an atlas fit is marked: masks (or none: background only), found from its
#: motion, or segmented in a box on the first frame.
OBJECT_MODES = ("masks", "auto", "box")


def check_object(mode: str, masks: bool, names: Mapping[str, str]) -> None:
    """One way to mark the object: ``mode`` one of :data:`OBJECT_MODES`, ``masks`` whether masks are
    given; ``names`` how the front-end calls the masks, ``auto`` and ``box``."""
    if mode not in OBJECT_MODES:
        raise InputError(f"unknown way to mark the object {mode!r}: one of {', '.join(OBJECT_MODES)}")
    if mode != "masks" and masks:
        raise InputError(
            f"{names[mode]} and {names['masks']} are alternatives: mark the object one way "
            f"({names['box']}, {names['masks']} or {names['auto']})"
        )


def edit_variants(
    cfg: Config,
    video: bool,
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    screen_prompts: list[str] | None = None,
    roi_prompts: list[str] | None = None,
    name: Name = flag,
):
    """The variants an edit request asks for (several prompts or seeds: every prompt with every
    seed), or None for one edit; an image's or a video's (``video``: the variants share its frames
    and atlas). ``cfg`` (from :func:`edit_config` with the first of each) gives the prompt and seed
    not given. Checked before any model loads
    (:func:`~t2l_fast.pipeline.variants.make_variants`: no empty or repeated prompt or seed; screen
    and ROI prompts once or once per prompt)."""
    from .pipeline.variants import make_variants

    prompts, seeds = list(prompts or []), list(seeds or [])
    if max(len(prompts), len(seeds), len(screen_prompts or []), len(roi_prompts or [])) <= 1:
        return None
    for option, texts in (
        ("prompt", prompts),
        ("screen_prompt", screen_prompts),
        ("roi_prompt", roi_prompts),
    ):
        check_utf8(texts or [], name(option))
    if not prompts:
        if not isinstance(cfg.prompt, str):
            raise InputError(f"seed variants need one prompt: give {name('prompt')}")
        prompts = [cfg.prompt]
    return make_variants(prompts, seeds or [cfg.seed], screen_prompts or None, roi_prompts or None)
