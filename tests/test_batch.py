"""``t2l-fast batch``: manifests, validation before any model loads, resumable runs, failures that do
not stop the batch, the same edits as ``t2l-fast edit``, compiled graphs reused across jobs, and the
jobs shared between two torchrun ranks (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from t2l_fast import batch as batch_mod
from t2l_fast import cli
from t2l_fast.cli import batch as batch_command
from t2l_fast.io import InputError
from t2l_fast.models import clip as clip_models
from t2l_fast.objective import Objective
from tests.conftest import FAST_CLI

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
# the config part of the fast CLI arguments, as a manifest's defaults
SMALL = {"generator.channels_down": 8, "generator.channels_up": 8, "views.n_aug": 2, "generator.scales": 4}
SMALL_CLI = [*FAST_CLI, "--set", "generator.scales=4"]  # the same settings for t2l-fast edit


def _png(path: Path, seed: int = 0, size=(60, 80)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    _png(folder / "cat.png", 0)
    _png(folder / "dog.png", 1, (56, 72))
    return folder


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any CLIP were loaded: bad input must be caught before that."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(clip_models, "load_clip", refuse)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _statuses(summary: dict) -> dict[str, str]:
    return {job["name"]: job["status"] for job in summary["jobs"]}


# ---------------------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------------------
def test_manifest_defaults_expansion_and_names(tmp_path, photos):
    manifest = _write(
        tmp_path / "jobs.yaml",
        """\
defaults: {steps: 7, seed: 3, layer: foreground, set: {views.n_aug: 2, loss.lambda_structure: 5}}
jobs:
  - {input: photos/cat.png, prompt: golden cat, roi-prompt: cat, name: cat-gold}
  - {input: photos/dog.png, prompt: [ice dog, Wooden dog!], seed: [0, 1], set: {views.n_aug: 4}}
  - {input: photos/dog.png, prompt: a dog, name: dogs, prompt: [x, y]}
