"""Fit a layered atlas (background + one foreground) to a video in minutes: :func:`fit_atlas`.

The losses are NLA's (Kasten et al. 2021), on the grid model of :mod:`t2l_fast.fit.model`; each step
draws ``batch`` random pixels p (a quarter from around the masks) and evaluates the model at p, at its
right and lower neighbours, and at the ends of its forward and backward flow vectors (one call per grid
for all five point sets: fixed shapes, so the step compiles):

    rgb          |I(p) - Î(p)|²                                         reconstruction
    gradient     |∂x I - ∂x Î|² + |∂y I - ∂y Î|²  (1-pixel differences)  colour gradients
    flow         A·|M_fg(p+f, t±1) - M_fg(p, t)| + (1-A)·|M_bg(..) - M_bg(..)|, in pixels, on consistent flow
    alpha_flow   |A(p+f, t±1) - A(p, t)|                                 alpha follows the flow
    rigidity     |JᵀJ|_F + |(JᵀJ)⁻¹|_F - 2√2, J = ∂M/∂p in pixels/pixel   locally rigid mappings
    sparsity     (1-A)·|C_fg(M_fg)|²                                    foreground atlas blank where unused
    bootstrap    BCE(A, mask), during the first ``bootstrap_until`` (15%) of the iterations

Weights are NLA's divided by its rgb weight 5000 (rgb 1, gradient 0.2, flow 1e-3, alpha flow ≈ 0.01,
rigidity 2e-4, sparsity 0.2, bootstrap 0.4). Adam with per-group learning rates decaying
exponentially to ``lr_final`` of their start value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from t2l_fast.config import FitConfig, RuntimeConfig
from t2l_fast.device import resolve_device
from t2l_fast.io import InputError, atomic_path
from t2l_fast.models.atlas import AtlasData
from t2l_fast.pipeline.engine import Engine

from .flow import FlowField, chain_similarities, compute_flow
from .model import LayeredGridModel
from .objective import FitData, as_float, as_uint8, psnr_db, step_losses

log = logging.getLogger(__name__)

#: Name of the resumable training state inside ``resume_dir``.
CHECKPOINT_NAME = "fit_state.pt"
#: Atlas resolution R of the reference at 768×432 frames; scaled with the frame size by default.
REFERENCE_GRID = 2000
REFERENCE_SIZE = 768


@dataclass
class FitStats:
    """What a fit did and how well: PSNRs in dB of the exported (discretised) atlas against the frames."""

    psnr: float = float("nan")
    psnr_per_frame: list[float] = field(default_factory=list)
    train_psnr: float = float("nan")  # batch PSNR over the last ``log_every`` steps of training
    iterations: int = 0  # iterations done in total (all runs)
    start_iteration: int = 0  # where this run started (> 0 when resumed)
    interrupted: bool = False
    has_foreground: bool = False
    fit_seconds: float = 0.0  # this run's optimisation
    flow_seconds: float = 0.0
    export_seconds: float = 0.0
    compile_seconds: float = 0.0
    flow_consistent: float = float("nan")  # fraction of flow vectors passing the check
    grid: int = 0
    device: str = "cpu"
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (iteration, seconds, psnr)

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def check_inputs(frames: torch.Tensor, masks: torch.Tensor | None) -> None:
    """Raise :class:`InputError` for fewer than 3 frames, masks of the wrong shape, or masks that are
    empty in every frame. frames (T, 3, H, W); masks (T, H, W)."""
    if frames.dim() != 4 or frames.shape[1] != 3:
        raise InputError(f"frames must be (T, 3, H, W) RGB, got {tuple(frames.shape)}")
    t, _, h, w = frames.shape
    if t < 3:
        raise InputError(f"the video has {t} frame(s); fitting an atlas needs at least 3")
    if h < 8 or w < 8:
        raise InputError(f"frames of {w}x{h} are too small to fit an atlas (at least 8x8)")
    if masks is None:
        return
    if masks.dim() != 3 or masks.shape[0] != t:
        raise InputError(f"{masks.shape[0] if masks.dim() else 0} masks given for {t} frames")
    if tuple(masks.shape[1:]) != (h, w):
        raise InputError(f"masks are {masks.shape[2]}x{masks.shape[1]} but frames are {w}x{h}")
    if not bool((masks > 0.5).any()):
        raise InputError(
            "the masks are empty in every frame: a foreground layer needs the object marked in at least one"
        )


def _fingerprint(frames: torch.Tensor, masks: torch.Tensor | None, cfg: FitConfig) -> str:
    h = hashlib.sha1()
    h.update(str(tuple(frames.shape)).encode())
    h.update(as_uint8(frames).cpu().contiguous().numpy().tobytes())
    if masks is not None:
        h.update((masks > 0.5).cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(cfg.shape_key(), sort_keys=True).encode())
    return h.hexdigest()


def default_grid(height: int, width: int) -> int:
    """Atlas resolution R for frames of this size: 2000 at 768 px (the reference), proportional."""
    return max(64, round(REFERENCE_GRID * max(height, width) / REFERENCE_SIZE))


def reconstruction_psnr(atlas: AtlasData, frames: torch.Tensor) -> tuple[float, list[float]]:
    """PSNR (dB) of the atlas's reconstruction A·fg + (1-A)·bg against ``frames`` (T, 3, H, W):
    over the whole video and per frame."""
    per = []
    sq = 0.0
    target = as_float(frames)
    for sl in atlas.chunks():
        sub = atlas.frames(sl)
        rec = sub.composite(sub.sample("foreground"), sub.sample("background")).clamp(0, 1)
        err = (rec - target[sl].to(rec.device)).square().flatten(1).mean(1)  # (n,)
        per += [psnr_db(float(e)) for e in err]
        sq += float(err.sum())
    return psnr_db(sq / atlas.num_frames), per


def reconstruct(atlas: AtlasData) -> torch.Tensor:
    """The atlas's reconstruction of the video: (T, 3, H, W) float in [0, 1]."""
    return atlas.composite(atlas.sample("foreground"), atlas.sample("background")).clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# The fit
