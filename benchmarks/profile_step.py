"""torch.profiler summary of steady fast-mode steps of an edit: where a step's time goes.

    python benchmarks/profile_step.py [--preset image|video] [--size 512] [--warmup 12] [--steps 3]
                                      [--mode fast] [--out benchmarks/results] [--smoke]

Runs ``--warmup`` steps (compile happens there), then profiles ``--steps`` steady steps with the
device synchronised at both ends, and reports per step: wall time; GPU-busy time (the union of the
device kernels' and copies' intervals) and its share of the wall time; kernel launches (runtime
launch calls) and device kernels; host syncs (cudaStreamSynchronize / cudaDeviceSynchronize /
cudaEventSynchronize / synchronous cudaMemcpy calls; and aten::_local_scalar_dense, which is what
``.item()`` / ``bool()`` / ``int()`` of a tensor run: a sync for a device tensor, free for a CPU one,
e.g. a host-side random draw); and the top device kernels and host
ops by self time. The image preset's ``--size 512`` is a 512x768 edit. Writes
``profile-<preset>-<stamp>.json`` and ``.md`` (no trace file: it would be large).

Uses the same random-weight ViT-B/32 as ``bench_edit.py`` (timing only). Without a GPU it says so and
exits 0; ``--smoke`` profiles two tiny CPU steps (host ops only) to check this code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_edit import _sync, device_and_clip, edit_once, input_label, make_config, make_input  # noqa: E402
from common import metadata  # noqa: E402

LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cuLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
SCALAR_READ = "aten::_local_scalar_dense"


def _is_device(evt) -> bool:
    kind = getattr(evt, "device_type", None)
    return kind is not None and str(kind).endswith(("CUDA", "PrivateUse1"))


def _busy_us(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (us)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def summarise(prof, steps: int, wall_s: float, top: int = 15) -> dict:
    events = prof.events()
    device_events = [e for e in events if _is_device(e)]
    intervals = [(e.time_range.start, e.time_range.end) for e in device_events]
    busy_s = _busy_us(intervals) / 1e6
    names = [e.name for e in events]
    launches = sum(1 for n in names if n.startswith(LAUNCH_CALLS))
    syncs = {call: sum(1 for n in names if n == call) for call in SYNC_CALLS}
    scalar_reads = sum(1 for n in names if n == SCALAR_READ)
    averages = prof.key_averages()

    def self_device_us(a) -> float:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(a, attr):
                return float(getattr(a, attr))
        return 0.0

    kernels = sorted((a for a in averages if self_device_us(a) > 0), key=self_device_us, reverse=True)
    host = sorted(averages, key=lambda a: float(a.self_cpu_time_total), reverse=True)
    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall_s / steps,
        "gpu_busy_ms_per_step": 1e3 * busy_s / steps,
        "gpu_busy_fraction": busy_s / wall_s if wall_s > 0 else None,
        "kernel_launches_per_step": launches / steps,
        "device_kernels_per_step": len(device_events) / steps,
        "syncs_per_step": {k: v / steps for k, v in syncs.items()},
        "scalar_reads_per_step": scalar_reads / steps,
        "top_device_kernels": [
            {
                "name": a.key[:160],
                "calls_per_step": a.count / steps,
                "self_ms_per_step": self_device_us(a) / 1e3 / steps,
            }
            for a in kernels[:top]
        ],
        "top_host_ops": [
            {
                "name": a.key[:160],
                "calls_per_step": a.count / steps,
                "self_ms_per_step": a.self_cpu_time_total / 1e3 / steps,
            }
            for a in host[:top]
        ],
    }


def markdown(report: dict) -> str:
    s = report["summary"]
    busy = "–" if s["gpu_busy_fraction"] is None else f"{100 * s['gpu_busy_fraction']:.0f} %"
    lines = [
        f"# Profile of {s['steps']} steady {report['mode']} steps: {report['input_label']} "
        f"({report['meta']['device']})",
        "",
        f"torch {report['meta']['torch']}, triton {report['meta']['triton']}, "
        f"commit {report['meta']['commit']}, "
        f"after {report['warmup']} warm-up steps; engine: {report['engine']}.",
        "",
        f"- wall {s['wall_ms_per_step']:.2f} ms/step; "
        f"GPU busy {s['gpu_busy_ms_per_step']:.2f} ms/step ({busy})",
        f"- kernel launches {s['kernel_launches_per_step']:.0f}/step; "
        f"device kernels {s['device_kernels_per_step']:.0f}/step",
        f"- host syncs/step: {', '.join(f'{k} {v:g}' for k, v in s['syncs_per_step'].items())}; "
        f"scalar reads (aten::_local_scalar_dense) {s['scalar_reads_per_step']:g}",
        "",
        "| top device kernels | calls/step | self ms/step |",
        "|---|---:|---:|",
    ]
    lines += [
        f"| `{k['name'][:90]}` | {k['calls_per_step']:g} | {k['self_ms_per_step']:.3f} |"
        for k in s["top_device_kernels"]
    ]
    lines += ["", "| top host ops | calls/step | self ms/step |", "|---|---:|---:|"]
    lines += [
        f"| `{k['name'][:90]}` | {k['calls_per_step']:g} | {k['self_ms_per_step']:.3f} |"
        for k in s["top_host_ops"]
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("image", "video"), default="image")
    parser.add_argument("--size", type=int, default=512, help="short side of the (3:2) image; 512: 512x768")
    parser.add_argument("--warmup", type=int, default=12)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--mode", default="fast", choices=("fast", "reference"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="two tiny CPU steps (checks this code)")
    args = parser.parse_args(argv)
    chosen = device_and_clip(args.smoke, "profile_step")
    if chosen is None:
        return 0
    device, clip = chosen
    if args.smoke:
        args.size, args.warmup, args.steps = 160, 1, 2
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    cfg = make_config(args.mode, args.warmup + args.steps, args.size, args.smoke, args.preset)
    inputs = make_input(args.preset, args.size, args.smoke)
    state: dict = {}

    def on_step(end) -> None:  # the editors' step-end callback
        step = end.step
        if step == args.warmup - 1:  # warm-up done: start profiling the next steps
            _sync(device)
            state["prof"] = profile(activities=activities, record_shapes=False)
            state["prof"].__enter__()
            state["t0"] = time.perf_counter()
        elif step == args.warmup + args.steps - 1:
            _sync(device)
            state["wall"] = time.perf_counter() - state["t0"]
            state["prof"].__exit__(None, None, None)

    editor, _ = edit_once(args.preset, cfg, device, clip, inputs, on_step)
    summary = summarise(state["prof"], args.steps, state["wall"])
    label = input_label(
        list(inputs.shape[-2:]) if args.preset == "image" else list(inputs[0].shape), args.preset
    )
    report = {
        "meta": metadata(device),
        "preset": args.preset,
        "mode": args.mode,
        "engine": editor.engine.describe(),
        "input_label": label,
        "warmup": args.warmup,
        "summary": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"profile-{args.preset}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))
    print(f"profile_step: wrote {args.out}/{name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
