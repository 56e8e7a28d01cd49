"""Variants trained together against the same variants trained one by one, in one process.

    python benchmarks/bench_variants.py [--ns 1,2,4,8] [--steps 20] [--size 512] [--smoke|--cpu]

For each N: N prompt variants of one 512×768 image, first as N lone edits, then as one group
(``runtime.variants_per_run = N``; on a GPU the generators stacked, ``runtime.stack_variants``),
each after an untimed warm-up of the same shape (compile). Reports seconds per step of the group,
per variant, the ratio of N lone edits to the group (> 1: the group is faster), the group against
ONE lone edit (the issue's goal: N = 4 in <= 2x, N = 8 in <= 3x on a GPU) and peak GPU memory.
Writes ``variants-<stamp>.json`` and ``.md`` stamped with device, versions and commit.

Without a GPU it says so and exits 0. ``--cpu`` measures on this CPU at CI size (the tiny test
CLIP, a narrow generator, 256 px): there the work is compute-bound, so the gain is only what the
group shares (draws, crops, the source side); ``--smoke`` is the shortest such run (a code check).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_edit import _sync, device_and_clip, make_config, synthetic_image  # noqa: E402
from common import metadata  # noqa: E402

from t2l_fast import ImageEditor  # noqa: E402

PROMPTS = ["a golden horse", "an ice horse", "a wooden horse", "a marble horse", "a glass horse"]
PROMPTS += ["a bronze horse", "a paper horse", "a neon horse"]


def timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(n: int, editor: ImageEditor, image, steps: int, device: torch.device) -> dict:
    prompts = PROMPTS[:n]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    editor.config.optim.steps = 2  # warm-up: the lone shape and the group's shape compiled
    editor(image, prompt=prompts[0])
    editor(image, prompt=prompts)
    editor.config.optim.steps = steps
    lone = timed(lambda: [editor(image, prompt=p) for p in prompts], device)
    lone_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    group = timed(lambda: editor(image, prompt=prompts), device)
    group_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "n": n,
        "steps": steps,
        "lone_seconds": lone,
        "group_seconds": group,
        "group_ms_per_step": 1000 * group / steps,
        "group_ms_per_step_per_variant": 1000 * group / steps / n,
        "lone_over_group": lone / group,
        "peak_lone_gib": None if lone_peak is None else lone_peak / 2**30,
        "peak_group_gib": None if group_peak is None else group_peak / 2**30,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ns", default="1,2,4,8", help="group sizes")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per edit")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cpu", action="store_true", help="measure on this CPU at CI size")
    parser.add_argument("--smoke", action="store_true", help="the shortest CPU run (checks this code)")
    parser.add_argument(
        "--stack", default="auto", choices=["auto", "on", "off"], help="runtime.stack_variants"
    )
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.ns.split(",")]
    on_cpu = args.cpu or args.smoke
    if args.smoke:
        ns, args.steps, args.size = [n for n in ns if n <= 2] or [1], 2, 160
    elif args.cpu:
        args.size = min(args.size, 256)
    found = device_and_clip(on_cpu, "bench_variants")
    if found is None:
        return 0
    device, clip = found
    cfg = make_config("fast", args.steps, args.size, on_cpu)
    cfg.roi_prompt = None  # a plain prompt edit
    cfg.runtime.stack_variants = args.stack
    image = synthetic_image(args.size)
    rows = []
    for n in ns:
        run_cfg = copy.deepcopy(cfg)
        run_cfg.runtime.variants_per_run = n
        rows.append(measure(n, ImageEditor(run_cfg, device=device, clip=clip), image, args.steps, device))
        one = rows[0]["lone_seconds"] / rows[0]["n"] if rows[0]["n"] == 1 else None
        if one:
            rows[-1]["group_over_one_edit"] = rows[-1]["group_seconds"] / one
        print(json.dumps(rows[-1]), flush=True)  # a partial result survives a timeout
    size = [args.size, args.size * 3 // 2]
    report = {"meta": metadata(device), "size": size, "stack": args.stack, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"variants-{stamp}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# variants trained together: {report['meta'].get('device', device.type)}, {size[0]}x{size[1]}, "
        f"{args.steps} steps, stack_variants {args.stack}",
        "",
        "| N | group ms/step | per variant | N lone / group | group / one edit | peak GiB (lone, group) |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        ratio = r.get("group_over_one_edit")
        peaks = "—" if r["peak_group_gib"] is None else f"{r['peak_lone_gib']:.2f}, {r['peak_group_gib']:.2f}"
        lines.append(
            f"| {r['n']} | {r['group_ms_per_step']:.1f} | {r['group_ms_per_step_per_variant']:.1f} | "
            f"{r['lone_over_group']:.2f} | {'—' if ratio is None else f'{ratio:.2f}'} | {peaks} |"
        )
    (out / f"variants-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
