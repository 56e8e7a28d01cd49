"""Edits at scale: a manifest of edit jobs run in one warm process per device, over torchrun.

    t2l-fast batch jobs.yaml --out results/ [--clip NAME] [--clip-weights PATH] [--device ...]
    torchrun --nproc-per-node 8 -m t2l_fast.batch jobs.yaml --out results/

The manifest (YAML, or JSON Lines: one job object a line, ``{"defaults": {...}}`` on a line of its own)::

    defaults: {steps: 1000, seed: 0}
    jobs:
      - {input: photos/horse.jpg, prompt: golden horse, roi_prompt: horse, name: horse-gold}
      - {input: photos/horse.jpg, prompt: [ice horse, wooden horse], seed: [0, 1]}   # 4 jobs
      - {input: clips/car-turn, atlas: atlases/car-turn, layer: background, prompt: winter scene,
         set: {optim.steps: 3000}}

Job keys are ``t2l-fast edit``'s option names (``-`` or ``_``); ``set`` takes ``--set`` keys (a mapping or
a list of ``key=value``). Lists of prompts or seeds expand into one job per combination. Relative paths
are relative to the manifest's folder. CLIP, its weights and the device are chosen for the whole batch.

How it runs:

- The whole manifest is validated first (each job's config is built as ``t2l-fast edit`` builds it);
  a problem is one line naming the file, line and key, before any model loads.
- Each process loads CLIP once; every job builds its generator anew, so torch.compile's cached graphs
  (keyed on code, guarded on shapes) are reused by later jobs of the same shapes.
- Under torchrun, job indices are handed out by an atomic counter in the process group's store
  (``store.add``): a rank takes the next job when it is free. No collective is used (a rank may
  wait hours for a long video job elsewhere), so the process group is gloo even on GPUs; each rank
  uses ``cuda:LOCAL_RANK``.
- A job writes into a hidden staging folder, then a done marker, then the folder is renamed to
  ``OUT/NAME``: a job's folder is complete or absent. A rerun skips jobs whose marker matches the job
  (a changed job is redone); a killed run loses at most the jobs in flight.
- A failing job is recorded with its one-line error and the others go on. Rank 0 gathers every
  rank's records through the store and writes ``OUT/summary.json`` and ``OUT/summary.md``; the exit
  code is 1 when a job failed (2 for a bad manifest, 130 when interrupted).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import typer
import yaml

from . import cli_common
from .config import Config, flatten
from .device import resolve_device
from .io import InputError, check_output_dir, save_text

log = logging.getLogger(__name__)

DONE_MARKER = ".t2l_done.json"  # written last into a job's folder: the job is complete
SUMMARY_FILES = ("summary.json", "summary.md")

# The keys a job may have: t2l-fast edit's options (batch-wide ones excepted) and the batch's own.
IMAGE_ONLY = ("size", "preview_every")
VIDEO_ONLY = ("atlas", "layer", "frames", "write_frames")
JOB_KEYS = (
    "input",
    "prompt",
    "screen_prompt",
    "roi_prompt",
    "bootstrap",
    "seed",
    "steps",
    "config",
    "set",
    "name",
    *IMAGE_ONLY,
    *VIDEO_ONLY,
)
BATCH_WIDE = ("clip", "clip_weights", "device", "out")  # chosen once for the whole batch


# ---------------------------------------------------------------------------------------------------
# Jobs and records
# ---------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One edit of the manifest, validated: its config is resolved as ``t2l-fast edit`` resolves it."""

    index: int  # position in the expanded job list (the counter hands these out)
    name: str  # output folder OUT/NAME
    input: Path
    video: bool
    config: Config = field(repr=False)
    where: str  # "jobs.yaml:7": where the job is written
    key: str = ""  # hash of everything that decides the job's outputs (done markers compare it)

    @property
    def prompt(self) -> str:
        p = self.config.prompt
        return p if isinstance(p, str) else " | ".join(p)


