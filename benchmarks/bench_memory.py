"""Activation memory of one training step, measured on any device (a CPU works).

    python benchmarks/bench_memory.py [--size 512] [--precision fp32,bf16] [--clip vit-b32|test-tiny]

Counts the bytes of every tensor autograd saves for the backward pass during one image-edit step
(the generator on one training crop, the batched CLIP views and the structure tokens), through
``torch.autograd.graph.saved_tensors_hooks``; storages are counted once and the frozen weights are
excluded. This is the part of the peak GPU memory that grows with image size and view count; the
GPU peak adds weights, optimiser state, the allocator's cache and temporary buffers, so it is not a
GPU figure. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_edit import random_vit_b32, synthetic_image  # noqa: E402
from common import metadata  # noqa: E402

from t2l_fast import preset  # noqa: E402
from t2l_fast.losses import Layers  # noqa: E402
from t2l_fast.models.clip import build_test_tiny  # noqa: E402
from t2l_fast.models.generator import Generator  # noqa: E402
from t2l_fast.pipeline.base import Editor  # noqa: E402
from t2l_fast.pipeline.engine import Engine  # noqa: E402


def saved_bytes(step, exclude: set[int]) -> tuple[int, float]:
    """(bytes saved for backward by ``step()``, seconds it took)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    elapsed = time.perf_counter() - start
    loss.backward()
    return sum(storages.values()), elapsed


def measure(clip, cfg, precision: str, image: torch.Tensor, device: torch.device) -> tuple[int, float]:
    """Saved-for-backward bytes of one fast-path step on ``image`` at ``precision``."""
    cfg.runtime.mode, cfg.runtime.precision, cfg.runtime.compile = "fast", precision, "off"
    engine = Engine(cfg.runtime, device)
    torch.manual_seed(0)
    generator = Generator(cfg.generator).to(device)
    objective = Editor.objective(clip, cfg, engine)
    weights = {p.untyped_storage().data_ptr() for p in [*clip.parameters(), *generator.parameters()]}

    def step() -> torch.Tensor:
        with engine.autocast():
            layers = Layers.from_rgba(generator(image).float(), image)
            return objective(layers, 1, torch.Generator().manual_seed(0))["loss"]

    return saved_bytes(step, weights)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512, help="short side of the training crop")
    parser.add_argument("--precision", default="fp32,bf16")
    parser.add_argument("--clip", choices=("vit-b32", "test-tiny"), default="vit-b32")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip = random_vit_b32(device) if args.clip == "vit-b32" else build_test_tiny().to(device)
    image = synthetic_image(args.size)[None].to(device)  # (1, 3, S, 1.5 S)
    cfg = preset("image")
    cfg.prompt, cfg.roi_prompt = "a golden horse", "horse"
    cfg.loss.bootstrap_steps = 0  # the relevancy map is computed without keeping activations
    rows = []
    for precision in args.precision.split(","):
        total, seconds = measure(clip, cfg, precision, image, device)
        rows.append({"precision": precision, "saved_gb": total / 2**30, "forward_s": seconds})
        h, w = image.shape[-2:]
        print(f"{precision}: {total / 2**30:.2f} GB saved for backward (one step, {h}x{w})")
    report = {
        "meta": metadata(device),
        "clip": clip.name,
        "crop": list(image.shape[-2:]),
        "views": cfg.views.n_aug,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"memory-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
