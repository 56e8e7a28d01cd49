"""The end-to-end benchmark's code path, as a tiny CPU smoke run (not a timing test)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_edit_smoke_writes_json_and_markdown(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_edit.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("edit-*.json")).read_text())
    assert {"meta", "modes", "flops_per_step", "speedup"} <= set(report)
    assert [m["mode"] for m in report["modes"]] == ["reference", "fast"]
    for row in report["modes"]:
        assert row["ms_per_step_p20"] <= row["ms_per_step_median"] <= row["ms_per_step_p80"]
        assert row["projected_edit_s"] > 0
    assert report["flops_per_step"] > 0
    assert report["modes"][0]["engine"].startswith("reference mode, fp32")
    assert "| fast |" in next(tmp_path.glob("edit-*.md")).read_text()


def test_bench_edit_without_gpu_says_so(tmp_path):
    code = (
        "import torch, runpy, sys; torch.cuda.is_available = lambda: False; "
        f"sys.argv = ['bench_edit.py', '--out', {str(tmp_path)!r}]; "
        f"runpy.run_path({str(REPO / 'benchmarks' / 'bench_edit.py')!r}, run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "no CUDA GPU" in proc.stdout
    assert not list(tmp_path.iterdir())


def test_bench_memory_counts_saved_activations(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_memory.py"),
            "--clip",
            "test-tiny",
            "--size",
            "160",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("memory-*.json")).read_text())
    rows = {r["precision"]: r["saved_gb"] for r in report["rows"]}
    assert report["crop"] == [160, 240]
    assert 0 < rows["bf16"] < rows["fp32"]  # bf16 autocast keeps smaller activations


def test_bench_atlas_defaults_to_the_shipped_sample_clip(tmp_path):
    """A user has no ../shared/data: the benchmark runs on t2l_fast/samples/clip (with its masks), and
    a --video that is not there is one error line, not a traceback."""
    script = str(REPO / "benchmarks" / "bench_atlas.py")
    args = ["--device", "cpu", "--frames", "3", "--size", "64x36", "--iterations", "2"]
    args += ["--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    (result,) = tmp_path.glob("atlas-*.json")
    data = json.loads(result.read_text())
    assert Path(data["video"]) == REPO / "t2l_fast" / "samples" / "clip"
    assert data["masks"] is True and data["frames"] == 3 and data["runs"][0]["iterations"] == 2
    proc = subprocess.run(
        [sys.executable, script, "--video", str(tmp_path / "car-turn")], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: --video {tmp_path / 'car-turn'} not found" in proc.stderr


def test_bench_variants_smoke_writes_each_group_size(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_variants.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(next(tmp_path.glob("variants-*.json")).read_text())
    assert [r["n"] for r in report["rows"]] == [1, 2]
    for row in report["rows"]:
        assert row["lone_seconds"] > 0 and row["group_seconds"] > 0
        assert row["group_ms_per_step_per_variant"] * row["n"] == pytest.approx(row["group_ms_per_step"])
    assert "| 2 |" in next(tmp_path.glob("variants-*.md")).read_text()