@dataclass
class JobRecord:
    """What happened to one job (a row of the summary)."""

    index: int
    name: str
    input: str
    prompt: str
    seed: int
    status: str  # done | skipped (done by an earlier run) | failed | interrupted | not run
    out: str  # the job's output folder; "" when it has none (failed, interrupted, not run)
    rank: int = 0
    seconds: float | None = None  # the whole job: reading the input, training, writing
    first_step_seconds: float | None = None  # job start to the end of its first step (compile included)
    step_seconds: float | None = None  # median seconds per step after the first
    steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)  # the last step's loss terms
    error: str | None = None


@dataclass
class BatchSummary:
    """The records of a batch; on rank 0 (or without torchrun) every job's, elsewhere the rank's own."""

    records: list[JobRecord]
    world_size: int = 1
    rank: int = 0
    seconds: float = 0.0
    out: str = ""

    @property
    def failed(self) -> list[JobRecord]:
        return [r for r in self.records if r.status in ("failed", "interrupted")]

    @property
    def ok(self) -> bool:
        return not self.failed and all(r.status in ("done", "skipped") for r in self.records)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.records:
            counts[r.status] = counts.get(r.status, 0) + 1
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": self.out,
            "world_size": self.world_size,
            "seconds": round(self.seconds, 3),
            "counts": self.counts(),
            "jobs": [dataclasses.asdict(r) for r in self.records],
        }

    def to_markdown(self) -> str:
        counts = ", ".join(f"{n} {status}" for status, n in self.counts().items())
        lines = [
            f"# t2l-fast batch: {len(self.records)} jobs ({counts}), {self.world_size} process(es), "
            f"{self.seconds:.1f} s",
            "",
            "| job | status | seconds | final losses | output |",
            "|---|---|---:|---|---|",
        ]
        for r in self.records:
            seconds = f"{r.seconds:.1f}" if r.seconds is not None else ""
            losses = " ".join(f"{k}={v:.4g}" for k, v in r.losses.items())
            status = r.status if not r.error else f"{r.status}: {r.error}"
            lines.append(f"| {_md(r.name)} | {_md(status)} | {seconds} | {losses} | {_md(r.out)} |")
        return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


# ---------------------------------------------------------------------------------------------------
# Reading the manifest
# ---------------------------------------------------------------------------------------------------
@dataclass
class _Entry:
    """A job (or the defaults) as written, with where each key is."""

    data: dict[str, Any]
    file: str
    line: int | None
    key_lines: dict[str, int] = field(default_factory=dict)
    label: str = ""  # "job 3": names entries of a manifest given as data (no lines)

    def at(self, key: str | None = None) -> str:
        line = self.key_lines.get(key, self.line) if key else self.line
        if line:
            return f"{self.file}:{line}"
        return f"{self.file}, {self.label}" if self.label else self.file


def _yaml_entries(text: str, file: str) -> tuple[_Entry | None, list[_Entry]]:
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}" if mark is not None else file
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise InputError(f"{where}: the manifest is not valid YAML ({problem})") from None
    finally:
        loader.dispose()
    if data is None:
        raise InputError(f"{file}: the manifest is empty: list jobs under 'jobs:'")

    def key_lines(mapping: yaml.Node) -> dict[str, int]:
        lines: dict[str, int] = {}
        for k, _ in mapping.value:
            name = str(k.value)
            if name in lines:
                raise InputError(f"{file}:{k.start_mark.line + 1}: key {name!r} is given twice")
            lines[name] = k.start_mark.line + 1
        return lines

    defaults: _Entry | None = None
    if isinstance(data, list):
        job_nodes, jobs = node.value, data
    elif isinstance(data, dict):
        top = key_lines(node)
        unknown = [k for k in data if k not in ("defaults", "jobs")]
        if unknown:
            raise InputError(
                f"{file}:{top[str(unknown[0])]}: unknown top-level key {unknown[0]!r}: "
                "a manifest has 'defaults' (optional) and 'jobs'"
            )
        if "jobs" not in data:
            raise InputError(f"{file}: the manifest has no 'jobs': list the edits under 'jobs:'")
        values = {str(k.value): v for k, v in node.value}
        jobs, job_nodes = data["jobs"], getattr(values["jobs"], "value", None)
        if not isinstance(jobs, list):
            raise InputError(f"{file}:{top['jobs']}: 'jobs' must be a list of jobs (- input: ...)")
        if data.get("defaults") is not None:
            if not isinstance(data["defaults"], dict):
                raise InputError(f"{file}:{top['defaults']}: 'defaults' must be a mapping of job keys")
            d = values["defaults"]
            defaults = _Entry(data["defaults"], file, d.start_mark.line + 1, key_lines(d))
    else:
        raise InputError(f"{file}: the manifest must be a mapping with 'jobs' (or a list of jobs)")
    entries = []
    for job, n in zip(jobs, job_nodes, strict=True):
        line = n.start_mark.line + 1
        if not isinstance(job, dict):
            raise InputError(f"{file}:{line}: a job must be a mapping (input: ..., prompt: ...)")
        entries.append(_Entry(job, file, line, key_lines(n)))
    return defaults, entries