""",
    )
    with pytest.raises(InputError, match=r"jobs.yaml:5: key 'prompt' is given twice"):
        batch_mod.load_manifest(manifest)
    manifest.write_text(manifest.read_text().replace("prompt: a dog, name: dogs, ", "name: dogs, "))
    jobs = batch_mod.load_manifest(manifest, clip="test-tiny")
    assert [j.name for j in jobs] == [
        "cat-gold",
        "dog-ice-dog-s0",
        "dog-ice-dog-s1",
        "dog-wooden-dog-s0",
        "dog-wooden-dog-s1",
        "dogs-x",
        "dogs-y",
    ]
    cat, *dogs = jobs
    # relative to the manifest's folder; the video-only default (layer) is left out of image jobs
    assert cat.input == photos / "cat.png" and not cat.video
    assert cat.config.roi_prompt == "cat" and cat.config.seed == 3 and cat.config.optim.steps == 7
    assert cat.config.views.n_aug == 2 and cat.config.loss.lambda_structure == 5
    assert cat.config.clip == "test-tiny"
    assert [(j.config.prompt, j.config.seed) for j in dogs[:4]] == [
        ("ice dog", 0),
        ("ice dog", 1),
        ("Wooden dog!", 0),
        ("Wooden dog!", 1),
    ]
    assert dogs[0].config.views.n_aug == 4 and dogs[0].config.loss.lambda_structure == 5  # job set wins
    assert [j.index for j in jobs] == list(range(7))
    assert len({j.key for j in jobs}) == 7  # each job's outputs are told apart by its key
    # one edit with several prompts (the reference's list semantics) comes through set or a config file
    (listed,) = batch_mod.load_manifest([{"input": str(photos / "cat.png"), "set": {"prompt": ["a", "b c"]}}])
    assert listed.config.prompt == ["a", "b c"] and listed.name == "cat-a-b-c-s0"

    # the same jobs as JSON Lines (defaults on a line of their own)
    lines = [
        {"defaults": {"steps": 7, "seed": 3, "set": {"views.n_aug": 2, "loss.lambda_structure": 5}}},
        {"input": "photos/cat.png", "prompt": "golden cat", "roi_prompt": "cat", "name": "cat-gold"},
        {
            "input": "photos/dog.png",
            "prompt": ["ice dog", "Wooden dog!"],
            "seed": [0, 1],
            "set": ["views.n_aug=4"],
        },
        {"input": "photos/dog.png", "name": "dogs", "prompt": ["x", "y"]},
    ]
    jsonl = _write(tmp_path / "jobs.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    again = batch_mod.load_manifest(jsonl, clip="test-tiny")
    assert [(j.name, j.key) for j in again] == [(j.name, j.key) for j in jobs]


def test_video_jobs_need_an_atlas_and_image_options_are_for_images(tmp_path, photos):
    frames = tmp_path / "clip"
    frames.mkdir()
    with pytest.raises(InputError, match=r"manifest, job 1: a video job needs an atlas"):
        batch_mod.load_manifest([{"input": str(frames), "prompt": "winter"}])
    with pytest.raises(InputError, match=r"manifest, job 1: size apply to images only"):
        batch_mod.load_manifest([{"input": str(frames), "prompt": "winter", "atlas": "a", "size": 256}])
    with pytest.raises(InputError, match=r"manifest, job 1: atlas apply to videos only"):
        batch_mod.load_manifest([{"input": str(photos / "cat.png"), "atlas": "x", "prompt": "p"}])
    (job,) = batch_mod.load_manifest(
        {"defaults": {"size": 300}, "jobs": [{"input": str(frames), "prompt": "winter", "atlas": "at"}]}
    )
    assert job.video and job.config.video.atlas == str(Path.cwd() / "at") and job.config.optim.steps == 3000


def test_video_jobs_that_differ_only_in_prompt_or_seed_are_one_group(tmp_path):
    """Video variants share the frames and the atlas: consecutive jobs of one video, one atlas and
    every other setting equal train together; another atlas, layer or frame count is another run."""
    from t2l_fast.batch.manifest import _job_key, variant_groups

    frames = tmp_path / "clip"
    frames.mkdir()
    video = {"input": str(frames), "atlas": "at", "steps": 5}
    jobs = batch_mod.load_manifest(
        [
            {**video, "prompt": ["winter", "autumn"], "seed": [4, 9]},  # 4 jobs: one group
            {**video, "prompt": "spring", "seed": 2},  # written apart, the same settings: joins it
            {**video, "prompt": "summer", "atlas": "other", "name": "atlas"},  # another atlas
            {**video, "prompt": "summer", "layer": "foreground", "name": "layer"},  # another layer
            {**video, "prompt": "summer", "frames": 6, "seed": 7, "name": "frames"},  # fewer frames
            {**video, "prompt": "dusk", "frames": 6, "seed": 1},  # ... as the one before: joins it
            {**video, "prompt": "summer", "steps": 6, "name": "steps"},  # another setting
        ]
    )
    assert all(j.video for j in jobs)
    groups = variant_groups(jobs)
    assert [[j.index for j in g] for g in groups] == [[0, 1, 2, 3, 4], [5], [6], [7, 8], [9]]
    first = groups[0]
    assert [(j.config.prompt, j.config.seed) for j in first] == [
        ("winter", 4),
        ("winter", 9),
        ("autumn", 4),
        ("autumn", 9),
        ("spring", 2),
    ]
    # one draw stream, the group's first seed, in each config (re-runnable alone); keys follow
    assert [j.config.draw_seed for j in first] == [4] * 5
    assert [j.config.draw_seed for j in groups[3]] == [7, 7]
    assert groups[1][0].config.draw_seed is None  # a group of one keeps its own draws
    assert all(j.key == _job_key(j) for j in jobs) and len({j.key for j in jobs}) == len(jobs)


BAD_MANIFESTS = [
    # (file name, text, the message the one error line must hold)
    ("jobs.yaml", "jobs:\n  - {input: a.png, prompt: x\n", "jobs.yaml:3: the manifest is not valid YAML"),
    ("jobs.jsonl", '{"input": "a.png", "prompt": "x"}\n{"input": "b.png",\n', "jobs.jsonl:2: not valid JSON"),
    ("jobs.yaml", "jobs:\n  - {prompt: x}\n", "jobs.yaml:2: the job has no input"),
    ("jobs.yaml", "jobs:\n  - {input: a.png}\n", "jobs.yaml:2: the job has no prompt"),
    (
        "jobs.yaml",
        "jobs:\n  - input: a.png\n    prompt: x\n    stepz: 3\n",
        "jobs.yaml:4: unknown job key 'stepz'",
    ),
    (
        "jobs.yaml",
        "jobs:\n  - input: a.png\n    prompt: x\n    set: {optim.stepz: 3}\n",
        "jobs.yaml:4: unknown config key 'optim.stepz'",
    ),
    (
        "jobs.yaml",
        "defaults: {set: [loss.lambda_structure=abc]}\njobs:\n  - {input: a.png, prompt: x}\n",
        "expects a number",
    ),
    (
        "jobs.yaml",
        "jobs:\n  - {input: a.png, prompt: x, name: one}\n  - {input: b.png, prompt: y, name: one}\n",
        "jobs.yaml:3: output name 'one' is also the job on line 2",
    ),
    ("jobs.yaml", "jobs:\n  - {input: a.png, prompt: [x, x]}\n", "output name 'a-x-s0' is also the job"),
    ("jobs.yaml", "jobs:\n  - {input: a.png, prompt: x, clip: test-tiny}\n", "pass --clip to t2l-fast batch"),
    ("jobs.yaml", "jobs:\n  - {input: a.png, prompt: x, seed: [1, two]}\n", "seed must be an integer"),
    ("jobs.yaml", "jobs:\n  - {input: a.png, prompt: '  '}\n", "jobs.yaml:2: the prompt is empty"),
    ("jobs.yaml", "jobs:\n  - {input: a.png, prompt: x, name: ../up}\n", "not a plain folder name"),
    ("jobs.yaml", "job:\n  - {input: a.png, prompt: x}\n", "jobs.yaml:1: unknown top-level key 'job'"),
]


@pytest.mark.parametrize("name, text, message", BAD_MANIFESTS)
def test_bad_manifest_is_one_line_before_any_model_loads(tmp_path, no_model, name, text, message):
    manifest = _write(tmp_path / name, text)
    out = tmp_path / "results"
    result = runner.invoke(batch_command.app, [str(manifest), "--out", str(out), "--clip", "test-tiny"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()  # nothing written


def test_missing_manifest_and_out_that_is_a_file(tmp_path, photos, no_model):
    result = runner.invoke(batch_command.app, [str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and result.output.strip().endswith(
        f"manifest not found: {tmp_path / 'nope.yaml'} (give a .yaml or .jsonl file of jobs)"
    )
    manifest = _write(tmp_path / "jobs.yaml", "jobs:\n  - {input: photos/cat.png, prompt: x}\n")
    afile = _write(tmp_path / "file.txt", "keep me")
    result = runner.invoke(batch_command.app, [str(manifest), "--out", str(afile)])
    assert result.exit_code == 2 and "exists and is not a folder" in result.output
    assert afile.read_text() == "keep me"


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------
def test_batch_gives_the_same_edits_as_separate_edit_runs(tmp_path, photos):
    manifest = _write(
        tmp_path / "jobs.yaml",
        f"defaults: {{steps: 2, set: {json.dumps(SMALL)}}}\n"
        "jobs:\n"
        "  - {input: photos/cat.png, prompt: golden cat, roi_prompt: cat, seed: [0, 5]}\n"
        "  - {input: photos/dog.png, prompt: ice dog, name: dog}\n",
    )
    out = tmp_path / "results"
    args = ["batch", str(manifest), "--out", str(out), "--clip", "test-tiny", "--device", "cpu"]
    result = runner.invoke(cli.app, args)  # as `t2l-fast batch`
    assert result.exit_code == 0, result.output
    assert "3 done" in result.output
    # the two cat jobs differ only in seed: trained together, on the first one's draw stream
    summary = (out / "summary.md").read_text()
    assert "2 jobs were trained together" in summary and summary.count("(1 of 2 variants)") == 2
    cat = [
        photos / "cat.png",
        "--prompt",
        "golden cat",
        "--roi-prompt",
        "cat",
        "--set",
        "draw_seed=0",
        "--seed",
    ]
    separate = {
        "cat-golden-cat-s0": [*cat, "0"],
        "cat-golden-cat-s5": [*cat, "5"],
        "dog": [photos / "dog.png", "--prompt", "ice dog"],
    }
    for name, args in separate.items():
        single = tmp_path / f"edit-{name}"
        edit = runner.invoke(
            cli.app, ["edit", *map(str, args), "--steps", "2", "--out", str(single), *SMALL_CLI]
        )
        assert edit.exit_code == 0, edit.output
        for png in ("composite.png", "edit_layer.png", "alpha.png", "greenscreen.png"):
            assert np.array_equal(
                np.asarray(Image.open(out / name / png)), np.asarray(Image.open(single / png))
            )
        a, b = load_file(out / name / "generator.safetensors"), load_file(single / "generator.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (out / name / "config.yaml").read_text() == (single / "config.yaml").read_text()
    # the two seeds are different edits (the seed list really expanded into two runs)
    s0 = np.asarray(Image.open(out / "cat-golden-cat-s0" / "composite.png"))
    s5 = np.asarray(Image.open(out / "cat-golden-cat-s5" / "composite.png"))
    assert not np.array_equal(s0, s5)


def test_bad_jobs_are_recorded_and_the_rest_go_on_and_reruns_resume(tmp_path, photos, monkeypatch, tiny_clip):
    original = Objective.__call__

    def poisoned(self, *args, **kwargs):  # training of the "poison" prompt goes non-finite
        terms = original(self, *args, **kwargs)
        if self.cfg.prompt == "poison":  # the editors call it for a group (a list, one per variant)
            terms = [{k: v * float("nan") for k, v in t.items()} for t in terms]
        return terms

    monkeypatch.setattr(Objective, "__call__", poisoned)
    manifest = {
        "defaults": {"steps": 1, "set": SMALL},
        "jobs": [
            {"input": str(photos / "cat.png"), "prompt": "golden cat", "name": "good"},
            {"input": str(photos / "missing.png"), "prompt": "golden cat", "name": "missing"},
            {"input": str(photos / "cat.png"), "prompt": "poison", "name": "nan"},
            {"input": str(photos / "dog.png"), "prompt": "ice dog", "name": "later"},
        ],
    }
    out = tmp_path / "results"
    seen = []
    summary = batch_mod.run(
        manifest, out, clip="test-tiny", device="cpu", clip_model=tiny_clip, on_job=seen.append
    )
    assert [r.name for r in seen] == ["good", "missing", "nan", "later"]
    assert not summary.ok and [r.name for r in summary.failed] == ["missing", "nan"]
    by_name = {r.name: r for r in summary.records}
    assert by_name["missing"].error == f"image not found: {photos / 'missing.png'}"
    assert by_name["nan"].error.startswith("non-finite training: ")
    assert by_name["good"].status == by_name["later"].status == "done"
    assert set(by_name["good"].losses) >= {"loss", "comp_clip"} and by_name["good"].steps == 1
    # failed jobs leave nothing behind; done ones are complete, with their marker
    assert sorted(p.name for p in out.iterdir()) == ["good", "later", "summary.json", "summary.md"]
    assert (out / "good" / batch_mod.DONE_MARKER).is_file() and (out / "good" / "composite.png").is_file()
    table = (out / "summary.md").read_text()
    assert "| job | status | seconds | final losses | output |" in table
    assert f"| missing | failed: image not found: {photos / 'missing.png'} |" in table
    assert _statuses(_summary(out)) == {"good": "done", "missing": "failed", "nan": "failed", "later": "done"}
    # a summary row names an output folder only where there is one
    assert {job["name"]: job["out"] for job in _summary(out)["jobs"]} == {
        "good": str(out / "good"),
        "missing": "",
        "nan": "",
        "later": str(out / "later"),
    }
    row = next(line for line in table.splitlines() if line.startswith("| missing |"))
    assert row.endswith(" |  |  |"), row  # no losses, no output folder

    # a rerun: finished jobs are skipped untouched, failed ones tried again, a changed job redone
    stamp = (out / "good" / "composite.png").stat().st_mtime_ns
    (out / ".later.partial-host-1").mkdir()  # a staging folder left by a killed run
    manifest["jobs"][3]["steps"] = 2
    summary = batch_mod.run(manifest, out, clip="test-tiny", device="cpu", clip_model=tiny_clip)
    assert {r.name: r.status for r in summary.records} == {
        "good": "skipped",
        "missing": "failed",
        "nan": "failed",
        "later": "done",
    }
    assert (out / "good" / "composite.png").stat().st_mtime_ns == stamp
    assert {r.name: r.steps for r in summary.records}["later"] == 2
    assert "steps: 2" in (out / "later" / "config.yaml").read_text()
    assert not list(out.glob(".*"))  # no staging folder left


def test_second_job_of_the_same_shapes_compiles_nothing(tmp_path, photos, tiny_clip):
    import torch._dynamo

    fast = dict(SMALL)
    fast.update({"runtime.mode": "fast", "runtime.compile": "on", "runtime.compile_backend": "aot_eager"})
    # Two steps: job 1 calls some compiled functions only once per shape (the source-side targets at
    # step 0), so a graph whose guards depend on Python state changed by that call would recompile here.
    manifest = {
        "defaults": {"steps": 2, "set": fast},
        "jobs": [{"input": str(photos / "cat.png"), "prompt": ["golden cat", "ice cat"]}],
    }
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs = []

    def count(record):
        assert record.status == "done", record.error
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    batch_mod.run(
        manifest, tmp_path / "r", clip="test-tiny", device="cpu", clip_model=tiny_clip, on_job=count
    )
    assert not torch._dynamo.utils.counters["graph_break"]
    assert graphs[0] > 0  # the first job compiled generator and CLIP ...
    assert graphs[1] == graphs[0]  # ... the second (same shapes, new generator) reused every graph


# ---------------------------------------------------------------------------------------------------
# torchrun: two ranks over gloo
# ---------------------------------------------------------------------------------------------------
def _torchrun(manifest: Path, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += [
        "-m",
        "t2l_fast.batch",
        str(manifest),
        "--out",
        str(out),
        "--clip",
        "test-tiny",
        "--device",
        "cpu",
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


def test_torchrun_two_ranks_share_the_jobs_and_resume(tmp_path, photos):
    jobs = [
        {"input": "photos/cat.png", "prompt": ["golden cat", "ice cat", "wooden cat"]},
        {"input": "photos/dog.png", "prompt": "ice dog", "seed": [0, 1]},
        {"input": "photos/nope.png", "prompt": "a bad job"},
    ]
    manifest = _write(
        tmp_path / "jobs.jsonl",
        "\n".join(json.dumps(j) for j in [{"defaults": {"steps": 2, "set": SMALL}}, *jobs]) + "\n",
    )
    good = ["cat-golden-cat-s0", "cat-ice-cat-s0", "cat-wooden-cat-s0", "dog-ice-dog-s0", "dog-ice-dog-s1"]
    out = tmp_path / "results"
    proc = _torchrun(manifest, out)
    assert proc.returncode != 0, proc.stderr  # a job failed: the exit code says so
    summary = _summary(out)
    assert summary["world_size"] == 2
    assert _statuses(summary) == {**{n: "done" for n in good}, "nope-a-bad-job-s0": "failed"}
    bad = summary["jobs"][-1]
    assert bad["error"] == f"image not found: {photos / 'nope.png'}"
    # every job exactly once (a record per job index), shared between both ranks
    assert [j["index"] for j in summary["jobs"]] == list(range(6))
    ranks = [j["rank"] for j in summary["jobs"]]
    assert set(ranks) == {0, 1}, ranks
    for name in good:
        marker = json.loads((out / name / batch_mod.DONE_MARKER).read_text())
        assert marker["record"]["rank"] == next(j["rank"] for j in summary["jobs"] if j["name"] == name)
    assert "failed: nope-a-bad-job-s0: image not found" in proc.stderr
    assert "[rank 0]" in proc.stderr and "[rank 1]" in proc.stderr  # one progress line per finished job

    # rerun: only the missing job runs; the others are skipped, their files untouched
    stamps = {n: (out / n / "composite.png").stat().st_mtime_ns for n in good}
    import shutil

    shutil.rmtree(out / "dog-ice-dog-s1")
    proc = _torchrun(manifest, out)
    assert proc.returncode != 0, proc.stderr  # the bad job still fails
    summary = _summary(out)
    statuses = _statuses(summary)
    assert statuses["dog-ice-dog-s1"] == "done"
    assert all(statuses[n] == "skipped" for n in good if n != "dog-ice-dog-s1"), statuses
    assert all((out / n / "composite.png").stat().st_mtime_ns == stamps[n] for n in good[:-1])
    assert (out / "dog-ice-dog-s1" / "composite.png").is_file()
