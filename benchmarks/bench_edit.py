"""End-to-end edit benchmark: the faithful baseline (reference mode) and the fast path in one process.

    python benchmarks/bench_edit.py [--preset image|video] [--steps 40] [--warmup 8] [--size 512]
                                    [--modes reference,fast] [--kernel-ablation] [--cudagraphs-ablation]
                                    [--warm-start] [--cache-dir DIR] [--out benchmarks/results] [--smoke]

Runs ``--warmup + --steps`` steps of the image preset (16 views, ROI prompt so the directional loss
and the relevancy bootstrap are on; ``--size 512`` is a 512x768 edit: a 3:2 image with a 512-px short
side) or of the video preset (6 views, a synthetic 70-frame 768x432 two-layer video with a known
atlas, background layer, 3000-step projection) per mode, with a CLIP of the real ViT-B/32
architecture and RANDOM weights (speed does not depend on weight values; the edits are meaningless).

Per mode: ms/step after warm-up, from clock reads every ``--block`` steps with the device
synchronised (the loop itself syncs only every ``runtime.log_every`` steps, so per-step syncs would
distort it): the mean over the timed window, and the median/p20/p80 of the block means; warm-up
seconds and the compile seconds in them; graphs compiled during warm-up and recompiles after it
(dynamo counters); the render + result time after the last step and the time to save the outputs;
the projected seconds of a full 1000-step (video 3000-step) edit INCLUDING warm-up, render and saving;
peak GPU memory, FLOPs per step (torch's flop counter, one eager step) and the fraction of the
device's dense bf16 peak. Modes: ``reference``, ``fast``, ``fast-torch-kernels`` (--kernel-ablation:
the fast path with the torch references instead of the Triton kernels), ``fast-cudagraphs``
(--cudagraphs-ablation: runtime.cudagraphs and runtime.prefetch on). Each fast mode starts from
``torch._dynamo.reset()``;
the first one in the process compiles against the inductor cache in ``--cache-dir`` (pass an empty
folder for a cold-cache figure). ``--warm-start`` then runs the fast mode again in a fresh process on
the same cache: the warm-cache start (process start to the first step, warm-up and compile seconds).
Writes ``edit-<preset>-<stamp>.json`` and ``.md`` stamped with device, versions and commit.

Without a GPU it says so and exits 0; ``--smoke`` runs two tiny steps per mode on the CPU with the
tiny test CLIP to check this code.
"""

from __future__ import annotations

import time

_PROCESS_T0 = time.perf_counter()  # before the heavy imports: the warm-start figure includes them

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import device_peak_flops, metadata, quantiles  # noqa: E402

from t2l_fast import ImageEditor, preset  # noqa: E402
from t2l_fast.models.clip import Clip, build_test_tiny  # noqa: E402
from t2l_fast.pipeline.engine import INDUCTOR_CACHE_DIR  # noqa: E402
from t2l_fast.pipeline.video import VideoEditor  # noqa: E402
from t2l_fast.synthetic import two_layer_scene  # noqa: E402

FULL_EDIT_STEPS = {"image": 1000, "video": 3000}


def random_vit_b32(device: torch.device) -> Clip:
    """ViT-B/32 with random weights: the real architecture, for timing only."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, load_weights=False)
    return Clip(model, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32 (random weights)").to(device)


def device_and_clip(smoke: bool, name: str) -> tuple[torch.device, Clip] | None:
    """The CPU and the tiny CLIP for ``--smoke``; the GPU and a random ViT-B/32 otherwise; None (and
    one line saying so) when there is no GPU to measure."""
    if smoke:
        return torch.device("cpu"), build_test_tiny()
    if not torch.cuda.is_available():
        print(f"{name}: no CUDA GPU here, nothing measured (use --smoke for a CPU check of the code)")
        return None
    device = torch.device("cuda")
    return device, random_vit_b32(device)


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
    """One edit; ``on_step``: the editors' step-end callback."""
    if kind == "image":
        editor = ImageEditor(cfg, device=device, clip=clip)
        return editor, editor(inputs, callback=on_step)
    frames, data = inputs
    editor = VideoEditor(cfg, device=device, clip=clip)
    return editor, editor(frames, atlas=data, callback=on_step)


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