def _jsonl_entries(text: str, file: str) -> tuple[_Entry | None, list[_Entry]]:
    defaults: _Entry | None = None
    entries: list[_Entry] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"{file}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno}): one job object a line"
            ) from None
        if not isinstance(data, dict):
            raise InputError(f"{file}:{lineno}: each line must be a JSON object (a job)")
        if "defaults" in data:
            if len(data) != 1 or not isinstance(data["defaults"], dict):
                raise InputError(f'{file}:{lineno}: a defaults line is {{"defaults": {{...}}}} alone')
            if defaults is not None:
                raise InputError(f"{file}:{lineno}: defaults given twice (also on line {defaults.line})")
            defaults = _Entry(data["defaults"], file, lineno)
            continue
        entries.append(_Entry(data, file, lineno))
    return defaults, entries


def _read_manifest(manifest: str | os.PathLike | dict | list) -> tuple[_Entry | None, list[_Entry], Path]:
    """-> (defaults, job entries, folder that relative paths are relative to)."""
    if isinstance(manifest, (dict, list)):
        data = manifest if isinstance(manifest, dict) else {"jobs": manifest}
        defaults, entries = _yaml_entries(yaml.safe_dump(data, sort_keys=False), "manifest")
        if not entries:
            raise InputError("the manifest lists no jobs")
        for i, entry in enumerate([defaults, *entries]):  # lines of a dump would mean nothing
            if entry is not None:
                entry.line, entry.key_lines, entry.label = None, {}, f"job {i}" if i else "defaults"
        return defaults, entries, Path.cwd()
    path = Path(manifest)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise InputError(f"manifest {what}: {path} (give a .yaml or .jsonl file of jobs)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"manifest {path} cannot be read ({exc})") from None
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        defaults, entries = _jsonl_entries(text, str(path))
    else:
        defaults, entries = _yaml_entries(text, str(path))
    if not entries:
        raise InputError(f"{path}: the manifest lists no jobs")
    return defaults, entries, path.resolve().parent


def _normalise(entry: _Entry, what: str) -> None:
    """Option names with dashes become keys with underscores; unknown and batch-wide keys are errors."""
    data, lines = {}, {}
    for key, value in entry.data.items():
        norm = str(key).strip().lstrip("-").replace("-", "_")
        if norm in BATCH_WIDE:
            flag = "--" + norm.replace("_", "-")
            raise InputError(
                f"{entry.at(str(key))}: {key!r} is chosen for the whole batch, not per {what}: "
                f"pass {flag} to t2l-fast batch"
            )
        if norm not in JOB_KEYS:
            raise InputError(f"{entry.at(str(key))}: unknown {what} key {key!r}: use {', '.join(JOB_KEYS)}")
        if norm in data:
            raise InputError(f"{entry.at(str(key))}: {what} key {norm!r} is given twice")
        data[norm] = value
        if str(key) in entry.key_lines:
            lines[norm] = entry.key_lines[str(key)]
    entry.data, entry.key_lines = data, lines


def _overrides(value: Any, where: str) -> dict[str, Any]:
    """``set``: a mapping (nested or dotted keys) or a list of ``key=value`` -> {dotted key: value}."""
    if value is None:
        return {}
    if isinstance(value, list):
        out = {}
        for item in value:
            if not isinstance(item, str) or "=" not in item:
                raise InputError(f"{where}: set items are key=value, got {item!r}")
            k, v = item.split("=", 1)
            out[k.strip()] = v
        return out
    if isinstance(value, dict):
        return dict(flatten(value))
    raise InputError(f"{where}: set takes a mapping of config keys or a list of key=value")


def _slug(text: str, limit: int = 40) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit].strip("-")
    return slug or "p" + hashlib.sha1(text.encode()).hexdigest()[:8]  # a prompt without ASCII letters


