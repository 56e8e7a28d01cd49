"""Running a batch: each process loads CLIP once and runs the jobs handed to it (:func:`run`); a job
writes into a hidden staging folder, then its done marker, then the folder is renamed into place."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import Config
from ..device import resolve_device
from ..io import InputError, check_output_dir, save_text
from ..request import check_clip_weights
from .distributed import Distributed, Local, in_torchrun, rank_device
from .manifest import Job, load_manifest, variant_groups
from .summary import DONE_MARKER, BatchSummary, JobRecord, Progress

log = logging.getLogger(__name__)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, InputError):
        text = str(exc)
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None


def _record(job: Job, out: Path, status: str, rank: int, **values) -> JobRecord:
    """A summary row; its output folder is left empty unless the job's folder is there (done)."""
    return JobRecord(
        index=job.index,
        name=job.name,
        input=str(job.input),
        prompt=job.prompt,
        seed=job.config.seed,
        status=status,
        out=str(out / job.name) if status in ("done", "skipped") else "",
        rank=rank,
        **values,
    )


class _Worker:
    """Runs jobs in this process: one device, CLIP loaded once (on the first job that trains)."""

    def __init__(self, clip_name: str, clip_weights: str | None, device, rank: int, clip=None):

        self.device = resolve_device(device)
        self.clip_name, self.clip_weights, self.rank = clip_name, clip_weights, rank
        self._clip = clip

    @property
    def clip(self):
        if self._clip is None:
            from ..models import clip as clip_models  # looked up here so tests can refuse the load

            self._clip = clip_models.load_clip(self.clip_name, self.clip_weights, self.device)
        return self._clip

    def run(self, job: Job, out: Path) -> JobRecord:
        return self.run_group([job], out)[0]

    def run_group(self, jobs: list[Job], out: Path) -> list[JobRecord]:
        """Run ``jobs`` (one, or variants trained together: :func:`variant_groups`); the ones
        done by an earlier run are skipped. Each job is staged, checked and moved into place alone."""
        records: dict[int, JobRecord] = {}
        todo = []
        for job in jobs:
            skipped = self._skipped(job, out)
            if skipped is not None:
                records[job.index] = skipped
            else:
                todo.append(job)
        stages = {
            job.index: out / f".{job.name}.partial-{socket.gethostname()}-{os.getpid()}" for job in todo
        }
        start = time.perf_counter()
        stamps: list[float] = []
        results: list = []
        try:
            if todo:
                results = self._train(todo, stages, lambda state: stamps.append(time.perf_counter()))
            for job, result in zip(todo, results, strict=True):
                records[job.index] = self._finish(
                    job, result, stages[job.index], out, start, stamps, len(todo)
                )
        except KeyboardInterrupt:
            for job in todo:
                shutil.rmtree(stages[job.index], ignore_errors=True)
                records.setdefault(
                    job.index, _record(job, out, "interrupted", self.rank, error="interrupted")
                )
        except Exception as exc:  # a bad job (group) is recorded; the batch goes on
            log.debug("job %s failed", todo[0].name, exc_info=True)
            if type(exc).__name__ == "OutOfMemoryError":
                import torch

                torch.cuda.empty_cache()
            seconds = round(time.perf_counter() - start, 3)
            for job in todo:
                shutil.rmtree(stages[job.index], ignore_errors=True)
                if job.index not in records:
                    records[job.index] = _record(
                        job,
                        out,
                        "failed",
                        self.rank,
                        seconds=seconds,
                        error=_one_line(exc),
                        variants=len(todo),
                    )
        return [records[job.index] for job in jobs]

    def _skipped(self, job: Job, out: Path) -> JobRecord | None:
        """The record of a job an earlier run completed with the same key; None to run it (stale
        staging folders of a killed run removed)."""
        marker = _read_marker(out / job.name)
        if marker is not None and marker.get("key") == job.key:
            old = marker.get("record", {})
            keep = {
                k: old[k]
                for k in ("seconds", "first_step_seconds", "step_seconds", "steps", "losses", "variants")
                if k in old
            }
            return _record(job, out, "skipped", self.rank, **keep)
        if marker is not None:
            log.info("%s: the job changed since it was done: redoing it", job.name)
        for stale in out.glob(f".{job.name}.partial-*"):  # left by a killed run (only one rank has this job)
            shutil.rmtree(stale, ignore_errors=True)
        return None

    def _finish(self, job: Job, result, stage: Path, out: Path, start: float, stamps, n: int) -> JobRecord:
        """Check a trained job, write it into ``stage``, then its marker, then move it into place."""
        if result.interrupted:
            raise KeyboardInterrupt
        last = result.losses[-1] if result.losses else {}
        bad = [k for k, v in last.items() if not math.isfinite(v)]
        if not result.losses or bad or not _finite(result):
            shutil.rmtree(stage, ignore_errors=True)
            return _record(
                job,
                out,
                "failed",
                self.rank,
                seconds=round(time.perf_counter() - start, 3),
                error=f"non-finite training: {', '.join(bad) or 'the output'} not finite at the last step "
                "(try a lower optim.lr or runtime.precision=fp32)",
                variants=n,
            )
        result.save(stage)
        steps = [b - a for a, b in zip(stamps[::n], stamps[n::n], strict=False)]  # one stamp per variant
        record = _record(
            job,
            out,
            "done",
            self.rank,
            seconds=round(time.perf_counter() - start, 3),
            first_step_seconds=round(stamps[n - 1] - start, 3) if len(stamps) >= n else None,
            step_seconds=round(statistics.median(steps), 4) if steps else None,
            steps=len(result.losses),
            losses={k: round(float(v), 6) for k, v in last.items()},
            variants=n,
        )
        marker = {"key": job.key, "record": dataclasses.asdict(record)}
        save_text(json.dumps(marker, indent=1), stage / DONE_MARKER)
        _move_into_place(stage, out / job.name)
        return record

    def _train(self, jobs: list[Job], stages: dict[int, Path], on_step: Callable) -> list:
        """Train one job, or the variants of one image or video together; -> their results."""
        if len(jobs) == 1:
            return [self._edit(jobs[0], stages[jobs[0].index], on_step)]
        editor: Any
        if jobs[0].video:
            from ..pipeline.video import VideoEditor

            editor = VideoEditor(jobs[0].config, device=self.device, clip=self.clip)
            first = editor.prepare(jobs[0].input)  # one video, one atlas: read (and evaluated) once
            kind = "video"
        else:
            from ..pipeline.image import ImageEditor

            editor = ImageEditor(jobs[0].config, device=self.device, clip=self.clip)
            first = editor.prepare(jobs[0].input)  # one input, one size: read once
            for note in first.notes:
                log.info("%s: %s", jobs[0].input, note)
            kind = "image"
        # each job's own config (validated with the manifest): its prompts, seed, the group's draw seed
        runs = [dataclasses.replace(first, config=job.config) for job in jobs]
        log.info("%s: %d jobs trained together (variants of one %s)", jobs[0].input, len(jobs), kind)
        return editor.train_variants(runs, callback=on_step)

    def _edit(self, job: Job, stage: Path, on_step: Callable):
        """Train the job; ``on_step``: the editors' step-end callback (previews written here)."""
        from ..io import save_png

        if job.video:
            from ..pipeline.video import VideoEditor

            editor = VideoEditor(job.config, device=self.device, clip=self.clip)
            return editor.train(editor.prepare(job.input), callback=on_step)
        from ..pipeline.image import ImageEditor

        editor = ImageEditor(job.config, device=self.device, clip=self.clip)
        run = editor.prepare(job.input)
        for note in run.notes:
            log.info("%s: %s", job.input, note)

        def callback(state) -> None:
            on_step(state)
            if state.composite is not None:
                (stage / "previews").mkdir(parents=True, exist_ok=True)
                save_png(state.composite, stage / "previews" / f"step_{state.step + 1:05d}.png")

        return editor.train(run, callback=callback, callback_inputs=("composite",))