def _dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, recompiles) so far in this process, from dynamo's counters."""
    import torch._dynamo.utils

    counters = torch._dynamo.utils.counters
    return int(counters["stats"].get("unique_graphs", 0)), int(sum(counters["recompiles"].values()))


def run_mode(mode: str, clip: Clip, inputs, args, device: torch.device) -> dict:
    import torch._dynamo

    cfg = make_config(mode, args.warmup + args.steps, args.size, args.smoke, args.preset)
    if mode == "fast-cudagraphs":  # the capturable step: CUDA graphs and the draws made ahead
        cfg.runtime.cudagraphs = cfg.runtime.prefetch = True
    previous = os.environ.get("T2L_KERNELS")
    if mode == "fast-torch-kernels":
        os.environ["T2L_KERNELS"] = "torch"
    torch._dynamo.reset()  # each mode traces its own graphs (the kernel choice is fixed at trace time)
    stamps: dict[int, float] = {}
    counts: dict[str, tuple[int, int]] = {}
    last = args.warmup + args.steps - 1
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def on_step(state) -> None:  # the editors' step-end callback
        step = state.step
        # Clock reads only at the warm-up boundary and every --block steps (plus the last): the record
        # is not read, so this adds no sync of its own elsewhere.
        since = step - (args.warmup - 1)
        if step == 0 or since == 0 or (since > 0 and since % args.block == 0) or step == last:
            _sync(device)
            stamps[step] = time.perf_counter()
            if since == 0:
                counts["warmup"] = _dynamo_counts()

    try:
        _sync(device)
        counts["start"] = _dynamo_counts()
        start = time.perf_counter()
        editor, result = edit_once(args.preset, cfg, device, clip, inputs, on_step)
        _sync(device)
        done = time.perf_counter()
        counts["end"] = _dynamo_counts()
    finally:
        if previous is None:
            os.environ.pop("T2L_KERNELS", None)
        else:
            os.environ["T2L_KERNELS"] = previous
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result.save(tmp)
        save_s = time.perf_counter() - t0
    marks = sorted(s for s in stamps if s >= args.warmup - 1)
    blocks = [(stamps[b] - stamps[a]) / (b - a) for a, b in zip(marks[:-1], marks[1:], strict=True) if b > a]
    window = (stamps[last] - stamps[args.warmup - 1]) / args.steps
    p20, p80 = quantiles(blocks)
    warmup_s = stamps[args.warmup - 1] - start  # editor set-up + the warm-up steps
    first_step_s = stamps[0] - start
    render_s = done - stamps[last]
    full = FULL_EDIT_STEPS[args.preset]
    graphs_warm = counts["warmup"][0] - counts["start"][0]
    return {
        "mode": mode,
        "engine": editor.engine.describe(),
        "steps_timed": args.steps,
        "ms_per_step": 1e3 * window,
        "ms_per_step_median": 1e3 * statistics.median(blocks),
        "ms_per_step_p20": 1e3 * p20,
        "ms_per_step_p80": 1e3 * p80,
        "first_step_s": first_step_s,
        "warmup_s": warmup_s,
        "compile_s": max(0.0, warmup_s - args.warmup * window),
        "graphs_compiled_warmup": graphs_warm,
        "graphs_compiled_after_warmup": counts["end"][0] - counts["warmup"][0],
        "recompiles_after_warmup": counts["end"][1] - counts["warmup"][1],
        "render_s": render_s,
        "save_s": save_s,
        "projected_edit_s": warmup_s + (full - args.warmup) * window + render_s + save_s,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "nonfinite_steps": editor.engine.nonfinite_steps,
        "final_loss": result.losses[-1]["loss"],
    }


