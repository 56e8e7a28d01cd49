"""Benchmark the fused kernels of ``t2l_fast.kernels`` against torch eager and torch.compile.

    python benchmarks/bench_kernels.py [--out benchmarks/results] [--smoke] [--dtype bf16] [--ops ...]

For each op at product sizes, providers ``triton`` (the fused kernels), ``eager`` (the torch reference)
and ``compile`` (``torch.compile`` of the reference), modes ``fwd``, ``bwd`` and ``fwd+bwd``:
median and p20/p80 time (``triton.testing.do_bench``), GB/s (memory-bound ops, from the minimal bytes
each op must move) or TFLOP/s (self-similarity, from its nominal FLOPs), speed-ups of triton over each
baseline, and peak memory. Writes ``kernels-<stamp>.json`` and, if matplotlib is installed, a plot,
stamped with device name, torch/triton versions and git commit; torch.compile time is reported
separately and excluded from the timings.

Without a GPU it says so and exits 0; ``--smoke`` instead runs tiny sizes on CPU with the eager
provider only (time.perf_counter) to check the code path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from t2l_fast.kernels import (
    composite_rgba_reference,
    sample_atlas_reference,
    self_similarity_mse_reference,
)

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("fwd", "bwd", "fwd+bwd")
PROVIDERS = ("triton", "eager", "compile")


@dataclasses.dataclass
class Case:
    """One op at one size: ``make()`` returns (inputs that need grad, a forward callable per provider
    taking no arguments and returning a tuple of differentiable outputs)."""

    op: str
    label: str
    make: Callable[[torch.device, torch.dtype], tuple[list[torch.Tensor], dict[str, Callable[[], tuple]]]]
    bytes_fwd: int  # minimal bytes the forward must move (for GB/s); 0 when FLOPs are reported
    bytes_bwd: int
    flops_fwd: float = 0.0
    flops_bwd: float = 0.0
    modes: Sequence[str] = MODES


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, tuple) else (x,)


def _triton_fns() -> dict[str, Callable]:
    import importlib

    comp = importlib.import_module("t2l_fast.kernels.composite")
    ssim = importlib.import_module("t2l_fast.kernels.self_similarity")
    atlas = importlib.import_module("t2l_fast.kernels.atlas_sample")
    return {
        "composite": comp.composite_rgba_triton,
        "ssim_mse": ssim.self_similarity_mse_triton,
        "atlas": atlas.sample_atlas_triton,
    }


def _compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def _providers(
    name: str, ref: Callable, args: tuple, providers: Sequence[str]
) -> dict[str, Callable[[], tuple]]:
    out: dict[str, Callable[[], tuple]] = {}
    for p in providers:
        if p == "triton":
            fn = _triton_fns()[name]
        elif p == "eager":
            fn = ref
        else:
            fn = _compiled(ref)
        out[p] = lambda f=fn: _as_tuple(f(*args))
    return out


def composite_case(b: int, h: int, w: int, providers: Sequence[str]) -> Case:
    def make(device, dtype):
        rgba = torch.rand(b, 4, h, w, device=device, dtype=dtype, requires_grad=True)
        bg = torch.rand(b, 3, h, w, device=device, dtype=dtype, requires_grad=True)
        return [rgba, bg], _providers("composite", composite_rgba_reference, (rgba, bg), providers)

    n = b * h * w
    return Case(
        "composite",
        f"B{b}x{h}x{w}",
        make,
        bytes_fwd=n * (4 + 3 + 3 + 3),
        bytes_bwd=n * (4 + 3 + 3 + 3 + 4 + 3),
    )


def ssim_case(b: int, k: int, d: int, providers: Sequence[str]) -> Case:
    def make(device, dtype):
        tokens = torch.randn(b, k, d, device=device, dtype=dtype, requires_grad=True)
        target = torch.rand(b, k, k, device=device) * 2 - 1
        return [tokens], _providers("ssim_mse", self_similarity_mse_reference, (tokens, target), providers)

    flops = 2.0 * b * k * k * d
    return Case("self_similarity_mse", f"B{b}xK{k}xD{d}", make, 0, 0, flops_fwd=flops, flops_bwd=2 * flops)


def atlas_case(
    label: str,
    t: int,
    h: int,
    w: int,
    ha: int,
    wa: int,
    providers: Sequence[str],
    modes: Sequence[str] = MODES,
) -> Case:
    def make(device, dtype):
        # A smooth, slightly warped mapping of each frame onto part of the atlas (as a real UV map).
        ys = torch.linspace(-0.8, 0.8, h, device=device).view(h, 1).expand(h, w)
        xs = torch.linspace(-0.9, 0.9, w, device=device).view(1, w).expand(h, w)
        shift = torch.arange(t, device=device, dtype=torch.float32).view(t, 1, 1) * 0.01
        u = (xs + 0.03 * torch.sin(6 * ys)).expand(t, h, w) + shift  # (T, H, W)
        v = (ys + 0.03 * torch.cos(5 * xs)).expand(t, h, w)
        uv = torch.stack([u, v], dim=-1).contiguous()  # (T, H, W, 2)
        atlas = torch.rand(4, ha, wa, device=device, dtype=dtype, requires_grad=True)
        frames = torch.rand(t, 3, h, w, device=device, dtype=dtype)
        opacity = torch.rand(t, h, w, device=device, dtype=dtype)
        return [atlas], _providers("atlas", sample_atlas_reference, (atlas, uv, frames, opacity), providers)

    n = t * h * w
    el = 2  # bytes per element of the half-precision product dtype (approximate for fp32)
    return Case(
        "sample_atlas",
        label,
        make,
        bytes_fwd=n * (8 + el * (3 + 1 + 3 + 1 + 3 + 3)) + 4 * ha * wa * el,
        bytes_bwd=n * (8 + el * (3 + 1 + 3 + 1 + 3 + 3)) + 4 * ha * wa * (el + 4),
        modes=modes,
    )


def pipeline_cases(providers: Sequence[str]) -> list[Case]:
    """The shapes the pipeline really runs: image 512x768 (crops bucketed to multiples of 64, the
    largest 640x960; one example per call, two when the un-augmented source joins), structure tokens
    of ViT-B/32 on the 224x320 structure view (70 patches + CLS = 71 tokens, width 768), and the
    video's atlas crops and final render."""
    cases = [composite_case(b, h, w, providers) for b, h, w in ((1, 512, 768), (2, 512, 768), (1, 640, 960))]
    cases += [ssim_case(b, 71, 768, providers) for b in (1, 2)]
    cases.append(atlas_case("crop-1600x900-3x768x432", 3, 432, 768, 900, 1600, providers))
    cases.append(atlas_case("render-70x768x432", 70, 432, 768, 900, 1600, providers, modes=("fwd",)))
    return cases


