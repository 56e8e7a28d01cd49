"""End-to-end edit benchmark: the faithful baseline (reference mode) and the fast path in one process.

    python benchmarks/bench_edit.py [--preset image|video] [--steps 40] [--warmup 8] [--size 512]
                                    [--modes reference,fast] [--kernel-ablation] [--out benchmarks/results]
                                    [--smoke]

Runs ``--warmup + --steps`` steps of the image preset (16 views, ROI prompt so the directional loss
and the relevancy bootstrap are on; 512² short side) or of the video preset (6 views, a synthetic
70-frame 768x432 two-layer video with a known atlas, background layer, 3000-step projection) per
mode, with a CLIP of the real ViT-B/32 architecture and
RANDOM weights (speed does not depend on weight values; the edits are meaningless). Reports per
mode: median ms/step after warm-up (p20/p80), warm-up/compile seconds, the projected seconds of a
full 1000-step edit, peak GPU memory, FLOPs per step (torch's flop counter, one eager step) and the
fraction of the device's dense bf16 peak it reaches; and the fast/reference speed-up. Writes
``edit-<stamp>.json`` and ``edit-<stamp>.md`` stamped with device, versions and commit.
``--kernel-ablation`` adds the fast path with the torch references instead of the Triton kernels.

Without a GPU it says so and exits 0; ``--smoke`` runs two tiny steps per mode on the CPU with the
tiny test CLIP to check this code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import device_peak_flops, metadata, quantiles  # noqa: E402

from t2l_fast import ImageEditor, preset  # noqa: E402
from t2l_fast.models.clip import Clip, build_test_tiny  # noqa: E402
from t2l_fast.pipeline.video import VideoEditor  # noqa: E402
from t2l_fast.synthetic import two_layer_scene  # noqa: E402

FULL_EDIT_STEPS = {"image": 1000, "video": 3000}


def random_vit_b32(device: torch.device) -> Clip:
    """ViT-B/32 with random weights: the real architecture, for timing only."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, load_weights=False)
    return Clip(model, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32 (random weights)").to(device)


def synthetic_image(size: int) -> torch.Tensor:
    """A smooth 3:2 test image (content does not change speed)."""
    h, w = size, size * 3 // 2
    y = torch.linspace(0, 1, h).view(1, h, 1)
    x = torch.linspace(0, 1, w).view(1, 1, w)
    return torch.cat(
        [x.expand(1, h, w), y.expand(1, h, w), (0.5 + 0.5 * torch.sin(12 * x * y)).expand(1, h, w)]
    )


def make_config(mode: str, steps: int, size: int, smoke: bool, kind: str = "image"):
    cfg = preset(kind)
    cfg.prompt, cfg.roi_prompt = "a golden horse", "horse"
    cfg.optim.steps = steps
    cfg.data.size = size
    cfg.runtime.mode = "fast" if mode.startswith("fast") else "reference"
    if smoke:
        cfg.views.n_aug = 2
        cfg.generator.channels_down = cfg.generator.channels_up = 8
        cfg.runtime.compile = "off"
    return cfg


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_input(kind: str, size: int, smoke: bool):
    """The image, or (frames, atlas) of a synthetic two-layer video with a known atlas."""
    if kind == "image":
        return synthetic_image(size)
    t, h, w = (6, 64, 96) if smoke else (70, 432, 768)
    data, frames = two_layer_scene(t=t, h=h, w=w, grid=128 if smoke else 2000, sprite=20 if smoke else 120)
    return frames, data


def edit_once(kind: str, cfg, device, clip, inputs, on_step=None):
    if kind == "image":
        editor = ImageEditor(cfg, device=device, clip=clip)
        return editor, editor(inputs, on_step=on_step)
    frames, data = inputs
    editor = VideoEditor(cfg, device=device, clip=clip)
    return editor, editor(frames, atlas=data, on_step=on_step)


def count_flops(clip: Clip, inputs, args, device: torch.device) -> float:
    """FLOPs of one ordinary training step: an eager 2-step run minus a 1-step run."""
    from torch.utils.flop_counter import FlopCounterMode

    totals = []
    for steps in (1, 2):
        cfg = make_config("reference", steps, args.size, args.smoke, args.preset)
        cfg.data.source_every = 1000
        counter = FlopCounterMode(display=False)
        with counter:
            edit_once(args.preset, cfg, device, clip, inputs)
        totals.append(counter.get_total_flops())
    return float(totals[1] - totals[0])


def run_mode(mode: str, clip: Clip, inputs, args, device: torch.device) -> dict:
    cfg = make_config(mode, args.warmup + args.steps, args.size, args.smoke, args.preset)
    previous = os.environ.get("T2L_KERNELS")
    if mode == "fast-torch-kernels":
        os.environ["T2L_KERNELS"] = "torch"
    stamps: list[float] = []
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def on_step(step: int, record: dict) -> None:
        _sync(device)
        stamps.append(time.perf_counter())

    try:
        _sync(device)
        start = time.perf_counter()
        editor, result = edit_once(args.preset, cfg, device, clip, inputs, on_step)
    finally:
        if previous is None:
            os.environ.pop("T2L_KERNELS", None)
        else:
            os.environ["T2L_KERNELS"] = previous
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    steady = times[args.warmup :]
    median = statistics.median(steady)
    p20, p80 = quantiles(steady)
    warmup_s = sum(times[: args.warmup])
    return {
        "mode": mode,
        "engine": editor.engine.describe(),
        "steps_timed": len(steady),
        "ms_per_step_median": 1e3 * median,
        "ms_per_step_p20": 1e3 * p20,
        "ms_per_step_p80": 1e3 * p80,
        "warmup_s": warmup_s,
        "compile_s": max(0.0, warmup_s - args.warmup * median),
        "projected_edit_s": warmup_s + (FULL_EDIT_STEPS[args.preset] - args.warmup) * median,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "nonfinite_steps": editor.engine.nonfinite_steps,
        "final_loss": result.losses[-1]["loss"],
    }


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [
        f"# End-to-end {report['preset']} edit benchmark ({m['device']})",
        "",
        f"torch {m['torch']}, triton {m['triton']}, commit {m['commit']}, {m['timestamp']}. "
        f"CLIP: {report['clip']}. Input {report['input']}, {report['views']} views, "
        f"{report['steps_timed']} timed steps after {report['warmup']} warm-up steps.",
        "",
        "| mode | engine | ms/step median (p20–p80) | warm-up/compile s "
        f"| projected {report['full_steps']}-step edit s | peak GB | TFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in report["modes"]:
        peak = "–" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
        frac = "–" if r.get("fraction_of_peak") is None else f"{100 * r['fraction_of_peak']:.1f}"
        lines.append(
            f"| {r['mode']} | {r['engine']} | {r['ms_per_step_median']:.1f} ({r['ms_per_step_p20']:.1f}–"
            f"{r['ms_per_step_p80']:.1f}) | {r['warmup_s']:.1f} / {r['compile_s']:.1f} | "
            f"{r['projected_edit_s']:.1f} | {peak} | {r['tflops']:.2f} | {frac} |"
        )
    if "speedup" in report:
        s = report["speedup"]
        lines += [
            "",
            f"Fast/reference speed-up: {s['per_step']:.1f}x per step, "
            f"{s['per_edit']:.1f}x per {report['full_steps']}-step edit.",
        ]
    lines += ["", f"FLOPs per step (one example, flop counter): {report['flops_per_step'] / 1e12:.3f} TFLOP."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("image", "video"), default="image")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per mode (after warm-up)")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up steps per mode (compile happens here)")
    parser.add_argument("--size", type=int, default=512, help="short side of the image")
    parser.add_argument("--modes", default="reference,fast", help="comma-separated: reference, fast")
    parser.add_argument("--kernel-ablation", action="store_true", help="also fast mode with torch references")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="two tiny CPU steps per mode (checks this code)")
    args = parser.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.steps, args.warmup, args.size = 2, 1, 160
        clip = build_test_tiny()
    elif not torch.cuda.is_available():
        print("bench_edit: no CUDA GPU here, nothing measured (use --smoke for a CPU check of the code)")
        return 0
    else:
        device = torch.device("cuda")
        clip = random_vit_b32(device)
    inputs = make_input(args.preset, args.size, args.smoke)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.kernel_ablation:
        modes.append("fast-torch-kernels")
    flops = count_flops(clip, inputs, args, device)
    peak = device_peak_flops(device)
    rows = []
    for mode in modes:
        row = run_mode(mode, clip, inputs, args, device)
        row["tflops"] = flops / (row["ms_per_step_median"] / 1e3) / 1e12
        row["fraction_of_peak"] = None if peak is None else row["tflops"] * 1e12 / peak
        rows.append(row)
        median, projected = row["ms_per_step_median"], row["projected_edit_s"]
        print(f"{mode:>20}: {median:.1f} ms/step, projected edit {projected:.1f} s")
    report = {
        "meta": metadata(device),
        "clip": clip.name + ("" if args.smoke else ", random weights: timing only"),
        "preset": args.preset,
        "full_steps": FULL_EDIT_STEPS[args.preset],
        "input": list(inputs.shape[-2:]) if args.preset == "image" else list(inputs[0].shape),
        "views": make_config("fast", 1, args.size, args.smoke, args.preset).views.n_aug,
        "steps_timed": args.steps,
        "warmup": args.warmup,
        "flops_per_step": flops,
        "device_peak_flops": peak,
        "modes": rows,
    }
    by_mode = {r["mode"]: r for r in rows}
    if "reference" in by_mode and "fast" in by_mode:
        ref, fast = by_mode["reference"], by_mode["fast"]
        report["speedup"] = {
            "per_step": ref["ms_per_step_median"] / fast["ms_per_step_median"],
            "per_edit": ref["projected_edit_s"] / fast["projected_edit_s"],
        }
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"edit-{args.preset}-{stamp}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
    (args.out / f"{name}.md").write_text(markdown(report))
    print(f"wrote {args.out}/{name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
