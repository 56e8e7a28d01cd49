"""The page's video edit: a run's config from the fields, then the edit of a layer through the atlas
(:class:`VideoTab`, part of :class:`~t2l_fast.serve.App`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from ..config import Config
from ..io import InputError
from ..losses import prompt_warnings
from ..request import whole_number
from .inputs import checkerboard, loss_table, zip_folder
from .state import AppState
from .worker import Progress, finished, step_reporter


class VideoTab(AppState):
    """The video edit's handlers."""

    def video_config(
        self,
        prompt: str,
        screen_prompt: str = "",
        roi_prompt: str = "",
        layer: str = "background",
        steps: float | None = None,
        seed: float | None = None,
        more: str = "",
    ) -> Config:
        """The run's config from the page's fields (the atlas comes with :meth:`edit_video`)."""
        return self._config(
            "video",
            prompt,
            screen_prompt,
            roi_prompt,
            None,
            more,
            layer=layer,
            steps=whole_number(steps, "steps"),
            seed=None if seed is None else int(seed),
        )

    def edit_video(
        self,
        session: str,
        video: str | os.PathLike | None,
        atlas: str | os.PathLike | None,
        cfg: Config,
        frames: int | None = None,
    ) -> Iterator[dict[str, object]]:
        """Edit a layer of the video through its atlas (fitted on the page, or an uploaded atlas file);
        yields progress, then the edited MP4, the green-screen MP4, the atlas edit and the zip."""
        from ..models.atlas import AtlasData
        from ..pipeline.video import VideoEditor

        if not atlas:
            raise InputError("fit an atlas first (step 1), or upload an atlas file (atlas.safetensors)")
        out = self._job_dir("video")
        source = self.video_source(video, out)
        atlas = Path(atlas)
        cfg.video.atlas = str(atlas)
        data = None  # loaded here only for the foreground check; prepare then takes it as it is
        if cfg.video.layer == "foreground" and atlas.suffix == ".safetensors":
            data = AtlasData.load(atlas)
            if data.meta.get("has_foreground") is False or data.foreground_is_empty(cfg.video.mask_threshold):
                raise InputError(
                    "a foreground edit needs the object's masks: upload a masks zip and fit the atlas "
                    "again, or edit the background"
                )
        if frames:
            cfg.video.frames = int(frames)
        editor = VideoEditor(cfg, device=self.device, clip=self.clip)
        run = editor.prepare(source, atlas=data if data is not None else atlas)
        cfg, (t, _, h, w) = run.config, run.frames.shape
        progress = Progress(
            cfg.optim.steps,
            f"editing the {cfg.video.layer} of {t} frames of {w}x{h}",
            prompt_warnings(self.clip, cfg),
        )
        yield {"status": progress.status()}

        def work(emit, check):
            result = editor.train(run, callback=step_reporter(cfg, emit, check))
            out_dir = out / "edit"
            result.save(out_dir)
            return result, out_dir, zip_folder(out_dir)

        for event in self._events(session, work):
            if event.kind == "step":
                yield progress.update(*event.payload)
            elif event.kind == "done":
                result, out_dir, archive = event.payload
                yield {
                    "status": finished(result, out_dir, self.is_test_model) + progress.notes,
                    "losses": loss_table(list(enumerate(result.losses))),
                    "edited": str(out_dir / "edited.mp4"),
                    "greenscreen": str(out_dir / "greenscreen.mp4"),
                    "atlas_edit": checkerboard(result.atlas_edit),
                    "download": str(archive),
                }