def build_cases(smoke: bool, providers: Sequence[str], shapes: str = "product") -> list[Case]:
    if shapes == "pipeline" and not smoke:
        return pipeline_cases(providers)
    if smoke:
        return [
            composite_case(2, 16, 24, providers),
            ssim_case(2, 10, 32, providers),
            atlas_case("crop-tiny", 2, 12, 20, 18, 30, providers),
        ]
    cases = [composite_case(b, 512, 512, providers) for b in (1, 4, 16)]
    cases += [ssim_case(b, k, 768, providers) for b in (16, 32) for k in (50, 197)]
    cases.append(atlas_case("crop-1600x900-3x768x432", 3, 432, 768, 900, 1600, providers))
    cases.append(atlas_case("render-70x768x432", 70, 432, 768, 900, 1600, providers, modes=("fwd",)))
    return cases


# ---------------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(
    fn: Callable[[], Any], device: torch.device, grad_to_none: list[torch.Tensor], reps: int
) -> list[float]:
    """(median, p20, p80) in ms."""
    if device.type == "cuda":
        import triton.testing

        return list(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none))
    times = []
    fn()  # warm-up
    for _ in range(reps):
        for x in grad_to_none:
            x.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    q = statistics.quantiles(times, n=10, method="inclusive")
    return [statistics.median(times), q[1], q[7]]


def _mode_fn(forward: Callable[[], tuple], mode: str, inputs: list[torch.Tensor]) -> Callable[[], Any]:
    if mode == "fwd":
        return forward
    outs = [o for o in forward() if o.requires_grad]
    grads = [torch.randn_like(o) for o in outs]
    if mode == "bwd":
        return lambda: torch.autograd.backward(outs, grads, retain_graph=True)

    def both() -> None:
        o = [x for x in forward() if x.requires_grad]
        torch.autograd.backward(o, grads)

    return both


def _peak_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def run_case(case: Case, device: torch.device, dtype: torch.dtype, reps: int) -> list[dict]:
    rows = []
    inputs, providers = case.make(device, dtype)
    for provider, forward in providers.items():
        compile_s = None
        if provider == "compile":  # compile (and its autotuning) outside the timings
            start = time.perf_counter()
            try:
                _mode_fn(forward, "fwd+bwd", inputs)()
                _sync(device)
            except Exception as exc:  # a failing provider is reported, not fatal
                rows.append(dict(op=case.op, case=case.label, provider=provider, error=repr(exc)[:500]))
                continue
            compile_s = time.perf_counter() - start
        for mode in case.modes:
            row: dict[str, Any] = dict(op=case.op, case=case.label, provider=provider, mode=mode)
            try:
                fn = _mode_fn(forward, mode, inputs)
                med, p20, p80 = _time(fn, device, inputs, reps)
                row.update(median_ms=med, p20_ms=p20, p80_ms=p80, peak_mem_mb=_peak_mb(fn, device))
            except Exception as exc:
                row["error"] = repr(exc)[:500]
                rows.append(row)
                continue
            nbytes = {"fwd": case.bytes_fwd, "bwd": case.bytes_bwd}.get(mode, case.bytes_fwd + case.bytes_bwd)
            flops = {"fwd": case.flops_fwd, "bwd": case.flops_bwd}.get(mode, case.flops_fwd + case.flops_bwd)
            if flops:
                row["tflops"] = flops / (med * 1e-3) / 1e12
            else:
                # Bytes assume 2-byte elements; scale for fp32.
                row["gbps"] = nbytes * (dtype.itemsize / 2) / (med * 1e-3) / 1e9
            if compile_s is not None:
                row["compile_s"] = compile_s
            rows.append(row)
        for x in inputs:
            x.grad = None
    return rows


