"""The kernel benchmark's CPU smoke mode runs end to end and writes the documented JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_kernels_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_kernels.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = list(tmp_path.glob("kernels-*-smoke.json"))
    assert len(files) == 1, proc.stdout
    data = json.loads(files[0].read_text())
    assert set(data) == {"meta", "results", "speedups"}
    assert {"device", "torch", "triton", "git_commit", "dtype", "smoke"} <= set(data["meta"])
    ops = {r["op"] for r in data["results"]}
    assert ops == {"composite", "self_similarity_mse", "sample_atlas"}
    for row in data["results"]:
        assert "error" not in row, row
        assert {"provider", "mode", "median_ms", "p20_ms", "p80_ms", "peak_mem_mb"} <= set(row)
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
        assert ("gbps" in row) != ("tflops" in row)
    assert {r["mode"] for r in data["results"]} == {"fwd", "bwd", "fwd+bwd"}