_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=,@-]*")


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > 200 or name in SUMMARY_FILES:
        raise InputError(
            f"{where}: name {name!r} is not a plain folder name: use letters, digits and - _ . (no /)"
        )
    return name


def _as_list(value: Any, kind: type, key: str, where: str) -> list:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise InputError(f"{where}: {key} is an empty list")
    for item in items:
        if not isinstance(item, kind) or isinstance(item, bool) and kind is not bool:
            raise InputError(
                f"{where}: {key} must be {'a string' if kind is str else 'an integer'}, got {item!r}"
            )
    return items


def _check_types(entry: _Entry) -> None:
    d = entry.data
    for key in ("input", "screen_prompt", "roi_prompt", "atlas", "layer", "config"):
        if d.get(key) is not None and not isinstance(d[key], str):
            hint = (
                " (only prompt and seed lists expand into several jobs)" if isinstance(d[key], list) else ""
            )
            raise InputError(f"{entry.at(key)}: {key} must be a string, got {d[key]!r}{hint}")
    for key, low in (("steps", 1), ("frames", 1), ("size", 0), ("preview_every", 0)):
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise InputError(f"{entry.at(key)}: {key} must be an integer >= {low}, got {v!r}")
    for key in ("bootstrap", "write_frames"):
        if d.get(key) is not None and not isinstance(d[key], bool):
            raise InputError(f"{entry.at(key)}: {key} must be true or false, got {d[key]!r}")