def speedups(rows: list[dict]) -> list[dict]:
    by_key = {(r["op"], r["case"], r.get("mode"), r["provider"]): r for r in rows if "median_ms" in r}
    out = []
    for (op, case, mode, provider), r in by_key.items():
        if provider != "triton":
            continue
        entry: dict[str, Any] = dict(op=op, case=case, mode=mode)
        for base in ("eager", "compile"):
            b = by_key.get((op, case, mode, base))
            if b:
                entry[f"vs_{base}"] = b["median_ms"] / r["median_ms"]
        out.append(entry)
    return out


# ---------------------------------------------------------------------------------------------------
# Output


def metadata(device: torch.device, dtype: torch.dtype, smoke: bool) -> dict:
    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
        )
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or 'unknown'})"
    )
    return dict(
        device=name,
        torch=torch.__version__,
        triton=triton_version,
        git_commit=commit,
        git_dirty=dirty,
        python=sys.version.split()[0],
        dtype=str(dtype).removeprefix("torch."),
        smoke=smoke,
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )


def plot(rows: list[dict], meta: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_kernels: matplotlib is not installed; skipping the plot")
        return False
    groups = sorted({(r["op"], r["case"], r["mode"]) for r in rows if "median_ms" in r})
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    fig, ax = plt.subplots(figsize=(max(8, 0.5 * len(groups) * len(providers)), 5))
    width = 0.8 / max(len(providers), 1)
    for i, p in enumerate(providers):
        vals = []
        for g in groups:
            r = next(
                (
                    r
                    for r in rows
                    if (r["op"], r["case"], r.get("mode")) == g and r["provider"] == p and "median_ms" in r
                ),
                None,
            )
            vals.append(r["median_ms"] if r else math.nan)
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=p)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{o}\n{c}\n{m}" for o, c, m in groups], fontsize=6, rotation=90)
    ax.set_yscale("log")
    ax.set_ylabel("median ms (log)")
    ax.set_title(
        f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | "
        f"{meta['dtype']} | {str(meta['git_commit'])[:10]}",
        fontsize=8,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="output folder")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU, eager provider only")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="input dtype (GPU runs)")
    parser.add_argument(
        "--ops", nargs="*", default=None, help="only these ops (composite, self_similarity_mse, sample_atlas)"
    )
    parser.add_argument("--providers", nargs="*", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument(
        "--shapes",
        choices=("product", "pipeline"),
        default="product",
        help="size sweep, or the pipeline's shapes",
    )
    args = parser.parse_args(argv)

    if args.smoke:
        device, dtype, providers, reps = torch.device("cpu"), torch.float32, ["eager"], 5
    elif not torch.cuda.is_available():
        print(
            "bench_kernels: no CUDA GPU available; nothing to benchmark (--smoke checks the code path on CPU)"
        )
        return 0
    else:
        device, dtype, providers, reps = torch.device("cuda"), DTYPES[args.dtype], args.providers, 0
        if "compile" in providers:
            # One compiled reference per size: allow the recompilations instead of falling back to eager.
            for name in ("cache_size_limit", "recompile_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, 64)

    cases = [c for c in build_cases(args.smoke, providers, args.shapes) if not args.ops or c.op in args.ops]
    rows: list[dict] = []
    for case in cases:
        case_rows = run_case(case, device, dtype, reps)
        rows += case_rows
        for r in case_rows:
            perf = r.get("error") or (
                f"{r['median_ms']:.3f} ms [{r['p20_ms']:.3f}, {r['p80_ms']:.3f}]  "
                + (f"{r['tflops']:.2f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.1f} GB/s")
            )
            print(f"{r['op']:20s} {r['case']:26s} {r['provider']:8s} {r.get('mode', '-'):8s} {perf}")

    meta = metadata(device, dtype, args.smoke)
    result = dict(meta=meta, results=rows, speedups=speedups(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S") + ("-smoke" if args.smoke else "")
    json_path = args.out / f"kernels-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2))
    for s in result["speedups"]:
        print(
            f"speed-up {s['op']:20s} {s['case']:26s} {s['mode']:8s} "
            + "  ".join(f"{k}={v:.2f}x" for k, v in s.items() if k.startswith("vs_"))
        )
    plotted = plot(rows, meta, json_path.with_suffix(".png"))
    print(f"bench_kernels: wrote {json_path}" + (f" and {json_path.with_suffix('.png')}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
