"""The web page of ``t2l-fast serve`` (Gradio, the ``[ui]`` extra): an image tab and a video tab over
the handlers of :mod:`t2l_fast.serve`.

Every run (image edit, atlas fit, video edit) shares one queue of concurrency 1 (``RUN_QUEUE``): one
run at a time on the device, the others wait with their position shown. Input checks, uploads and the
cancel button run outside that queue, so they answer at once.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: the server may be offline

import gradio as gr  # noqa: E402

from ..io import InputError  # noqa: E402
from .app import ADVANCED_KEYS, App, advanced_defaults  # noqa: E402
from .inputs import TEST_MODEL_NOTE, samples  # noqa: E402

RUN_QUEUE = "device"  # concurrency id of every run
INTRO = (
    "# t2l-fast\n"
    "Text-driven layered editing (Text2LIVE): a small generator is trained on your image or video "
    "against CLIP and returns an **edit layer** (colour + opacity) composited over the original."
)


def _error(exc: InputError) -> gr.Error:
    return gr.Error(str(exc), duration=None, print_exception=False)


def _failed(exc: InputError, names: list[str]) -> tuple:
    """A run's bad input or failure, as its last update: one line in the status (and a notice), the
    other outputs as they are. Raising would mark every output of the run with an error badge."""
    gr.Warning(str(exc))
    return tuple(f"error: {exc}" if name == "status" else gr.skip() for name in names)


def _outputs(updates, names: list[str]):
    """Handler updates (dicts by name) -> tuples in the order of the event's outputs."""
    for update in updates:
        yield tuple(update.get(name, gr.skip()) for name in names)


def _session(request: gr.Request | None) -> str:
    return (request.session_hash if request is not None else None) or "default"


def build_page(app: App) -> gr.Blocks:
    """The page's Blocks (not launched)."""
    sample_paths = samples()
    with gr.Blocks(title="t2l-fast", analytics_enabled=False) as page:
        gr.Markdown(INTRO + (f"\n\n**Note:** {TEST_MODEL_NOTE}" if app.is_test_model else ""))
        with gr.Tab("Image"):
            _image_tab(app, sample_paths)
        with gr.Tab("Video"):
            _video_tab(app)
    page.queue(default_concurrency_limit=1)
    return page