def _job_key(job: Job) -> str:
    """What decides a job's outputs: the resolved config and the input (done markers store it)."""
    text = json.dumps(
        {"input": str(job.input.resolve()), "video": job.video, "config": job.config.to_dict()},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_manifest(
    manifest: str | os.PathLike | dict | list,
    *,
    clip: str | None = None,
    clip_weights: str | os.PathLike | None = None,
) -> list[Job]:
    """Read and validate a whole manifest; expand prompt and seed lists. Loads no model.

    ``manifest``: a YAML / JSON Lines file, or the data itself ({"defaults": ..., "jobs": [...]} or a
    list of jobs). ``clip`` / ``clip_weights``: the batch's CLIP (written into every job's config).
    Raises :class:`InputError` with one line naming the file, line and key of the first problem.
    """
    from .cli import build_config, is_video_input
    from .config import apply_dict, load_yaml, preset

    defaults, entries, base = _read_manifest(manifest)
    default_data: dict[str, Any] = {}
    default_set: dict[str, Any] = {}
    if defaults is not None:
        _normalise(defaults, "defaults")
        _check_types(defaults)
        for key in ("input", "name"):
            if key in defaults.data:
                raise InputError(f"{defaults.at(key)}: {key} cannot be a default: give it in each job")
        default_data = dict(defaults.data)
        default_set = _overrides(default_data.pop("set", None), defaults.at("set"))

    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else base / path

    jobs: list[Job] = []
    names: dict[str, str] = {}
    for entry in entries:
        _normalise(entry, "job")
        _check_types(entry)
        own = entry.data
        if not own.get("input"):
            raise InputError(f"{entry.at()}: the job has no input: add input: path/to/image-or-video")
        source = resolve(own["input"])
        # a missing folder of frames looks like an image file: an atlas says it is a video
        video = is_video_input(source) or (own.get("atlas") is not None and not source.is_file())
        given = [k for k in (VIDEO_ONLY if not video else IMAGE_ONLY) if own.get(k) is not None]
        if given:
            kind = "videos" if not video else "images"
            raise InputError(f"{entry.at(given[0])}: {', '.join(given)} apply to {kind} only ({source})")
        # defaults that do not apply to this kind of input are left out (one defaults block serves both)
        skip = VIDEO_ONLY if not video else IMAGE_ONLY
        data = {k: v for k, v in default_data.items() if k not in skip} | own
        if data.get("prompt") is not None:
            where_prompt = entry.at("prompt") if "prompt" in own else defaults.at("prompt")
            prompts = _as_list(data["prompt"], str, "prompt", where_prompt)
        else:
            prompts = [None]  # the prompt (or a list for one edit) may come from the config file or set
        seed_at = entry.at("seed") if "seed" in own else (defaults.at("seed") if defaults else entry.at())
        seeds = _as_list(data["seed"], int, "seed", seed_at) if data.get("seed") is not None else [None]
        set_at = entry.at("set")
        overrides = default_set | _overrides(own.get("set"), set_at)
        for key in ("clip", "clip_weights"):
            if key in overrides:
                raise InputError(
                    f"{set_at}: {key} is chosen for the whole batch: pass --{key.replace('_', '-')}"
                )
        config_file = resolve(data["config"]) if data.get("config") else None
        # as t2l-fast edit: preset < config file < set < the job's own keys (the first three once)
        entry_cfg = preset("video" if video else "image")
        try:
            entry_cfg = load_yaml(config_file, entry_cfg) if config_file is not None else entry_cfg
        except InputError as exc:
            raise InputError(f"{entry.at('config')}: {exc}") from None
        try:
            apply_dict(entry_cfg, overrides)
        except InputError as exc:
            raise InputError(f"{set_at}: {exc}") from None
        for prompt in prompts:
            for seed in seeds:
                try:  # the job's own keys as t2l-fast edit's flags (the other kind's are not in data)
                    cfg = build_config(
                        None,
                        [],
                        copy.deepcopy(entry_cfg),
                        prompt=prompt,
                        screen_prompt=data.get("screen_prompt"),
                        roi_prompt=data.get("roi_prompt"),
                        seed=seed,
                        preview_every=data.get("preview_every"),
                        size=data.get("size"),
                        steps=data.get("steps"),
                        bootstrap=bool(data.get("bootstrap")),
                        atlas=str(resolve(data["atlas"])) if data.get("atlas") else None,
                        layer=data.get("layer") or None,
                        frames=data.get("frames") or None,
                        write_frames=bool(data.get("write_frames")),
                    )
                except InputError as exc:
                    raise InputError(f"{entry.at()}: {exc}") from None
                if clip is not None:
                    cfg.clip = clip
                cfg.clip_weights = str(clip_weights) if clip_weights is not None else None
                if prompt is None and not cfg.prompt:
                    raise InputError(f"{entry.at()}: the job has no prompt: add prompt: 'a golden cat'")
                text = prompt if prompt is not None else " ".join(_as_list(cfg.prompt, str, "prompt", ""))
                try:
                    cfg.validate()
                except InputError as exc:
                    raise InputError(f"{entry.at()}: {exc}") from None
                if video and cfg.video.atlas is None:
                    raise InputError(f"{entry.at()}: a video job needs an atlas: add atlas: path/to/atlas")
                if "name" in own:
                    name = _check_name(own["name"], entry.at("name"))
                    if len(prompts) > 1:
                        name += "-" + _slug(text)
                    if len(seeds) > 1:
                        name += f"-s{cfg.seed}"
                else:
                    stem = source.stem if source.suffix else source.name
                    name = _check_name(f"{_slug(stem, 60)}-{_slug(text)}-s{cfg.seed}", entry.at("input"))
                if name in names:
                    raise InputError(
                        f"{entry.at('name' if 'name' in own else None)}: output name {name!r} is also the "
                        f"job on {names[name]}: give the jobs different names (name: ...)"
                    )
                names[name] = f"line {entry.line}" if entry.line else entry.label
                job = Job(len(jobs), name, source, video, cfg, entry.at())
                job.key = _job_key(job)
                jobs.append(job)
    return jobs


# ---------------------------------------------------------------------------------------------------
# Running jobs
# ---------------------------------------------------------------------------------------------------
class _JobFailed(Exception):
    """A job that ran but produced no usable edit (e.g. non-finite training)."""


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, (InputError, _JobFailed)):
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
            from .models import clip as clip_models  # looked up here so tests can refuse the load

            self._clip = clip_models.load_clip(self.clip_name, self.clip_weights, self.device)
        return self._clip

    def run(self, job: Job, out: Path) -> JobRecord:
        final = out / job.name
        marker = _read_marker(final)
        if marker is not None and marker.get("key") == job.key:
            old = marker.get("record", {})
            keep = {
                k: old[k]
                for k in ("seconds", "first_step_seconds", "step_seconds", "steps", "losses")
                if k in old
            }
            return _record(job, out, "skipped", self.rank, **keep)
        if marker is not None:
            log.info("%s: the job changed since it was done: redoing it", job.name)
        for stale in out.glob(f".{job.name}.partial-*"):  # left by a killed run (only one rank has this job)
            shutil.rmtree(stale, ignore_errors=True)
        stage = out / f".{job.name}.partial-{socket.gethostname()}-{os.getpid()}"
        start = time.perf_counter()
        stamps: list[float] = []
        try:
            result = self._edit(job, stage, lambda step, record: stamps.append(time.perf_counter()))
            if result.interrupted:
                raise KeyboardInterrupt
            last = result.losses[-1] if result.losses else {}
            bad = [k for k, v in last.items() if not math.isfinite(v)]
            if not result.losses or bad or not _finite(result):
                raise _JobFailed(
                    f"non-finite training: {', '.join(bad) or 'the output'} not finite at the last step "
                    "(try a lower optim.lr or runtime.precision=fp32)"
                )
            result.save(stage)
            seconds = time.perf_counter() - start
            steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
            record = _record(
                job,
                out,
                "done",
                self.rank,
                seconds=round(seconds, 3),
                first_step_seconds=round(stamps[0] - start, 3) if stamps else None,
                step_seconds=round(statistics.median(steps), 4) if steps else None,
                steps=len(result.losses),
                losses={k: round(float(v), 6) for k, v in last.items()},
            )
            marker = {"key": job.key, "record": dataclasses.asdict(record)}
            save_text(json.dumps(marker, indent=1), stage / DONE_MARKER)
            _move_into_place(stage, final)
            return record
        except KeyboardInterrupt:
            shutil.rmtree(stage, ignore_errors=True)
            return _record(job, out, "interrupted", self.rank, error="interrupted")
        except Exception as exc:  # a bad job is recorded; the batch goes on
            shutil.rmtree(stage, ignore_errors=True)
            log.debug("job %s failed", job.name, exc_info=True)
            if type(exc).__name__ == "OutOfMemoryError":
                import torch

                torch.cuda.empty_cache()
            return _record(
                job,
                out,
                "failed",
                self.rank,
                seconds=round(time.perf_counter() - start, 3),
                error=_one_line(exc),
            )

    def _edit(self, job: Job, stage: Path, on_step: Callable):
        from .io import save_png

        if job.video:
            from .pipeline.video import VideoEditor

            editor = VideoEditor(job.config, device=self.device, clip=self.clip)
            return editor.train(editor.prepare(job.input), on_step=on_step)
        from .pipeline.image import ImageEditor

        editor = ImageEditor(job.config, device=self.device, clip=self.clip)
        run = editor.prepare(job.input)
        for note in run.notes:
            log.info("%s: %s", job.input, note)

        def preview(step: int, composite) -> None:
            (stage / "previews").mkdir(parents=True, exist_ok=True)
            save_png(composite, stage / "previews" / f"step_{step + 1:05d}.png")

        return editor.train(run, on_step=on_step, on_preview=preview if run.config.preview_every else None)


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


