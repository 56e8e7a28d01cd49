"""A batch's manifest: read (YAML, or JSON Lines), checked and expanded into jobs (:class:`Job`), each
with its config resolved through the same request path as ``t2l-fast edit``
(:func:`t2l_fast.request.edit_config`), before any model loads. A problem is one line naming the
file, line and key."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import Config, apply_dict, flatten
from ..io import InputError, slug
from ..request import IMAGE_ONLY, VIDEO_ONLY, OptionError, edit_base, edit_config, is_video_input
from ..request import key as manifest_key
from .summary import SUMMARY_FILES

# The keys a job may have: t2l-fast edit's options (batch-wide ones excepted) and the batch's own.
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
    for key in ("steps", "frames", "size", "preview_every"):  # their bounds: Config.validate
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise InputError(f"{entry.at(key)}: {key} must be an integer, got {v!r}")
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


VARIANT_KEYS = ("prompt", "screen_prompt", "roi_prompt", "seed", "draw_seed")  # what variants differ in


def variant_groups(jobs: list[Job]) -> list[list[Job]]:
    """The jobs as the runs that train them, in manifest order: jobs written one after another that
    differ only in their prompts or seed (one input, image or video, every other setting equal: a
    video's atlas, layer and frames too; prompts of the same shape: what a job's list of prompts or
    seeds expands into) are one group, trained together on one draw stream, the group's first seed
    (``draw_seed``, set in each job's config: its config.yaml re-runs it alone; keys recomputed).
    The rest are groups of one."""
    groups: list[list[Job]] = []
    last = None
    for job in jobs:
        key = _variant_key(job)
        if key == last:
            groups[-1].append(job)
        else:
            groups.append([job])
        last = key
    for group in groups:
        if len(group) > 1:
            first = group[0].config
            draw_seed = first.seed if first.draw_seed is None else first.draw_seed
            for job in group:
                job.config.draw_seed = draw_seed
                job.key = _job_key(job)
    return groups


def _variant_key(job: Job) -> str:
    """What variants trained together share: the input and every setting but prompts and seeds."""
    settings = job.config.to_dict()
    shape = {k: _prompt_shape(settings[k]) for k in ("prompt", "screen_prompt", "roi_prompt")}
    for k in VARIANT_KEYS:
        settings.pop(k)
    key = {"input": str(job.input.resolve()), "video": job.video, "settings": settings, "shape": shape}
    return json.dumps(key, default=str)


def _prompt_shape(value) -> int | None:
    """None, 1 (one text) or the number of texts: variants must draw the same numbers."""
    return None if value is None else (1 if isinstance(value, str) else len(value))


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
    defaults, entries, base = _read_manifest(manifest)
    default_data, default_set = _defaults(defaults)
    batch_clip = {"clip": clip, "clip_weights": str(clip_weights) if clip_weights is not None else None}
    jobs: list[Job] = []
    names: dict[str, str] = {}
    for entry in entries:
        _normalise(entry, "job")
        _check_types(entry)
        expanded = _Expanded(entry, defaults, default_data, default_set, base, batch_clip)
        for prompt in expanded.prompts:
            for seed in expanded.seeds:
                job = expanded.job(len(jobs), prompt, seed)
                if job.name in names:
                    raise InputError(
                        f"{entry.at('name' if 'name' in entry.data else None)}: output name {job.name!r} is "
                        f"also the job on {names[job.name]}: give the jobs different names (name: ...)"
                    )
                names[job.name] = f"line {entry.line}" if entry.line else entry.label
                jobs.append(job)
    return jobs


def _defaults(defaults: _Entry | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The defaults' job keys and their ``set`` (both empty without defaults)."""
    if defaults is None:
        return {}, {}
    _normalise(defaults, "defaults")
    _check_types(defaults)
    for name in ("input", "name"):
        if name in defaults.data:
            raise InputError(f"{defaults.at(name)}: {name} cannot be a default: give it in each job")
    data = dict(defaults.data)
    return data, _overrides(data.pop("set", None), defaults.at("set"))


class _Expanded:
    """One entry of the manifest with the defaults applied: its input, its base config (preset, config
    file, ``set``: built once), and the prompts and seeds it expands into."""

    def __init__(self, entry: _Entry, defaults, default_data, default_set, base: Path, batch_clip) -> None:
        own = entry.data
        if not own.get("input"):
            raise InputError(f"{entry.at()}: the job has no input: add input: path/to/image-or-video")
        self.entry, self.base_dir = entry, base
        self.source = self.resolve(own["input"])
        self.video = video = is_video_input(self.source, own.get("atlas"))
        # defaults that do not apply to this kind of input are left out (one defaults block serves both)
        skip = VIDEO_ONLY if not video else IMAGE_ONLY
        self.data = data = {k: v for k, v in default_data.items() if k not in skip} | own
        self.prompts: list[str | None] = [None]  # the prompt may come from the config file or set
        if data.get("prompt") is not None:
            where = entry.at("prompt") if "prompt" in own else defaults.at("prompt")
            self.prompts = _as_list(data["prompt"], str, "prompt", where)
        seed_at = entry.at("seed") if "seed" in own else (defaults.at("seed") if defaults else entry.at())
        self.seeds = _as_list(data["seed"], int, "seed", seed_at) if data.get("seed") is not None else [None]
        self.config = self._base_config(default_set, batch_clip)

    def resolve(self, p: str) -> Path:
        path = Path(p).expanduser()
        return path if path.is_absolute() else self.base_dir / path

    def _base_config(self, default_set: dict[str, Any], batch_clip: dict[str, Any]) -> Config:
        """As t2l-fast edit: preset < config file < set < the job's own keys (the first three once)."""
        entry, data = self.entry, self.data
        set_at = entry.at("set")
        overrides = default_set | _overrides(entry.data.get("set"), set_at)
        for name in ("clip", "clip_weights"):
            if name in overrides:
                raise InputError(
                    f"{set_at}: {name} is chosen for the whole batch: pass --{name.replace('_', '-')}"
                )
        config_file = self.resolve(data["config"]) if data.get("config") else None
        try:
            cfg = edit_base(self.video, config_file)
        except InputError as exc:
            raise InputError(f"{entry.at('config')}: {exc}") from None
        try:
            apply_dict(cfg, overrides)
        except InputError as exc:
            raise InputError(f"{set_at}: {exc}") from None
        cfg.clip = batch_clip["clip"] or cfg.clip
        cfg.clip_weights = batch_clip["clip_weights"]
        return cfg

    def job(self, index: int, prompt: str | None, seed: int | None) -> Job:
        """The job of one prompt and seed, its config through the request path as t2l-fast edit's."""
        entry, data = self.entry, self.data
        if prompt is None and not self.config.prompt:
            raise InputError(f"{entry.at()}: the job has no prompt: add prompt: 'a golden cat'")
        try:  # the job's own keys as t2l-fast edit's flags (the other kind's are not in data)
            cfg = edit_config(
                self.source,
                self.video,
                self.config,
                name=manifest_key,
                run="job",
                prompt=prompt,
                screen_prompt=data.get("screen_prompt"),
                roi_prompt=data.get("roi_prompt"),
                seed=seed,
                preview_every=data.get("preview_every"),
                size=data.get("size"),
                steps=data.get("steps"),
                bootstrap=bool(data.get("bootstrap")),
                atlas=str(self.resolve(data["atlas"])) if data.get("atlas") else None,
                layer=data.get("layer") or None,
                frames=data.get("frames") or None,
                write_frames=bool(data.get("write_frames")),
            )
        except OptionError as exc:
            raise InputError(f"{entry.at(exc.option if exc.option in data else None)}: {exc}") from None
        except InputError as exc:
            raise InputError(f"{entry.at()}: {exc}") from None
        text = prompt if prompt is not None else " ".join(_as_list(cfg.prompt, str, "prompt", ""))
        job = Job(index, self._name(text, cfg.seed), self.source, self.video, cfg, entry.at())
        job.key = _job_key(job)
        return job

    def _name(self, text: str, seed: int) -> str:
        own = self.entry.data
        if "name" in own:
            name = _check_name(own["name"], self.entry.at("name"))
            if len(self.prompts) > 1:
                name += "-" + slug(text)
            if len(self.seeds) > 1:
                name += f"-s{seed}"
            return name
        stem = self.source.stem if self.source.suffix else self.source.name
        return _check_name(f"{slug(stem, 60)}-{slug(text)}-s{seed}", self.entry.at("input"))
