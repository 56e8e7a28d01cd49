"""The fast path's compile plan at the real sizes: graphs, recompiles and eager device ops per step.

    python benchmarks/compile_plan.py [--steps 40] [--backend aot_eager] [--profile-steps 3] [--out DIR]

A 512x768 image edit with 16 views and an ROI prompt, the real ViT-B/32 structure (12 blocks, 32-px
patches) and the real generator structure (7 scales), both with narrow widths: how many graphs
torch.compile makes and when (all of them in the first step is the plan), and how many device
operations run outside the compiled regions in a steady step (each would be a kernel launch on a
GPU). Graph counts do not depend on the widths, so this runs on a CPU with ``aot_eager`` (dynamo and
AOT autograd, no code generation) and shows there what a GPU's first call would compile; on a GPU
``--backend inductor --full-width`` measures the real thing.

On the CPU the oneDNN convolution is switched off for the run: its choice of kernel by input size
is a CPU-only guard (a CUDA convolution takes cuDNN at every size), which would otherwise add CPU-only
recompiles.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch._dynamo
import torch._dynamo.utils
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_edit import random_vit_b32, synthetic_image  # noqa: E402
from common import metadata  # noqa: E402

from t2l_fast import ImageEditor, preset  # noqa: E402
from t2l_fast.models.clip import Clip  # noqa: E402

# ops that only make a view or allocate: no kernel launch on a GPU
METADATA_OPS = {
    "aten::" + name
    for name in (
        "view view_as _unsafe_view reshape _reshape_alias as_strided slice select expand expand_as t "
        "transpose permute unsqueeze squeeze detach alias lift_fresh split split_with_sizes unbind chunk "
        "narrow flatten unflatten contiguous to empty empty_like empty_strided resize_ set_ diagonal "
        "_unsafe_split _local_scalar_dense item is_nonzero result_type"
    ).split()
}
COMPILED = ("Torch-Compiled Region", "CompiledFunction")  # dynamo regions and their AOT forward/backward
HOST = "t2l_fast.host"  # work on host tensors (the random draws): no device op on a GPU
# A planning figure, not a measurement: the seconds one inductor compile of a region (forward and
# backward, dynamic shapes) is allowed on a GPU; gpu_check's headline limit holds the counted graphs
# at this rate. The GPU run measures the real cold compile (bench_edit's compile_s).
PLAN_S_PER_GRAPH = 45


def narrow_vit_b32(width: int = 64) -> Clip:
    """ViT-B/32's structure (12 blocks, 32-px patches, 224-px positional grid) with a narrow width."""
    import open_clip

    vision = {"image_size": 224, "layers": 12, "width": width, "head_width": 32, "patch_size": 32}
    text = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.model.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    return Clip(model, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32 structure, narrow", is_test_model=True)


def real_size_config(steps: int, backend: str, channels: int = 8, source_every: int = 15):
    """The image preset at 512 px (a 512x768 input), 16 views, an ROI prompt, fast mode compiled with
    ``backend``; the generator with its 7 scales and ``channels`` wide."""
    cfg = preset("image")
    cfg.prompt, cfg.roi_prompt = "a golden horse", "horse"
    cfg.optim.steps = steps
    cfg.data.source_every = source_every  # the un-augmented input after the warm-up too
    cfg.generator.channels_down = cfg.generator.channels_up = channels
    cfg.runtime.mode, cfg.runtime.compile, cfg.runtime.compile_backend = "fast", "on", backend
    return cfg


def eager_device_ops(events) -> Counter:
    """Operations dispatched outside any compiled region that would launch device work: top-level
    ``aten::`` (and fused ``t2l_fast::``) ops, counting an op once with what it calls inside, and not
    counting ops that only make views or allocate, nor the host-side draws (marked ``t2l_fast.host``:
    on a CPU both sides are the CPU, so the mark tells them apart)."""

    def is_op(evt) -> bool:
        return evt.name.startswith(("aten::", "t2l_fast::"))

    def launches(evt) -> bool:
        return evt.name not in METADATA_OPS or any(launches(c) for c in evt.cpu_children if is_op(c))

    counts: Counter = Counter()
    for evt in events:
        if not is_op(evt):
            continue
        parent, top = evt.cpu_parent, True
        while parent is not None:
            if parent.name.startswith(("aten::", "t2l_fast::", HOST)) or parent.name.startswith(COMPILED):
                top = False
                break
            parent = parent.cpu_parent
        if top and launches(evt):
            counts[evt.name] += 1
    return counts


def measure(cfg, clip: Clip, device: torch.device, profile_steps: int = 3) -> dict:
    """Run the edit; graphs after each step, recompiles, and the eager device ops of the last
    ``profile_steps`` steps (profiled; steady steps: no source example among them)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    steps = cfg.optim.steps
    first_profiled = steps - profile_steps
    graphs, stamps = [], []
    prof = profile(activities=[ProfilerActivity.CPU])
    start = time.perf_counter()

    def on_step(state) -> None:  # the editors' step-end callback
        step = state.step
        stamps.append(time.perf_counter())
        graphs.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        if step == first_profiled - 1:
            prof.__enter__()
        if step == steps - 1:  # the profile holds whole steps only (not the final render and copy)
            prof.__exit__(None, None, None)

    cpu_conv = torch.backends.mkldnn.flags(enabled=device.type != "cpu")
    with cpu_conv:
        result = ImageEditor(cfg, device=device, clip=clip)(synthetic_image(512), callback=on_step)
    ops = eager_device_ops(prof.events())
    seconds = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    return {
        "steps": len(result.losses),
        "graphs_per_step": graphs,
        "graphs": graphs[-1],
        "graphs_after_first_step": graphs[-1] - graphs[0],
        "recompiles": sum(torch._dynamo.utils.counters["recompiles"].values())
        if "recompiles" in torch._dynamo.utils.counters
        else None,
        "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
        "eager_ops_per_step": sum(ops.values()) / profile_steps,
        "eager_ops_top": ops.most_common(25),
        "first_step_s": seconds[0],
        "steady_step_s": sorted(seconds[1:])[len(seconds[1:]) // 2] if len(seconds) > 1 else None,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--backend", default="aot_eager")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--source-every", type=int, default=15, help="feed the whole input every N steps")
    p.add_argument("--full-width", action="store_true", help="real ViT-B/32 and generator widths")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    clip = random_vit_b32(device) if args.full_width else narrow_vit_b32().to(device)
    channels = 128 if args.full_width else 8
    cfg = real_size_config(args.steps, args.backend, channels=channels, source_every=args.source_every)
    report = {"meta": metadata(device), "backend": args.backend, "full_width": args.full_width}
    report.update(measure(cfg, clip, device, args.profile_steps))
    report["plan_s_per_graph"] = PLAN_S_PER_GRAPH
    report["planned_worst_cold_compile_s"] = PLAN_S_PER_GRAPH * report["graphs"]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"compile-plan-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "eager_ops_top"}, indent=2))
    print("eager ops per steady step, top:", report["eager_ops_top"][:15])
    print(
        f"plan: {report['graphs']} graphs, all in step 1: {report['graphs_after_first_step'] == 0}; "
        f"a GPU's cold compile at <= {PLAN_S_PER_GRAPH} s a graph (a planning figure) costs <= "
        f"{report['planned_worst_cold_compile_s']} s of the headline part's limit"
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
