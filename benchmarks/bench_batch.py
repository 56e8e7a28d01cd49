"""Batch benchmark: N edit jobs in one ``t2l-fast batch`` process vs N separate ``t2l-fast edit`` processes.

    python benchmarks/bench_batch.py [--jobs 6] [--steps 50] [--size 512] [--nproc 2]
                                     [--out benchmarks/results]
    python benchmarks/bench_batch.py --reduced        # the CPU run: tiny CLIP, tiny generator, 2 steps

N jobs: one synthetic image (all jobs of the same shapes, as a prompt sweep is), a different prompt
each, the same seed and steps. Three ways to run them, each timed from the outside (wall clock of the
processes, Python start-up included):

- ``batch``: one ``python -m t2l_fast.batch`` process (CLIP loaded once, compiled graphs reused).
  Its summary gives each job's seconds and the seconds from the job's start to the end of its first
  step: for the first job that includes the compilation, for the others it is what reuse leaves.
- ``separate``: N ``python -m t2l_fast.cli edit`` processes one after the other (each loads CLIP and
  compiles; later ones find inductor's on-disk cache warm, as a user's second edit would).
- ``torchrun kxN``: ``torchrun --standalone --nproc-per-node k -m t2l_fast.batch`` for each k of
  ``--nproc`` above 1 (k GPUs, or k CPU processes of one thread each).

Full run (GPU): the real ViT-B/32 architecture with random weights written to a local file
(``--clip-weights``; speed does not depend on the weight values, the edits are meaningless), the fast
path with torch.compile (the CUDA default), a fresh inductor cache. Goal: jobs 2..N reach the end of
their first step within 2 s; k GPUs take about 1/k of one GPU's time.

``--reduced`` (the CPU run; also what happens without a GPU): the tiny test CLIP, a 4-scale 8-channel
generator on a 64x96 image, two views, 2 steps, the fast path with torch.compile forced on through the
``aot_eager`` backend (dynamo + AOT autograd, no code generation: a CPU stand-in for the compile cost;
``--backend inductor`` for the real one). Writes ``batch-<stamp>.json`` and ``.md`` with device,
versions and commit.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_edit import synthetic_image  # noqa: E402
from common import metadata  # noqa: E402

from t2l_fast.io import save_png  # noqa: E402

PROMPTS = [
    "a golden horse",
    "an ice sculpture",
    "a wooden toy",
    "a marble statue",
    "a neon sign",
    "a knitted wool doll",
    "a bronze figure",
    "a paper origami model",
    "a chocolate sculpture",
    "a stained glass window",
    "a lego model",
    "a watercolour painting",
]


def random_vit_b32_weights(path: Path) -> Path:
    """The ViT-B/32 architecture with random weights, as a safetensors file ``--clip-weights`` takes."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def settings(args) -> dict[str, object]:
    """The config keys every job of the run uses (``--set`` keys)."""
    if not args.reduced:
        return {}  # the presets' defaults: on CUDA the fast path with torch.compile
    return {
        "generator.scales": 4,
        "generator.channels_down": 8,
        "generator.channels_up": 8,
        "views.n_aug": 2,
        "runtime.mode": "fast",
        "runtime.compile": "on",
        "runtime.compile_backend": args.backend,
    }


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    return time.perf_counter() - t0, proc


def check(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def run_all(args, work: Path) -> dict:
    picture = synthetic_image(64 if args.reduced else args.size)  # bench_edit's 3:2 test image
    image = save_png(picture, work / "input.png")
    model = (
        ["--clip", "test-tiny"]
        if args.reduced
        else ["--clip-weights", str(random_vit_b32_weights(work / "vitb32.safetensors"))]
    )
    device = ["--device", "cpu"] if args.reduced else ["--device", "auto"]
    sets = settings(args)
    prompts = [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" {i}") for i in range(args.jobs)]
    manifest = work / "jobs.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "defaults": {"steps": args.steps, "seed": 0, "set": sets},
                "jobs": [
                    {"input": str(image), "prompt": p, "name": f"job{i}"} for i, p in enumerate(prompts)
                ],
            },
            sort_keys=False,
        )
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(work / "inductor-cache"), "PYTHONPATH": str(REPO)}
    report: dict = {
        "jobs": args.jobs,
        "steps": args.steps,
        "settings": sets,
        "image": list(picture.shape[-2:]),
    }

    # 1. one batch process
    wall, proc = timed([sys.executable, "-m", "t2l_fast.batch", str(manifest), "--out", str(work / "batch"),
                        "--no-progress", *model, *device], env)  # fmt: skip
    check(proc, "t2l-fast batch")
    jobs = json.loads((work / "batch" / "summary.json").read_text())["jobs"]
    later = jobs[1:] or jobs
    report["batch"] = {
        "wall_s": wall,
        "job_s": [j["seconds"] for j in jobs],
        "first_step_s": [j["first_step_seconds"] for j in jobs],
        "step_s_median": statistics.median(j["step_seconds"] for j in jobs if j["step_seconds"] is not None)
        if any(j["step_seconds"] is not None for j in jobs)
        else None,
        "later_first_step_s_max": max(j["first_step_seconds"] for j in later),
        "later_job_s_median": statistics.median(j["seconds"] for j in later),
    }
    # compile (and other first-job costs) paid once: the first job's first step minus a later one's
    report["batch"]["first_job_extra_s"] = jobs[0]["first_step_seconds"] - statistics.median(
        j["first_step_seconds"] for j in later
    )

    # 2. separate edit processes
    walls = []
    for i, p in enumerate(prompts):
        out = work / "separate" / f"job{i}"
        cmd = [sys.executable, "-m", "t2l_fast.cli", "edit", str(image), "--prompt", p, "--seed", "0",
               "--steps", str(args.steps), "--out", str(out), *model, *device]  # fmt: skip
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        w, proc = timed(cmd, env)
        check(proc, f"t2l-fast edit (job {i})")
        walls.append(w)
    report["separate"] = {"wall_s": sum(walls), "process_s": walls}
    # what each separate process pays beyond the work a warm batch process does for a job
    report["separate"]["overhead_per_job_s"] = (
        statistics.median(walls) - report["batch"]["later_job_s_median"]
    )

    # 3. torchrun with k processes
    report["torchrun"] = []
    for k in args.nproc:
        if k <= 1:
            continue
        out = work / f"torchrun{k}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(k),
               "-m", "t2l_fast.batch", str(manifest), "--out", str(out), "--no-progress",
               *model, *device]  # fmt: skip
        w, proc = timed(cmd, env)
        check(proc, f"torchrun x{k}")
        summary = json.loads((out / "summary.json").read_text())
        per_rank = {r: sum(1 for j in summary["jobs"] if j["rank"] == r) for r in range(k)}
        report["torchrun"].append({"nproc": k, "wall_s": w, "jobs_per_rank": per_rank})
    return report