# ---------------------------------------------------------------------------------------------------
def _image_tab(app: App, sample_paths: dict) -> None:
    defaults = advanced_defaults("image")
    source_path = gr.State(None)
    with gr.Row():
        with gr.Column(scale=1):
            upload = gr.File(label="Image (PNG, JPEG, WebP)", elem_id="image-upload", height=110)
            sample = gr.Dropdown(
                choices=list(sample_paths), value=None, label="... or a bundled sample", elem_id="sample"
            )
            source_view = gr.Image(label="Source", interactive=False, height=220, elem_id="source")
            prompt = gr.Textbox(
                label="Prompt: the edited image", placeholder="a golden cat", elem_id="prompt"
            )
            screen = gr.Textbox(
                label="Screen prompt: the edit layer alone (default: the prompt)",
                placeholder="golden fur",
                elem_id="screen-prompt",
            )
            roi = gr.Textbox(
                label="ROI prompt: the region to edit in the source (enables the directional loss)",
                placeholder="cat",
                elem_id="roi-prompt",
            )
            with gr.Row():
                steps = gr.Number(value=1000, precision=0, minimum=1, label="Steps", elem_id="steps")
                seed = gr.Number(value=0, precision=0, label="Seed (-1: random)", elem_id="seed")
                preview_every = gr.Number(
                    value=10, precision=0, minimum=0, label="Preview every N steps", elem_id="preview-every"
                )
            bootstrap = gr.Checkbox(
                value=False, label="Relevancy bootstrap: pull the edit towards the ROI (needs the ROI prompt)"
            )
            with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                advanced = [
                    gr.Number(value=defaults[key], label=f"{label} ({key})", elem_id=key.replace(".", "-"))
                    for key, label in ADVANCED_KEYS.items()
                ]
                more = gr.Textbox(
                    label="More settings, one key=value a line (any config key)",
                    placeholder="loss.lambda_screen=2\ngenerator.channels_down=64",
                    lines=3,
                    elem_id="more",
                )
            with gr.Row():
                run = gr.Button("Edit", variant="primary", elem_id="run")
                cancel = gr.Button("Cancel (keep the current result)", variant="stop", elem_id="cancel")
            with gr.Accordion(
                "Variants: several prompts or seeds, trained together", open=False, elem_id="variants"
            ):
                variant_prompts = gr.Textbox(
                    label="One prompt a line (not the Prompt field; screen and ROI prompts apply to all)",
                    placeholder="a golden cat\nan ice cat\na wooden cat",
                    lines=3,
                    elem_id="variant-prompts",
                )
                variant_seeds = gr.Number(
                    value=1,
                    precision=0,
                    minimum=1,
                    label="Seeds per prompt (from the Seed field)",
                    elem_id="variant-seeds",
                )
                run_variants = gr.Button("Edit variants", variant="primary", elem_id="run-variants")
        with gr.Column(scale=1):
            status = gr.Markdown(
                "Upload an image or pick a sample, write a prompt, press Edit.", elem_id="status"
            )
            with gr.Row():
                preview = gr.Image(label="Live preview: composite", interactive=False, height=220)
                preview_edit = gr.Image(label="Live preview: edit layer", interactive=False, height=220)
            losses = gr.LinePlot(
                x="step", y="value", color="term", label="Losses (every runtime.log_every steps)"
            )
    gr.Markdown("### Result")
    with gr.Row():
        composite = gr.Image(label="Composite", interactive=False, format="png", elem_id="composite")
        edit_layer = gr.Image(
            label="Edit layer (RGBA on a checkerboard)", interactive=False, format="png", elem_id="edit-layer"
        )
        alpha = gr.Image(label="Alpha", interactive=False, format="png", image_mode="L", elem_id="alpha")
        greenscreen = gr.Image(label="Green screen", interactive=False, format="png", elem_id="greenscreen")
    download = gr.File(
        label="Download: the output folder (zip with config.yaml and generator.safetensors)",
        interactive=False,
        elem_id="download",
    )
    gr.Markdown("### Variants")
    gallery = gr.Gallery(
        label="Variants: live previews, then each composite (the sheet first)",
        columns=4,
        height=320,
        interactive=False,
        elem_id="variants-gallery",
    )
    variants_download = gr.File(
        label="Download: every variant's folder, variants.png and variants.json (zip)",
        interactive=False,
        elem_id="variants-download",
    )

    def load(path):
        try:
            return path, app.load_image(path)
        except InputError as exc:
            raise _error(exc) from None

    # a refused upload shows its message, without error badges on the source (show_progress hidden)
    upload.upload(load, upload, [source_path, source_view], concurrency_limit=None, show_progress="hidden")
    sample.input(
        lambda name: load(str(sample_paths[name])) if name else (gr.skip(), gr.skip()),
        sample,
        [source_path, source_view],
        concurrency_limit=None,
        show_progress="hidden",
    )

    def config(prompt, screen, roi, steps, seed, preview_every, more, bootstrap, *adv):
        advanced = dict(zip(ADVANCED_KEYS, adv, strict=True))
        return app.image_config(prompt, screen, roi, steps, seed, preview_every, advanced, more, bootstrap)

    fields = [prompt, screen, roi, steps, seed, preview_every, more, bootstrap, *advanced]

    def check(path, *values):
        try:
            app.load_image(path)
            config(*values)
        except InputError as exc:
            raise _error(exc) from None
        return "waiting for the device ..."

    names = ["status", "preview", "preview_edit", "losses", "composite", "edit_layer", "alpha", "greenscreen"]
    names.append("download")
    outputs = [status, preview, preview_edit, losses, composite, edit_layer, alpha, greenscreen, download]

    # gr.Request is injected into positional parameters only: before *values, never after
    def edit(request: gr.Request, path, *values):
        try:
            cfg = config(*values)
            yield from _outputs(app.edit_image(_session(request), path, cfg), names)
        except InputError as exc:
            yield _failed(exc, names)

    check_first = dict(concurrency_limit=None, show_progress="hidden")  # bad input: a notice, no badge
    run.click(check, [source_path, *fields], status, **check_first).success(
        edit, [source_path, *fields], outputs, concurrency_limit=1, concurrency_id=RUN_QUEUE
    )

    def variants_of(text, seeds, *values):
        """The config (the box's first prompt in the Prompt field's place) and the variants."""
        first = app.variant_prompts(text)[0]
        cfg = config(first, *values[1:])
        return cfg, app.variants(text, seeds, cfg)

    def check_variants(path, text, seeds, *values):
        try:
            app.load_image(path)
            variants_of(text, seeds, *values)
        except InputError as exc:
            raise _error(exc) from None
        return "waiting for the device ..."

    variant_names = ["status", "gallery", "download"]

    def edit_variants(request: gr.Request, path, text, seeds, *values):
        try:
            cfg, variants = variants_of(text, seeds, *values)
            yield from _outputs(app.edit_variants(_session(request), path, cfg, variants), variant_names)
        except InputError as exc:
            yield _failed(exc, variant_names)

    variant_fields = [source_path, variant_prompts, variant_seeds, *fields]
    run_variants.click(check_variants, variant_fields, status, **check_first).success(
        edit_variants,
        variant_fields,
        [status, gallery, variants_download],
        concurrency_limit=1,
        concurrency_id=RUN_QUEUE,
    )

    def stop(request: gr.Request = None):
        return app.cancel(_session(request))

    cancel.click(stop, None, status, concurrency_limit=None)