# ---------------------------------------------------------------------------------------------------
# Distribution over torchrun ranks
# ---------------------------------------------------------------------------------------------------
class _Local:
    """One process: a plain counter stands in for the store."""

    rank, world_size, local_rank = 0, 1, 0

    def __init__(self) -> None:
        self._values: dict[str, int] = {}

    def add(self, key: str, amount: int) -> int:
        self._values[key] = self._values.get(key, 0) + amount
        return self._values[key]


class _Distributed:
    """Ranks of a torchrun launch, coordinated through the default process group's store."""

    _calls = 0  # run() calls in this process: each ``run`` on every rank gets its own keys

    def __init__(self) -> None:
        import torch.distributed as dist

        self.created = False
        if not dist.is_initialized():
            # gloo even on GPUs: no tensor collective is used, only the store
            dist.init_process_group("gloo", timeout=timedelta(days=7))
            self.created = True
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.store = dist.distributed_c10d._get_default_store()
        _Distributed._calls += 1
        # an elastic restart reuses the agent's store: keys of a new attempt must start afresh
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        self.prefix = f"t2l_fast.batch/{restart}/{_Distributed._calls}"

    def add(self, key: str, amount: int) -> int:
        return int(self.store.add(f"{self.prefix}/{key}", amount))

    def post(self, records: list[JobRecord]) -> None:
        self.store.set(
            f"{self.prefix}/records/{self.rank}", json.dumps([dataclasses.asdict(r) for r in records])
        )
        self.add("ranks_finished", 1)

    def gather(self) -> list[JobRecord]:
        """Rank 0: every rank's records, once all ranks have posted (polled: no timeout applies)."""
        while self.add("ranks_finished", 0) < self.world_size:
            time.sleep(0.2)
        out = []
        for r in range(self.world_size):
            out += [JobRecord(**d) for d in json.loads(self.store.get(f"{self.prefix}/records/{r}"))]
        return out

    def close(self) -> None:
        if self.created:
            import torch.distributed as dist

            dist.destroy_process_group()