def warm_start(args) -> dict:
    """The fast mode in a fresh process on the same inductor cache: what a user's second edit pays."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--preset", args.preset, "--modes", "fast", "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--size", str(args.size), "--block", str(args.block), "--no-flops", "--child",
    ]  # fmt: skip
    if args.smoke:
        cmd.append("--smoke")
    if args.cache_dir:
        cmd += ["--cache-dir", str(args.cache_dir)]
    with tempfile.TemporaryDirectory() as tmp:
        cmd += ["--out", tmp]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"error": proc.stderr[-2000:]}
        report = json.loads(next(Path(tmp).glob("edit-*.json")).read_text())
    row = report["modes"][0]
    return {
        "process_start_to_first_step_s": report["process_start_to_editor_s"] + row["first_step_s"],
        "first_step_s": row["first_step_s"],
        "warmup_s": row["warmup_s"],
        "compile_s": row["compile_s"],
        "ms_per_step": row["ms_per_step"],
        "recompiles_after_warmup": row["recompiles_after_warmup"],
        "process_wall_s": wall,
    }


def input_label(report_input: list[int], preset_name: str) -> str:
    if preset_name == "image":
        h, w = report_input
        return f"{h}x{w} image (short side {min(h, w)})"
    t, _, h, w = report_input
    return f"{t}-frame {w}x{h} video"


def markdown(report: dict) -> str:
    m = report["meta"]
    lines = [
        f"# End-to-end {report['preset']} edit benchmark: {report['input_label']} ({m['device']})",
        "",
        f"torch {m['torch']}, triton {m['triton']}, commit {m['commit']}, {m['timestamp']}. "
        f"CLIP: {report['clip']}. Input {report['input_label']}, {report['views']} views, "
        f"{report['steps_timed']} timed steps after {report['warmup']} warm-up steps "
        f"(clock read every {report['block']} steps, device synchronised).",
        "",
        "| mode | engine | ms/step (block median, p20–p80) | warm-up s (compile s) | graphs in warm-up "
        f"| recompiles after | render + save s | projected {report['full_steps']}-step edit s "
        "| peak GB | TFLOP/s | % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["modes"]:
        peak = "–" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
        frac = "–" if r.get("fraction_of_peak") is None else f"{100 * r['fraction_of_peak']:.1f}"
        lines.append(
            f"| {r['mode']} | {r['engine']} | {r['ms_per_step']:.1f} ({r['ms_per_step_median']:.1f}, "
            f"{r['ms_per_step_p20']:.1f}–{r['ms_per_step_p80']:.1f}) "
            f"| {r['warmup_s']:.1f} ({r['compile_s']:.1f}) "
            f"| {r['graphs_compiled_warmup']} | {r['recompiles_after_warmup']} "
            f"| {r['render_s']:.2f} + {r['save_s']:.2f} | {r['projected_edit_s']:.1f} | {peak} "
            f"| {r['tflops']:.2f} | {frac} |"
        )
    first_fast = next((r for r in report["modes"] if r["mode"].startswith("fast")), None)
    if first_fast is not None:
        lines += [
            "",
            f"Compile, cold cache (first fast mode of the process, cache {report['cache_state']}): "
            f"{first_fast['compile_s']:.1f} s of a {first_fast['warmup_s']:.1f} s warm-up.",
        ]
    ws = report.get("warm_start")
    if ws and "error" not in ws:
        lines.append(
            f"Compile, warm cache (a fresh process on the same cache): {ws['compile_s']:.1f} s of a "
            f"{ws['warmup_s']:.1f} s warm-up; process start to first step "
            f"{ws['process_start_to_first_step_s']:.1f} s; "
            f"{ws['recompiles_after_warmup']} recompiles after warm-up."
        )
    elif ws:
        lines.append(f"Warm-cache run failed: {ws['error'][-300:]}")
    if "speedup" in report:
        s = report["speedup"]
        lines += [
            "",
            f"Fast/reference speed-up: {s['per_step']:.1f}x per step, "
            f"{s['per_edit']:.1f}x per {report['full_steps']}-step edit "
            "(warm-up, render and saving included).",
        ]
    if report["flops_per_step"]:
        lines += [
            "",
            f"FLOPs per step (one example, flop counter): {report['flops_per_step'] / 1e12:.3f} TFLOP.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("image", "video"), default="image")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per mode (after warm-up)")
    parser.add_argument("--warmup", type=int, default=8, help="warm-up steps per mode (compile happens here)")
    parser.add_argument("--block", type=int, default=10, help="read the clock every N timed steps")
    parser.add_argument("--size", type=int, default=512, help="short side of the (3:2) image; 512: 512x768")
    parser.add_argument("--modes", default="reference,fast", help="comma-separated: reference, fast, ...")
    parser.add_argument("--kernel-ablation", action="store_true", help="also fast mode with torch references")
    parser.add_argument("--cudagraphs-ablation", action="store_true", help="also fast mode with CUDA graphs")
    parser.add_argument("--warm-start", action="store_true", help="also a fresh process on the warm cache")
    parser.add_argument("--cache-dir", type=Path, default=None, help="TORCHINDUCTOR_CACHE_DIR for this run")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--smoke", action="store_true", help="two tiny CPU steps per mode (checks this code)")
    args = parser.parse_args(argv)

    if args.cache_dir:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache_dir)
    chosen = device_and_clip(args.smoke, "bench_edit")
    if chosen is None:
        return 0
    device, clip = chosen
    if args.smoke:
        args.steps, args.warmup, args.size, args.block = 2, 1, 160, 1
    if args.steps < 1 or args.warmup < 1 or args.block < 1:
        parser.error("--steps, --warmup and --block must be >= 1")
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_CACHE_DIR))
    cache_state = "empty" if not cache.exists() or not any(cache.iterdir()) else "already populated"
    inputs = make_input(args.preset, args.size, args.smoke)
    editor_ready_s = time.perf_counter() - _PROCESS_T0
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.kernel_ablation:
        modes.append("fast-torch-kernels")
    if args.cudagraphs_ablation:
        modes.append("fast-cudagraphs")
    flops = 0.0 if args.no_flops else count_flops(clip, inputs, args, device)
    peak = device_peak_flops(device)
    rows: list[dict] = []
    image_input = list(inputs.shape[-2:]) if args.preset == "image" else list(inputs[0].shape)
    report = {
        "meta": metadata(device),
        "clip": clip.name + ("" if args.smoke else ", random weights: timing only"),
        "preset": args.preset,
        "full_steps": FULL_EDIT_STEPS[args.preset],
        "input": image_input,
        "input_label": input_label(image_input, args.preset),
        "views": make_config("fast", 1, args.size, args.smoke, args.preset).views.n_aug,
        "steps_timed": args.steps,
        "warmup": args.warmup,
        "block": args.block,
        "cache_dir": str(cache),
        "cache_state": cache_state,
        "process_start_to_editor_s": editor_ready_s,
        "flops_per_step": flops,
        "device_peak_flops": peak,
        "modes": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"edit-{args.preset}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"

    def write() -> None:
        """Rewritten after every mode: a run stopped half-way keeps the modes it finished."""
        by_mode = {r["mode"]: r for r in rows}
        if "reference" in by_mode and "fast" in by_mode:
            ref, fast = by_mode["reference"], by_mode["fast"]
            report["speedup"] = {
                "per_step": ref["ms_per_step"] / fast["ms_per_step"],
                "per_edit": ref["projected_edit_s"] / fast["projected_edit_s"],
            }
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2))
        (args.out / f"{name}.md").write_text(markdown(report))

    for mode in modes:
        row = run_mode(mode, clip, inputs, args, device)
        row["tflops"] = flops / (row["ms_per_step"] / 1e3) / 1e12
        row["fraction_of_peak"] = None if peak is None else row["tflops"] * 1e12 / peak
        rows.append(row)
        write()
        print(
            f"{mode:>20}: {row['ms_per_step']:.1f} ms/step, warm-up {row['warmup_s']:.1f} s "
            f"(compile {row['compile_s']:.1f} s), {row['recompiles_after_warmup']} recompiles after warm-up, "
            f"projected edit {row['projected_edit_s']:.1f} s",
            flush=True,
        )
    if args.warm_start and not args.child:
        report["warm_start"] = warm_start(args)
        ws = report["warm_start"]
        print("         warm start: " + (
            f"{ws['process_start_to_first_step_s']:.1f} s to the first step, compile {ws['compile_s']:.1f} s"
            if "error" not in ws else "FAILED " + ws["error"][-500:]
        ))  # fmt: skip
    write()
    print(f"{report['input_label']}: wrote {args.out}/{name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