def markdown(report: dict) -> str:
    m, b, s = report["meta"], report["batch"], report["separate"]
    h, w = report["image"]
    lines = [
        f"# Batch benchmark: {report['jobs']} jobs of {report['steps']} steps, {w}x{h} image ({m['device']})",
        "",
        f"torch {m['torch']}, commit {m['commit']}, {m['timestamp']}. {report['kind']}. Walls are whole "
        "processes (Python start-up, imports, CLIP load included).",
        "",
        "| run | wall s | per job s |",
        "|---|---:|---|",
        f"| one `t2l-fast batch` process | {b['wall_s']:.1f} | {', '.join(f'{x:.1f}' for x in b['job_s'])} |",
        f"| {report['jobs']} separate `t2l-fast edit` processes | {s['wall_s']:.1f} | "
        f"{', '.join(f'{x:.1f}' for x in s['process_s'])} |",
    ]
    for t in report["torchrun"]:
        lines.append(
            f"| torchrun, {t['nproc']} processes | {t['wall_s']:.1f} | jobs per rank "
            f"{', '.join(str(v) for v in t['jobs_per_rank'].values())} |"
        )
    lines += [
        "",
        f"Batch, job start to end of first step: {', '.join(f'{x:.2f}' for x in b['first_step_s'])} s "
        f"(jobs 2..N at most {b['later_first_step_s_max']:.2f} s; the first job's extra, compile included, "
        f"{b['first_job_extra_s']:.1f} s, paid once).",
        f"Each separate process pays {s['overhead_per_job_s']:.1f} s more than a later job in the batch "
        f"process (start-up, CLIP load, compile{report['cache_note']}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=None, help="number of jobs (default 6; reduced 3)")
    parser.add_argument("--steps", type=int, default=None, help="steps per job (default 50; reduced 2)")
    parser.add_argument("--size", type=int, default=512, help="short side of the 3:2 image (full run)")
    parser.add_argument(
        "--nproc", default=None, help="comma-separated torchrun sizes (default: GPUs; reduced 2)"
    )
    parser.add_argument("--backend", default="aot_eager", help="compile backend of the reduced run")
    parser.add_argument("--reduced", action="store_true", help="the CPU run (tiny models)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)

    if not torch.cuda.is_available() and not args.reduced:
        print("no CUDA GPU: running the reduced CPU benchmark (--reduced)")
        args.reduced = True
    args.jobs = args.jobs or (3 if args.reduced else 6)
    args.steps = args.steps or (2 if args.reduced else 50)
    if args.nproc is None:
        args.nproc = "2" if args.reduced else str(torch.cuda.device_count())
    args.nproc = [int(k) for k in args.nproc.split(",") if k.strip()]
    if args.jobs < 2 or args.steps < 2:
        parser.error("--jobs and --steps must be at least 2 (later jobs and later steps are compared)")

    device = torch.device("cpu" if args.reduced else "cuda")
    with tempfile.TemporaryDirectory(prefix="bench_batch-") as tmp:
        report = run_all(args, Path(tmp))
    report["meta"] = metadata(device)
    inductor = not args.reduced or args.backend == "inductor"
    report["cache_note"] = (
        ": inductor's on-disk cache is warm after the first process"
        if inductor
        else f": {args.backend} keeps no on-disk cache, so every process traces again"
    )
    report["kind"] = (
        f"Reduced CPU run: tiny test CLIP, small generator, 2 views, fast path compiled with {args.backend}"
        if args.reduced
        else "Full run: ViT-B/32 architecture with random weights, presets' defaults (fast path, inductor)"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (args.out / f"batch-{stamp}.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / f"batch-{stamp}.md").write_text(text)
    print(text)
    print(f"wrote {args.out / f'batch-{stamp}.json'} and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