def _in_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _rank_device(device: str, local_rank: int, world_size: int) -> str:
    """Under torchrun each rank takes its own GPU (``cuda:LOCAL_RANK``)."""
    if world_size > 1 and device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            return f"cuda:{local_rank}"
    return device


class _Progress:
    """One bar per rank on a terminal (jobs finished by all ranks / total); else a line per job."""

    def __init__(self, total: int, rank: int, world_size: int, enabled: bool | None):
        self.total, self.rank, self.world_size = total, rank, world_size
        tty = sys.stderr.isatty()
        self.bar = None
        if enabled is not False and tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=f"rank {rank}", position=rank, unit="job", dynamic_ncols=True)
        self.lines = enabled is not False and not tty
        self.mine = 0

    def job_done(self, record: JobRecord, finished: int) -> None:
        self.mine += 1
        if self.bar is not None:
            self.bar.n = finished
            self.bar.set_postfix_str(f"this rank {self.mine}, last {record.name} {record.status}")
        elif self.lines and record.status != "skipped":
            prefix = f"[rank {self.rank}] " if self.world_size > 1 else ""
            seconds = f" in {record.seconds:.1f} s" if record.seconds is not None else ""
            detail = (
                f": {record.error}"
                if record.error
                else (f" (loss {record.losses['loss']:.4g})" if "loss" in record.losses else "")
            )
            print(
                f"{prefix}{finished}/{self.total} {record.name} {record.status}{seconds}{detail}",
                file=sys.stderr,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------------
# The library entry point
# ---------------------------------------------------------------------------------------------------
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
    if clip_weights is not None and not Path(clip_weights).is_file():
        raise InputError(f"--clip-weights file not found: {clip_weights}")
    jobs = load_manifest(manifest, clip=clip, clip_weights=clip_weights)
    for job in jobs:
        if (out / job.name).exists() and not (out / job.name).is_dir():
            raise InputError(f"{job.where}: {out / job.name} exists and is not a folder: rename the job")
    out.mkdir(parents=True, exist_ok=True)

    import torch._dynamo

    group = _Distributed() if _in_torchrun() else _Local()
    # a batch meets more shapes (images of several aspect ratios) than one edit: keep compiling
    # for them instead of falling back to eager after the default 8 graphs per function
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    previous_limit = getattr(torch._dynamo.config, limit)
    setattr(torch._dynamo.config, limit, max(previous_limit, 64))
    mine: list[JobRecord] = []
    bar = _Progress(len(jobs), group.rank, group.world_size, progress)
    try:
        worker = _Worker(
            clip,
            clip_weights,
            _rank_device(device, group.local_rank, group.world_size),
            group.rank,
            clip=clip_model,
        )
        while True:
            index = group.add("next", 1) - 1  # atomic across ranks: each index is taken once
            if index >= len(jobs):
                break
            record = worker.run(jobs[index], out)
            mine.append(record)
            bar.job_done(record, group.add("finished", 1))
            if on_job is not None:
                on_job(record)
            if record.status == "interrupted":
                break
    finally:
        bar.close()
        setattr(torch._dynamo.config, limit, previous_limit)
    if isinstance(group, _Distributed):
        group.post(mine)
        if group.rank != 0:
            return BatchSummary(mine, group.world_size, group.rank, time.perf_counter() - start, str(out))
        records = group.gather()
    else:
        records = mine
    seen = {r.index: r for r in records}
    for job in jobs:  # jobs no rank reached (an interrupted run)
        if job.index not in seen:
            seen[job.index] = _record(job, out, "not run", -1)
    summary = BatchSummary(
        [seen[i] for i in sorted(seen)], group.world_size, group.rank, time.perf_counter() - start, str(out)
    )
    save_text(json.dumps(summary.to_dict(), indent=1), out / "summary.json")
    save_text(summary.to_markdown(), out / "summary.md")
    return summary


# ---------------------------------------------------------------------------------------------------
# The command (t2l-fast batch, python -m t2l_fast.batch)
# ---------------------------------------------------------------------------------------------------
def batch(
    manifest: Path = typer.Argument(..., help="Jobs: a YAML file (defaults + jobs) or JSON Lines."),
    out: Path = typer.Option(Path("results"), "--out", "-o", help="Output folder: OUT/NAME per job."),
    clip: str = typer.Option(None, help="CLIP model: ViT-B-32 (default) or test-tiny (random, for tests)."),
    clip_weights: Path = typer.Option(
        None, help="Local CLIP weights: safetensors, state dict or OpenAI's ViT-B-32.pt."
    ),
    device: str = typer.Option(
        "auto", help="auto, cuda, cuda:N or cpu (under torchrun: each rank's own GPU)."
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bars / lines."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More logging."),
) -> None:
    """Run a manifest of edits in one process (CLIP loaded once); under torchrun, over every rank."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _configure_logging(verbose, rank if world > 1 else None)

    def fail(message: str, code: int) -> typer.Exit:
        # every rank finds the same problem: rank 0 says it
        return cli_common.fail(message, code) if rank == 0 else typer.Exit(code)

    try:
        resolve_device(device)  # a bad or unavailable device fails here, before the manifest is read
        summary = run(
            manifest,
            out,
            clip=clip,
            clip_weights=clip_weights,
            device=device,
            progress=None if progress else False,
        )
    except InputError as exc:
        raise fail(str(exc), 2) from None
    except KeyboardInterrupt:
        raise fail("interrupted; finished jobs are kept and a rerun skips them", 130) from None
    if rank != 0:
        return
    if (clip or Config.clip) == "test-tiny":
        typer.echo(
            "NOTE: --clip test-tiny is a small random test model: the results are NOT real edits", err=True
        )
    for r in summary.failed:
        typer.echo(f"failed: {r.name}: {r.error}", err=True)
    counts = ", ".join(f"{n} {status}" for status, n in summary.counts().items())
    typer.echo(
        f"batch of {len(summary.records)} jobs on {summary.world_size} process(es): {counts} in "
        f"{summary.seconds:.1f} s; summary in {out / 'summary.md'}"
    )
    if any(r.status == "interrupted" for r in summary.records):
        raise typer.Exit(130)
    if not summary.ok:
        raise typer.Exit(1)


def _configure_logging(verbose: bool, rank: int | None) -> None:
    fmt = "%(message)s" if rank is None else f"[rank {rank}] %(message)s"
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr, format=fmt)
    else:
        for handler in root.handlers:
            handler.setFormatter(logging.Formatter(fmt))
    logging.getLogger("t2l_fast").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # a line per training run and per note would drown the per-job lines
        logging.getLogger("t2l_fast.pipeline").setLevel(logging.WARNING)


# ``python -m t2l_fast.batch`` (and ``torchrun ... -m t2l_fast.batch``): the one command, no subcommand
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None)
app.command()(batch)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
