"""The page's image tab: an uploaded image checked, a run's config from the fields, the edit with
its previews (:class:`ImageTab`, part of :class:`~t2l_fast.serve.App`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from PIL import Image

from ..config import Config
from ..losses import prompt_warnings
from ..pipeline.image import ImageEditor
from ..request import whole_number
from .inputs import check_image_file, checkerboard, loss_table, to_pil, zip_folder
from .state import AppState
from .worker import Progress, finished, step_reporter


class ImageTab(AppState):
    """The image tab's handlers."""

    def load_image(self, path: str | os.PathLike | None) -> Image.Image:
        """Check an uploaded image; returns it (RGB, EXIF-rotated) for the page's source view."""
        from ..io import read_image

        path = check_image_file(path, self.limits)
        image, _ = read_image(path)
        return to_pil(image)

    def image_config(
        self,
        prompt: str,
        screen_prompt: str = "",
        roi_prompt: str = "",
        steps: float | None = None,
        seed: float | None = None,
        preview_every: float | None = None,
        advanced: dict[str, float] | None = None,
        more: str = "",
        bootstrap: bool = False,
    ) -> Config:
        """The run's config from the page's fields (empty optional prompts are left out).
        ``bootstrap``: the relevancy bootstrap of the ROI prompt over all steps."""
        return self._config(
            "image",
            prompt,
            screen_prompt,
            roi_prompt,
            advanced,
            more,
            steps=whole_number(steps, "steps"),
            seed=None if seed is None else int(seed),
            preview_every=None if preview_every is None else int(preview_every),
            bootstrap=bootstrap,
        )

    def edit_image(
        self,
        session: str,
        image_path: str | os.PathLike | None,
        cfg: Config,
    ) -> Iterator[dict[str, object]]:
        """Train on the image and yield page updates: status and loss plot every step, the preview
        (composite and edit layer) every ``cfg.preview_every`` steps, then the outputs and the zip."""
        path = check_image_file(image_path, self.limits)
        editor = ImageEditor(cfg, device=self.device, clip=self.clip)
        run = editor.prepare(path)  # InputError (too small, ...) before the thread
        cfg, (h, w) = run.config, run.source.shape[-2:]
        notes = run.notes + prompt_warnings(self.clip, cfg)  # conversions, words CLIP does not read
        progress = Progress(cfg.optim.steps, f"editing {w}x{h}", notes)
        yield {"status": progress.status()}

        def work(emit, check):
            callback = step_reporter(cfg, emit, check)
            result = editor.train(run, callback=callback, callback_inputs=("composite", "rgba"))
            out = self._job_dir("image")
            result.save(out)
            return result, out, zip_folder(out)

        for event in self._events(session, work):
            if event.kind == "step":
                yield progress.update(*event.payload)
            elif event.kind == "preview":
                _, composite, rgba = event.payload
                update = {"preview": to_pil(composite)}
                if rgba is not None:
                    update["preview_edit"] = checkerboard(rgba)
                yield update
            else:
                result, out, archive = event.payload
                edit_layer = checkerboard(result.edit_layer)
                yield {
                    "status": finished(result, out, self.is_test_model) + progress.notes,
                    "losses": loss_table(list(enumerate(result.losses))),
                    "preview": to_pil(result.composite),
                    "preview_edit": edit_layer,
                    "composite": str(out / "composite.png"),
                    "edit_layer": edit_layer,
                    "alpha": str(out / "alpha.png"),
                    "greenscreen": str(out / "greenscreen.png"),
                    "download": str(archive),
                }
