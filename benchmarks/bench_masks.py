"""Object-mask benchmark (``t2l_fast.fit.masks_from_box`` / ``masks_from_motion``): quality and time.

    python benchmarks/bench_masks.py [--video ../shared/data/videos/car-turn ...] [--size 768x432]
                                     [--frames N] [--no-synthetic] [--no-shadows] [--out benchmarks/results]

For each clip (a folder with frames/ and masks/, the annotated masks as truth) and for the synthetic
scene of ``t2l_fast.synthetic.sample_clip`` (exact masks; at the size and at half of it): the DIS
flow the atlas fit computes anyway (its seconds reported apart), then ``--object`` (the box drawn
around the first annotated mask) and ``--masks auto``, each with its region similarity J (mean IoU
over frames) and its seconds beyond the flow; for scale, J of the first frame's box held still.
``--no-shadows`` measures both modes with the cast shadow left in (``shadows=False``: without
``t2l_fast.fit.segment.remove_shadows``).
CPU only (OpenCV). Prints a table and writes ``masks-<stamp>.json`` with versions and commit.
Default: car-turn, all 70 frames at 768x432.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from common import metadata  # noqa: E402

from t2l_fast.fit import (  # noqa: E402
    NoMovingObject,
    compute_flow,
    masks_from_box,
    masks_from_motion,
    read_masks,
    region_similarity,
)
from t2l_fast.synthetic import sample_clip  # noqa: E402
from t2l_fast.video_io import parse_size, read_video  # noqa: E402

DEFAULT_VIDEO = REPO.parent / "shared" / "data" / "videos" / "car-turn"


def to_uint8(frames: torch.Tensor) -> torch.Tensor:
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8)


def box_of(mask: torch.Tensor) -> tuple[int, int, int, int]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1


def measure(name: str, frames: torch.Tensor, truth: torch.Tensor, shadows: bool = True) -> dict:
    """Flow, both modes and the still-box reference on one clip; prints and returns its record."""
    if not truth[0].any():
        raise SystemExit(f"{name}: the first annotated mask is empty; --object needs a box on frame 0")
    flow = compute_flow(frames)
    box = box_of(truth[0])
    t0 = time.perf_counter()
    by_box = masks_from_box(frames, box, flow=flow, shadows=shadows)
    box_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        by_motion = masks_from_motion(frames, flow=flow, shadows=shadows)
    except NoMovingObject:
        by_motion = torch.zeros_like(truth)
    motion_s = time.perf_counter() - t0
    x, y, w, h = box
    still = torch.zeros_like(truth)
    still[:, y : y + h, x : x + w] = True
    record = {
        "clip": name,
        "frames": int(frames.shape[0]),
        "size": [int(frames.shape[3]), int(frames.shape[2])],
        "shadows": shadows,
        "flow_s": round(flow.seconds, 2),
        "object_box": list(box),
        "object_J": round(region_similarity(by_box, truth), 4),
        "object_s": round(box_s, 2),
        "auto_J": round(region_similarity(by_motion, truth), 4),
        "auto_s": round(motion_s, 2),
        "still_box_J": round(region_similarity(still, truth), 4),
    }
    print(
        f"{name}: flow {record['flow_s']} s | --object J {record['object_J']:.3f} in {record['object_s']} s"
        f" | --masks auto J {record['auto_J']:.3f} in {record['auto_s']} s"
        f" | box held still J {record['still_box_J']:.3f}",
        flush=True,
    )
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--video", type=Path, nargs="*", default=[DEFAULT_VIDEO], help="folders with frames/, masks/"
    )
    p.add_argument("--size", default="768x432", help="WIDTHxHEIGHT the clips are measured at")
    p.add_argument("--frames", type=int, default=None, help="only the first N frames (default all)")
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic scenes")
    p.add_argument("--no-shadows", action="store_true", help="leave the cast shadows in the masks")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = p.parse_args()
    size = parse_size(args.size)
    shadows = not args.no_shadows

    records = []
    for video in args.video:
        frames, _ = read_video(video / "frames", max_frames=args.frames, size=size)
        native, _ = read_video(video / "frames", max_frames=1, size=None)
        truth = read_masks(
            video / "masks",
            frames.shape[0],
            size,
            (native.shape[3], native.shape[2]),
            frames_truncated=args.frames is not None,
        )
        records.append(measure(video.name, frames, truth, shadows))
    if not args.no_synthetic:  # the sample clip's scene: a cup sliding over a panning photograph
        frames, truth = sample_clip(24, size)
        records.append(measure(f"synthetic cup {size[0]}x{size[1]}", to_uint8(frames), truth, shadows))
        half = (size[1] // 2, size[0] // 2)  # the same scene, downscaled
        frames = F.interpolate(frames, size=half, mode="bilinear", antialias=True, align_corners=False)
        truth = F.interpolate(truth[:, None].float(), size=half, mode="area")[:, 0] > 0.5
        records.append(measure(f"synthetic cup {half[1]}x{half[0]}", to_uint8(frames), truth, shadows))

    print("\n| clip | frames | size | flow s | --object J | s | --masks auto J | s | box held still J |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in records:
        print(
            f"| {r['clip']} | {r['frames']} | {r['size'][0]}x{r['size'][1]} | {r['flow_s']} | "
            f"{r['object_J']:.3f} | {r['object_s']} | {r['auto_J']:.3f} | {r['auto_s']} | "
            f"{r['still_box_J']:.3f} |"
        )
    result = {
        "benchmark": "masks",
        "clips": records,
        "cpu_threads": torch.get_num_threads(),
        **metadata(torch.device("cpu")),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"masks-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