# ----------------------------------------------------------------------------------------------


def _param_groups(model: LayeredGridModel, cfg: FitConfig) -> list[dict]:
    groups = [
        {"params": list(model.affine.parameters()), "lr": cfg.lr_affine, "name": "affine"},
        {"params": list(model.residual.parameters()), "lr": cfg.lr_residual, "name": "residual"},
        {"params": list(model.texture.parameters()), "lr": cfg.lr_texture, "name": "texture"},
    ]
    if len(model.alpha_logits):
        groups.append({"params": list(model.alpha_logits.parameters()), "lr": cfg.lr_alpha, "name": "alpha"})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def _save_state(path: Path, model, opt, iteration: int, fingerprint: str, stats: FitStats) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "iteration": iteration,
        "fingerprint": fingerprint,
        "history": stats.history,
        "rng": torch.get_rng_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    log.debug("saved fit state at iteration %d to %s", iteration, path)


def _load_state(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: say so, never train over it silently
        raise InputError(f"cannot read the fit checkpoint {path} ({type(e).__name__}); delete it") from e
    if state.get("fingerprint") != fingerprint:
        raise InputError(
            f"{path} was saved for another video, masks or model settings: "
            "use another output folder or delete the checkpoint to start over"
        )
    return state


class FitResult(NamedTuple):
    """What :func:`fit_atlas` returns: the atlas and the fit's statistics (unpacks as a pair)."""

    atlas: AtlasData
    stats: FitStats

    OUTPUTS = (
        "atlas.safetensors",
        "reconstruction.mp4",
        "alpha.mp4",
        "background_atlas.png",
        "foreground_atlas.png",
        "fit_stats.json",
    )

    def save(self, out_dir: str | os.PathLike, fps: float, info: dict | None = None) -> list[Path]:
        """Write :attr:`OUTPUTS` into ``out_dir``, each whole: the atlas (what ``--atlas`` takes), the
        reconstruction and alpha videos at ``fps``, the atlas images, and the statistics (with ``info``)."""
        from t2l_fast.io import save_png
        from t2l_fast.video_io import write_video

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atlas = self.atlas
        atlas.save(out / "atlas.safetensors")
        write_video(out / "reconstruction.mp4", reconstruct(atlas), fps)
        write_video(out / "alpha.mp4", atlas.alpha[:, None].expand(-1, 3, -1, -1), fps)
        save_png(atlas.background_atlas, out / "background_atlas.png")
        save_png(atlas.foreground_atlas, out / "foreground_atlas.png")
        with atomic_path(out / "fit_stats.json") as tmp:
            tmp.write_text(json.dumps({**(info or {}), **self.stats.to_json()}, indent=1))
        return [out / name for name in self.OUTPUTS]


def fit_atlas(
    frames: torch.Tensor,
    masks: torch.Tensor | None = None,
    config: FitConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    resume_dir: str | os.PathLike | None = None,
    flow: FlowField | None = None,
    on_step: Callable[[int, float], None] | None = None,
    meta: dict | None = None,
) -> FitResult:
    """Fit a layered neural atlas (background + one foreground, or background only) to a video.

    Args:
        frames: (T, 3, H, W) uint8 (or float in [0, 1]) RGB, T >= 3.
        masks: (T, H, W) foreground masks (bool/float, > 0.5 = object), or None for a background-only
            atlas (alpha 0 everywhere, blank foreground atlas).
        config: :class:`FitConfig` (defaults if None).
        device: "cpu", "cuda", "cuda:N" or None/"auto".
        progress: show a tqdm bar with the running PSNR.
        resume_dir: folder of the resumable state ``fit_state.pt``: loaded when present (same video,
            masks and model settings, else :class:`InputError`), saved every ``save_every`` iterations,
            at the end and on Ctrl-C.
        flow: precomputed :func:`~t2l_fast.fit.flow.compute_flow` of ``frames`` (computed if None).
        on_step: called as ``on_step(iteration_done, batch_psnr)`` after every step.
        meta: extra JSON-serialisable information stored in the atlas's ``meta``.
    Returns:
        :class:`FitResult` (atlas, stats): the exported :class:`AtlasData` on ``device`` and
        :class:`FitStats`. On Ctrl-C the state is saved, and the atlas of the iterations done so far is
        returned with ``stats.interrupted = True``.
    Raises:
        InputError: fewer than 3 frames, masks of the wrong count/size, masks empty in every frame, an
            unusable checkpoint in ``resume_dir``, CUDA asked for but absent.
    """
    cfg = (config or FitConfig()).validate()
    check_inputs(frames, masks)
    dev = resolve_device(device)
    has_fg = masks is not None
    grid = cfg.grid or default_grid(*frames.shape[-2:])
    stats = FitStats(has_foreground=has_fg, grid=grid, device=str(dev))
    ckpt_path = Path(resume_dir) / CHECKPOINT_NAME if resume_dir is not None else None
    fingerprint = _fingerprint(frames, masks, cfg)
    state = _load_state(ckpt_path, fingerprint) if ckpt_path is not None else None  # before heavy work
    if flow is None:
        flow = compute_flow(as_uint8(frames), cfg.flow_preset)
    stats.flow_seconds, stats.flow_consistent = flow.seconds, flow.consistent_fraction

    model = _initialise(frames, masks, flow, cfg, dev)
    opt = torch.optim.Adam(_param_groups(model, cfg), betas=(0.9, 0.99), eps=1e-15)
    start = _resume(model, opt, state, stats, cfg.seed)
    it = _train(
        model,
        opt,
        FitData(frames, masks, flow, dev),
        cfg,
        stats,
        start,
        progress,
        on_step,
        lambda i: _save_state(ckpt_path, model, opt, i, fingerprint, stats) if ckpt_path else None,
    )
    if ckpt_path is not None:
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C must not lose the state
            Path(resume_dir).mkdir(parents=True, exist_ok=True)
            _save_state(ckpt_path, model, opt, it, fingerprint, stats)
    atlas = _export(model, frames, grid, stats, meta)
    log.info(
        "atlas fit: %d iterations (%d this run) in %.1f s, reconstruction PSNR %.2f dB",
        it,
        it - start,
        stats.fit_seconds,
        stats.psnr,
    )
    return FitResult(atlas, stats)


def _initialise(frames, masks, flow: FlowField, cfg: FitConfig, dev: torch.device) -> LayeredGridModel:
    """The model, its mappings initialised from chained flow similarities of the background (outside
    the grown masks) and of the object, its alpha from the masks."""
    t_, _, h, w = frames.shape
    masks_b = None if masks is None else masks.cpu() > 0.5
    half = max(h, w) / 2.0
    region_bg = None
    if masks_b is not None:
        grown = F.max_pool2d(masks_b.float()[:, None], kernel_size=15, stride=1, padding=7)[:, 0] > 0
        region_bg = ~grown[:-1]
    transforms = {"background": chain_similarities(flow, region_bg, half, seed=cfg.seed)}
    if masks_b is not None:
        transforms["foreground"] = chain_similarities(flow, masks_b[:-1], half, seed=cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LayeredGridModel(
            t_,
            h,
            w,
            transforms,
            with_foreground=masks_b is not None,
            residual_cells=cfg.residual_cells,
            alpha_cells=cfg.alpha_cells,
            texture_levels=cfg.texture_levels,
            init_alpha=None if masks_b is None else masks_b.float(),
            max_scale=cfg.max_scale,
        ).to(dev)


def _resume(model, opt, state: dict | None, stats: FitStats, seed: int) -> int:
    """Load the saved ``state`` of an earlier run of the same fit when there is one: -> the iteration
    to start from (0 for a new fit, whose random state is then seeded)."""
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = int(state["iteration"])
        stats.history = [tuple(hh) for hh in state.get("history", [])]
        if "rng" in state:
            torch.set_rng_state(state["rng"])
        log.info("resuming the fit from iteration %d", start)
    else:
        torch.manual_seed(seed)
    stats.start_iteration = start
    return start


def _train(
    model,
    opt,
    data: FitData,
    cfg: FitConfig,
    stats: FitStats,
    start: int,
    progress: bool,
    on_step,
    checkpoint,
) -> int:
    """The optimisation from ``start`` to ``cfg.iterations``; Ctrl-C ends it early. Fills the timing
    and PSNR fields of ``stats``; -> the iterations done in all."""
    dev = data.device
    total = max(cfg.iterations, start)
    batch = cfg.batch or (65536 if dev.type == "cuda" else 8192)
    engine = fit_engine(cfg, dev)
    step_fn = engine.compiled(step_losses)  # a failed compile falls back to eager, with a warning

    bar = None
    if progress and start < total:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="atlas fit", unit="it", dynamic_ncols=True)
    run_start = time.perf_counter()
    it = start
    mse_avg = None
    mse_sum, mse_n = torch.zeros((), device=dev), 0
    w_boot = torch.zeros((), device=dev)
    try:
        while it < total:
            frac = it / max(cfg.iterations, 1)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * cfg.lr_final ** min(frac, 1.0)
            w_boot.fill_(cfg.w_bootstrap if frac < cfg.bootstrap_until else 0.0)
            t0 = time.perf_counter()
            with engine.autocast():
                loss, parts = step_fn(model, data, cfg, batch, w_boot)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            it += 1
            if engine.compile and it == start + 1:
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                stats.compile_seconds = time.perf_counter() - t0
                run_start = time.perf_counter()  # the compile warm-up is not fit time
            mse_sum = mse_sum + parts["mse"]  # on the device: no sync per step
            mse_n += 1
            if it % cfg.log_every == 0 or it == total or on_step is not None:
                mse_avg = float(mse_sum) / mse_n  # the mean over the steps since the last report
                mse_sum, mse_n = torch.zeros((), device=dev), 0
                psnr = psnr_db(mse_avg)
                if it % cfg.log_every == 0 or it == total:
                    stats.history.append((it, round(time.perf_counter() - run_start, 3), round(psnr, 3)))
                    if bar is not None:
                        bar.set_postfix(psnr=f"{psnr:.2f}dB", refresh=False)
                if on_step is not None:
                    on_step(it, psnr)
            if bar is not None:
                bar.update(1)
            if cfg.save_every > 0 and it % cfg.save_every == 0 and it < total:
                checkpoint(it)
    except KeyboardInterrupt:
        stats.interrupted = True
        log.warning("interrupted at iteration %d of %d", it, total)
    finally:
        if bar is not None:
            bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    stats.fit_seconds = time.perf_counter() - run_start
    stats.iterations = it
    stats.train_psnr = psnr_db(mse_avg) if mse_avg is not None else float("nan")
    return it


def fit_engine(cfg: FitConfig, device: torch.device) -> Engine:
    """The editors' execution policy for the fit's step (:class:`~t2l_fast.pipeline.engine.Engine`):
    compiled by ``cfg.compile`` ("auto": on CUDA) with the engine's compile settings and its eager
    fallback, in fp32 (the grid model's small per-texel updates are what the fit is made of)."""
    return Engine(RuntimeConfig(mode="fast", precision="fp32", compile=cfg.compile), device)


def _export(model, frames: torch.Tensor, grid: int, stats: FitStats, meta: dict | None) -> AtlasData:
    """The fitted model as an :class:`AtlasData` (with its reconstruction PSNR and metadata)."""
    t_, _, h, w = frames.shape
    t0 = time.perf_counter()
    model.eval()
    atlas = model.export(grid)
    stats.psnr, stats.psnr_per_frame = reconstruction_psnr(atlas, frames)
    stats.export_seconds = time.perf_counter() - t0
    atlas.meta = {
        "trained_frames": t_,
        "frame_size": [w, h],
        "has_foreground": stats.has_foreground,
        "iterations": stats.iterations,
        "psnr": round(stats.psnr, 3),
        "fitter": "t2l_fast.fit",
        **(meta or {}),
    }
    return atlas
