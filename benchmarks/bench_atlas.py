"""Atlas-fit benchmark (``t2l_fast.fit.fit_atlas``): reconstruction PSNR against fitting time.

    python benchmarks/bench_atlas.py [--video FOLDER] [--device auto]
                                     [--frames N] [--size WxH] [--iterations 500,1000,2000]
                                     [--batch B] [--threads N] [--out benchmarks/results]

--video: a folder of frames, or a folder holding frames/ and masks/ (default: the shipped sample clip
t2l_fast/samples/clip, 24 frames with masks). The figures in the README are of DAVIS's car-turn (not
shipped): --video PATH/car-turn, a folder with frames/ and masks/ (e.g. the DAVIS 2017 480p JPEGs and
annotations of car-turn copied into those two folders).

On a GPU (default): up to 70 frames at 768x432 of the video with its masks, one fit per iteration budget
(default 500, 1000, 2000), each from scratch: DIS flow seconds, compile seconds (excluded from the fit
time), fit seconds, export seconds and the PSNR of the exported (discretised) atlas's reconstruction.
On the CPU: a reduced run (default 8 frames at 192x108, budgets 100, 250, 500). Prints a table and
writes ``atlas-<stamp>.json`` with device, versions and commit. NLA's published cost for comparison:
about 10 hours per 70-frame clip at 768x432 (400k iterations) plus RAFT and Mask R-CNN preprocessing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import metadata  # noqa: E402

from t2l_fast.fit import FitConfig, compute_flow, fit_atlas, read_masks  # noqa: E402
from t2l_fast.video_io import parse_size, read_video  # noqa: E402

DEFAULT_VIDEO = REPO / "t2l_fast" / "samples" / "clip"  # shipped; car-turn: --video PATH/car-turn


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--video",
        type=Path,
        default=DEFAULT_VIDEO,
        help="folder of frames, or with frames/ and masks/ (default: the sample clip; car-turn: "
        "--video PATH/car-turn)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--frames", type=int, default=None)
    p.add_argument("--size", default=None)
    p.add_argument("--iterations", default=None, help="comma-separated budgets")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (torch.set_num_threads)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    if not args.video.exists():  # one line (argparse's usage + error, exit 2), not a traceback
        p.error(
            f"--video {args.video} not found: give a video, a folder of frames or one with frames/, masks/"
        )

    if args.device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(args.device)
    gpu = dev.type == "cuda"
    frames_n = args.frames or (70 if gpu else 8)
    size = parse_size(args.size) if args.size else ((768, 432) if gpu else (192, 108))
    budgets = [int(b) for b in (args.iterations or ("500,1000,2000" if gpu else "100,250,500")).split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if not gpu:
        print(
            f"no GPU: reduced CPU run ({frames_n} frames at {size[0]}x{size[1]}, "
            f"{torch.get_num_threads()} threads)"
        )

    frames_dir = args.video / "frames" if (args.video / "frames").is_dir() else args.video
    frames, _ = read_video(frames_dir, max_frames=frames_n, size=size)
    masks = None
    if (args.video / "masks").is_dir():
        native, _ = read_video(frames_dir, max_frames=1, size=None)
        native_size = (native.shape[3], native.shape[2])
        masks = read_masks(args.video / "masks", frames.shape[0], size, native_size, frames_truncated=True)
    flow = compute_flow(frames)  # shared by the runs; its time is reported once

    rows = []
    for iters in budgets:
        cfg = FitConfig(iterations=iters, batch=args.batch)
        if gpu:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        _, stats = fit_atlas(frames, masks, cfg, device=dev, progress=False, flow=flow)
        if gpu:
            torch.cuda.synchronize(dev)
        total = time.perf_counter() - t0
        rows.append(
            {
                "iterations": iters,
                "batch": cfg.batch or (65536 if gpu else 8192),
                "fit_s": round(stats.fit_seconds, 2),
                "compile_s": round(stats.compile_seconds, 2),
                "export_s": round(stats.export_seconds, 2),
                "total_s": round(total, 2),
                "ms_per_it": round(1e3 * stats.fit_seconds / max(iters, 1), 2),
                "psnr_db": round(stats.psnr, 2),
                "train_psnr_db": round(stats.train_psnr, 2),
                "peak_mem_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2) if gpu else None,
                "history": stats.history,
            }
        )
        print(
            f"{iters:6d} it  fit {stats.fit_seconds:7.1f} s  ({rows[-1]['ms_per_it']:.1f} ms/it)  "
            f"PSNR {stats.psnr:6.2f} dB",
            flush=True,
        )

    result = {
        "benchmark": "atlas_fit",
        "video": str(args.video),
        "frames": int(frames.shape[0]),
        "size": list(size),
        "masks": masks is not None,
        "threads": torch.get_num_threads(),
        "flow_s": round(flow.seconds, 2),
        "flow_consistent": round(flow.consistent_fraction, 3),
        "runs": rows,
        **metadata(dev),
    }
    print(f"\nDIS flow: {flow.seconds:.1f} s for {frames.shape[0] - 1} pairs x 2 directions")
    print("| iterations | fit s | compile s | export s | ms/it | PSNR dB |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['iterations']} | {r['fit_s']} | {r['compile_s']} | {r['export_s']} | "
            f"{r['ms_per_it']} | {r['psnr_db']} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = args.out / f"atlas-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