def _finite(result) -> bool:
    import torch

    return bool(torch.isfinite(result.composite).all())


def _move_into_place(stage: Path, final: Path) -> None:
    """Replace ``final`` by the complete ``stage`` folder (two renames; the old folder goes last)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.rename(final, old)
    os.rename(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run(
    manifest: str | os.PathLike | dict | list,
    out_dir: str | os.PathLike,
    *,
    clip: str | None = None,
    clip_weights: str | os.PathLike | None = None,
    device: str = "auto",
    progress: bool | None = None,
    on_job: Callable[[JobRecord], None] | None = None,
    clip_model=None,
) -> BatchSummary:
    """Run every job of ``manifest`` into ``out_dir``/NAME; returns the summary (see the module doc).

    manifest: a YAML / JSON Lines file or the data itself. clip, clip_weights, device: as for
    ``t2l-fast edit``, for the whole batch (``clip`` default ViT-B-32). Under torchrun (``WORLD_SIZE``
    > 1) the jobs are shared between the ranks; rank 0 returns (and writes) the whole summary.
    progress: None — a bar per rank on a terminal, a line per job otherwise; False — quiet.
    on_job: called in this process after each of its jobs. clip_model: an already built
    :class:`~t2l_fast.models.clip.Clip` to use instead of loading one.
    Raises :class:`InputError` for a bad manifest or output folder, before any model loads.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    check_output_dir(out)
    clip = clip or Config.clip  # the batch's one CLIP: the editor's default model unless named
    clip_weights = str(clip_weights) if clip_weights is not None else None
    check_clip_weights(clip_weights)
    jobs = load_manifest(manifest, clip=clip, clip_weights=clip_weights)
    for job in jobs:
        if (out / job.name).exists() and not (out / job.name).is_dir():
            raise InputError(f"{job.where}: {out / job.name} exists and is not a folder: rename the job")
    units = variant_groups(jobs)  # variants of one image or video: trained together
    out.mkdir(parents=True, exist_ok=True)
    group = Distributed() if in_torchrun() else Local()
    mine: list[JobRecord] = []
    bar = Progress(len(jobs), group.rank, group.world_size, progress)
    try:
        with _recompile_limit(64):
            device = rank_device(device, group.local_rank, group.world_size)
            worker = _Worker(clip, clip_weights, device, group.rank, clip=clip_model)
            while True:
                index = group.add("next", 1) - 1  # atomic across ranks: each index is taken once
                if index >= len(units):
                    break
                records = worker.run_group(units[index], out)
                for record in records:
                    mine.append(record)
                    bar.job_done(record, group.add("finished", 1))
                    if on_job is not None:
                        on_job(record)
                if any(record.status == "interrupted" for record in records):
                    break
    finally:
        bar.close()
    if isinstance(group, Distributed):
        group.post(mine)
        if group.rank != 0:
            return BatchSummary(mine, group.world_size, group.rank, time.perf_counter() - start, str(out))
        mine = group.gather()
    return _summarise(jobs, mine, out, group, time.perf_counter() - start)


@contextlib.contextmanager
def _recompile_limit(at_least: int) -> Iterator[None]:
    """A batch meets more shapes (images of several aspect ratios) than one edit: keep compiling for
    them instead of falling back to eager after the default 8 graphs per function."""
    import torch._dynamo

    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    previous = getattr(config, limit)
    setattr(config, limit, max(previous, at_least))
    try:
        yield
    finally:
        setattr(config, limit, previous)


def _summarise(jobs: list[Job], records: list[JobRecord], out: Path, group, seconds: float) -> BatchSummary:
    """Every job's record (``not run`` for those no rank reached: an interrupted run), written to
    ``OUT/summary.json`` and ``OUT/summary.md``."""
    seen = {r.index: r for r in records}
    for job in jobs:
        if job.index not in seen:
            seen[job.index] = _record(job, out, "not run", -1)
    summary = BatchSummary([seen[i] for i in sorted(seen)], group.world_size, group.rank, seconds, str(out))
    save_text(json.dumps(summary.to_dict(), indent=1), out / "summary.json")
    save_text(summary.to_markdown(), out / "summary.md")
    return summary
