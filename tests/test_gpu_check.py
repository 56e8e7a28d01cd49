"""benchmarks/gpu_check.sh, the one prepared device call, cannot rot: its --dry-run runs every part
with tiny settings on the CPU and packs each part's log and results as the real run does."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
CLIP = REPO.parent / "shared" / "data" / "videos" / "car-turn"


def _run(*args, env=None, timeout=1800):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env
    )


def test_dry_run_runs_every_part_and_packs_the_results(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "T2L_KERNELS")}
    proc = _run("--dry-run", "--out", str(out), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = (out / "summary.md").read_text()
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in summary.splitlines()
        if line.startswith("| ") and not line.startswith("| part")
    }
    expected = [
        "versions",
        "compile_plan",
        "edit_image",
        "kernel_tests",
        "profile_step",
        "edit_ablation",
        "bench_kernels",
        "edit_video",
        "bench_atlas",
        "bench_variants",
    ]
    if (REPO / "benchmarks" / "bench_batch.py").exists():
        expected.append("bench_batch")
    assert list(rows) == expected, summary
    for name in expected:
        if name == "bench_atlas" and not CLIP.is_dir() and not (REPO / ".gpu_data" / "car-turn").is_dir():
            assert rows[name].startswith("skipped (no car-turn"), summary
            continue
        assert rows[name] == "ok", summary
    # Everything came back in the tar, one folder per part, with the results each part writes.
    with tarfile.open(out / "gpu_check.tar") as tar:
        names = tar.getnames()
        for name in expected:
            if rows[name] == "ok":
                assert f"{name}/log" in names, name
        edits = [n for n in names if n.startswith("edit_image/edit-image-") and n.endswith(".json")]
        assert len(edits) == 1, names
        report = json.load(tar.extractfile(edits[0]))
        profile = [n for n in names if n.startswith("profile_step/") and n.endswith(".json")]
        assert len(profile) == 1, names
        prof = json.load(tar.extractfile(profile[0]))
        assert any(n.startswith("bench_kernels/kernels-") for n in names)
        assert any(n.startswith("edit_video/edit-video-") for n in names)
        ablations = [n for n in names if n.startswith("edit_ablation/edit-image-") and n.endswith(".json")]
        ablation = json.load(tar.extractfile(ablations[0]))
        plans = [n for n in names if n.startswith("compile_plan/compile-plan-") and n.endswith(".json")]
        plan = json.load(tar.extractfile(plans[0]))
    # the compile plan at the real shapes: its graphs, all made in the first step
    assert plan["graphs"] > 0 and plan["graphs_after_first_step"] == 0 and plan["graph_breaks"] == 0
    assert plan["planned_worst_cold_compile_s"] == plan["graphs"] * plan["plan_s_per_graph"]
    assert [m["mode"] for m in report["modes"]] == ["reference", "fast"]
    assert [m["mode"] for m in ablation["modes"]] == ["fast", "fast-torch-kernels", "fast-cudagraphs"]
    assert report["input_label"].startswith("160x240 image")
    for row in report["modes"]:
        assert row["render_s"] > 0 and row["save_s"] > 0
        assert row["projected_edit_s"] > row["warmup_s"]
        assert row["recompiles_after_warmup"] >= 0
    assert "error" not in report["warm_start"], report["warm_start"]
    assert report["warm_start"]["process_start_to_first_step_s"] > 0
    assert prof["summary"]["steps"] == 2 and prof["summary"]["top_host_ops"]


def test_gpu_mode_needs_the_device_out_folder_and_rejects_unknown_arguments():
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = _run(env=env, timeout=60)
    assert proc.returncode != 0 and "OUT is not set" in proc.stderr
    proc = _run("--nope", env=env, timeout=60)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