# ---------------------------------------------------------------------------------------------------
def _video_tab(app: App) -> None:
    atlas_path = gr.State(None)
    frames_used = gr.State(None)
    first_frame = gr.State(None)
    gr.Markdown(
        "**1.** Upload a video (or a zip of frames); for foreground edits mark the object: a zip of its "
        "masks (one PNG a frame, 255 = object), *find the object* from its motion, or a box around it "
        "on the first frame; and fit the atlas (found masks are shown before the fit starts). Or "
        "upload an atlas file made by `t2l-fast atlas`. **2.** Edit a layer of it."
    )
    with gr.Row():
        with gr.Column():
            video = gr.File(
                label="Video (mp4, mov, webm, mkv, avi) or a zip of frames",
                elem_id="video-upload",
                height=120,
            )
            find = gr.Radio(
                [
                    ("Masks zip (none: background only)", "masks"),
                    ("Find the object (from its motion)", "auto"),
                    ("A box on the first frame", "box"),
                ],
                value="masks",
                label="The object (for foreground edits)",
                elem_id="find",
            )
            masks = gr.File(
                label="Masks (zip of PNGs; optional, needed for foreground edits)",
                elem_id="masks",
                height=120,
            )
            with gr.Group(visible=False) as box_group:
                with gr.Row():
                    box = [
                        gr.Number(value=None, precision=0, minimum=0, label=f"Box {name}", elem_id=f"box-{k}")
                        for k, name in (("x", "X (left)"), ("y", "Y (top)"), ("w", "W"), ("h", "H"))
                    ]
                first = gr.Image(
                    label="First frame (pixels as given; the box in red)",
                    interactive=False,
                    elem_id="first-frame",
                    height=240,
                )
            with gr.Row():
                iterations = gr.Number(value=2000, precision=0, minimum=1, label="Fit iterations")
                size = gr.Textbox(value="768x432", label="Fit size (WxH)")
                frames = gr.Number(value=0, precision=0, minimum=0, label="First N frames (0: all)")
            fit = gr.Button("1. Fit the atlas", variant="primary", elem_id="fit")
            atlas_upload = gr.File(
                label="... or an existing atlas (atlas.safetensors)", elem_id="atlas-upload", height=120
            )
        with gr.Column():
            prompt = gr.Textbox(
                label="Prompt", placeholder="winter countryside scene", elem_id="video-prompt"
            )
            screen = gr.Textbox(label="Screen prompt (default: the prompt)", placeholder="snow")
            roi = gr.Textbox(label="ROI prompt", placeholder="countryside")
            layer = gr.Radio(["background", "foreground"], value="background", label="Layer to edit")
            with gr.Row():
                steps = gr.Number(value=3000, precision=0, minimum=1, label="Steps")
                seed = gr.Number(value=0, precision=0, label="Seed (-1: random)")
            more = gr.Textbox(label="More settings, one key=value a line", lines=2)
            with gr.Row():
                run = gr.Button("2. Edit the layer", variant="primary", elem_id="video-run")
                cancel = gr.Button("Cancel (keep the current result)", variant="stop")
    status = gr.Markdown("", elem_id="video-status")
    with gr.Row():
        masks_video = gr.Video(
            label="Object masks (before the fit)", interactive=False, elem_id="masks-video"
        )
        reconstruction = gr.Video(label="Atlas reconstruction", interactive=False)
        background_atlas = gr.Image(label="Background atlas", interactive=False)
        foreground_atlas = gr.Image(label="Foreground atlas", interactive=False)
    losses = gr.LinePlot(x="step", y="value", color="term", label="Losses")
    with gr.Row():
        edited = gr.Video(label="Edited video", interactive=False, elem_id="edited")
        greenscreen = gr.Video(label="Edit layer over green screen", interactive=False)
        atlas_edit = gr.Image(label="The edit on the atlas", interactive=False, format="png")
    download = gr.File(label="Download: the output folder (zip)", interactive=False)

    fit_names = ["status", "atlas", "frames", "masks_video", "reconstruction"]
    fit_names += ["background_atlas", "foreground_atlas"]
    fit_outputs = [status, atlas_path, frames_used, masks_video, reconstruction]
    fit_outputs += [background_atlas, foreground_atlas]

    def run_fit(request: gr.Request, video, masks, iterations, size, frames, how, *xywh):  # request first
        try:
            updates = app.fit_atlas(_session(request), video, masks, iterations, size, frames, how, xywh)
            yield from _outputs(updates, fit_names)
        except InputError as exc:  # one line in the status, as the edits' (no error badge on each output)
            yield _failed(exc, fit_names)

    # the box: four numbers beside the first frame, on which it is drawn as they change
    find.change(lambda how: gr.update(visible=how == "box"), find, box_group, concurrency_limit=None)

    def show_first(path):
        try:
            frame = app.first_frame(path)
        except InputError as exc:
            raise _error(exc) from None
        return frame, app.draw_box(frame)

    video.change(show_first, video, [first_frame, first], concurrency_limit=None)
    for field in box:
        field.change(app.draw_box, [first_frame, *box], first, concurrency_limit=None)

    fit.click(
        run_fit,
        [video, masks, iterations, size, frames, find, *box],
        fit_outputs,
        concurrency_limit=1,
        concurrency_id=RUN_QUEUE,
    )
    atlas_upload.upload(
        lambda path: (path, None), atlas_upload, [atlas_path, frames_used], concurrency_limit=None
    )

    fields = [prompt, screen, roi, layer, steps, seed, more]

    def check(*values):
        try:
            app.video_config(*values)
        except InputError as exc:
            raise _error(exc) from None
        return "waiting for the device ..."

    names = ["status", "losses", "edited", "greenscreen", "atlas_edit", "download"]

    def edit(request: gr.Request, video, atlas, frames, *values):  # request first: see above
        try:
            cfg = app.video_config(*values)
            yield from _outputs(app.edit_video(_session(request), video, atlas, cfg, frames), names)
        except InputError as exc:
            yield _failed(exc, names)

    run.click(check, fields, status, concurrency_limit=None, show_progress="hidden").success(
        edit,
        [video, atlas_path, frames_used, *fields],
        [status, losses, edited, greenscreen, atlas_edit, download],
        concurrency_limit=1,
        concurrency_id=RUN_QUEUE,
    )

    def stop(request: gr.Request = None):
        return app.cancel(_session(request))

    cancel.click(stop, None, status, concurrency_limit=None)
