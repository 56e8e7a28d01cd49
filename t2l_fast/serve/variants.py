"""The page's variants box: several prompts (one a line) and seeds of the image trained together,
their live previews in a gallery, each downloadable, and the comparison sheet
(:class:`VariantsTab`, part of :class:`~t2l_fast.serve.App`)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from ..config import Config
from ..io import InputError
from ..pipeline.image import ImageEditor
from ..pipeline.variants import Variant, caption, make_variants, save_variants
from ..request import whole_number
from .inputs import TEST_MODEL_NOTE, check_image_file, to_pil, zip_folder
from .state import AppState
from .worker import Progress, cancelled, step_reporter


class VariantsTab(AppState):
    """The variants box's handlers."""

    @staticmethod
    def variant_prompts(text: str) -> list[str]:
        """The box's prompts: one a line, blank lines left out; at least one."""
        prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
        if not prompts:
            raise InputError("variants: write one prompt a line in the variants box")
        return prompts

    def variants(self, text: str, seeds: float | None, cfg: Config) -> list[Variant]:
        """Every prompt of the box with ``seeds`` seeds from the seed field (checked: no repeated
        prompt; the screen and ROI prompt fields apply to every variant)."""
        count = 1 if seeds is None else whole_number(seeds, "seeds per prompt")
        if count < 1:
            raise InputError(f"seeds per prompt must be at least 1 (got {count})")
        seed = max(cfg.seed, 0)
        return make_variants(
            self.variant_prompts(text), [seed + k for k in range(count)], cfg.screen_prompt, cfg.roi_prompt
        )

    def edit_variants(
        self, session: str, image_path: str | os.PathLike | None, cfg: Config, variants: list[Variant]
    ) -> Iterator[dict[str, object]]:
        """Train the variants together and yield page updates: status every step, the gallery of
        live previews (every ``cfg.preview_every`` steps), then the saved composites (each a file),
        the comparison sheet first, and the zip of them all."""
        path = check_image_file(image_path, self.limits)
        editor = ImageEditor(cfg, device=self.device, clip=self.clip)
        runs = editor.prepare_variants(path, variants)
        (h, w), n = runs[0].source.shape[-2:], len(variants)
        progress = Progress(cfg.optim.steps, f"editing {n} variants of {w}x{h}", runs[0].notes)
        yield {"status": progress.status()}

        def work(emit, check):
            report = step_reporter(cfg, emit, check)
            last = {"step": -1}

            def callback(state) -> bool:
                if state.composite is not None:
                    emit("variant", (state.variant, state.composite))
                    state.composite = None  # the gallery shows it
                if state.step != last["step"]:  # a step's first variant (a chunk starts at step 0)
                    last["step"] = state.step
                    return report(state)  # the step's progress, and the cancel check
                return cancelled(check)

            results = editor.train_variants(runs, callback=callback, callback_inputs=("composite",))
            out = self._job_dir("variants")
            save_variants(out, variants, results)
            return results, out, zip_folder(out)

        latest: dict[int, object] = {}
        for event in self._events(session, work):
            if event.kind == "step":
                yield progress.update(*event.payload)
            elif event.kind == "variant":
                k, composite = event.payload
                latest[k] = to_pil(composite)
                yield {"gallery": [(latest[i], caption(variants[i])) for i in sorted(latest)]}
            elif event.kind == "done":
                results, out, archive = event.payload
                done = sum(not r.interrupted for r in results)
                text = f"done: {done} of {n} variants, {results[0].steps_done} steps (saved in {out})"
                if any(r.interrupted for r in results):
                    text = (
                        f"cancelled after {results[0].steps_done} steps: the variants so far (saved in {out})"
                    )
                gallery = [(str(out / "variants.png"), "all variants")]
                gallery += [(str(out / v.name / "composite.png"), caption(v)) for v in variants]
                note = "\n\n" + TEST_MODEL_NOTE if self.is_test_model else ""
                yield {"status": text + note + progress.notes, "gallery": gallery, "download": str(archive)}
