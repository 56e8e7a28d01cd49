"""The Text2LIVE objective (DESIGN §1): one implementation for images and videos.

    L = λ_comp (L_clip + L_dir) + λ_screen L_screen + λ_structure L_structure
        + λ_sparsity (λ_l1 mean α + λ_l0 mean(2σ(5α) - 1)) + λ_boot(t) L_bootstrap

The pure formulas are module functions (tested against hand computations), with what they read:
the text embeddings (:class:`Texts`) and the rendered examples (:class:`Layers`);
:class:`~t2l_fast.objective.Objective` computes them through the frozen CLIP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import (
    full_precision,
)
from .config import Config
from .kernels import composite_rgba
from .models.clip import Clip

TEMPLATES = (
    "photo of {}.",
    "high quality photo of {}.",
    "a photo of {}.",
    "the photo of {}.",
    "image of {}.",
    "an image of {}.",
    "high quality image of {}.",
    "a high quality image of {}.",
    "the {}.",
    "a {}.",
    "{}.",
    "{}",
    "{}!",
    "{}...",
)
SCREEN_TEMPLATES = ("{} over a green screen.", "{} in front of a green screen.")
RELEVANCY_SIZE = 224

log = logging.getLogger(__name__)


def expand_templates(prompt: str | list[str], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Every prompt with every template, prompt-major: [p0·t0, p0·t1, ..., p1·t0, ...]."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [t.format(p) for p in prompts for t in templates]


@full_precision
def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise 2·arcsin(|x̂ - ŷ| / 2)² for x (N, E), y (M, E) -> (N, M), in fp32."""
    x = F.normalize(x.float(), dim=-1)
    y = F.normalize(y.float(), dim=-1)
    chord = (x.unsqueeze(1) - y.unsqueeze(0)).norm(dim=-1)
    return 2 * torch.arcsin((chord / 2).clamp(max=1.0)) ** 2


@full_precision
def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise 1 - cos(x, y) for x (N, E), y (M, E) -> (N, M), in fp32."""
    return 1 - F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).T


COSINE_SCALE = 1.2  # the original's ``cosine_loss`` scales 1 - cos by 1.2 (text_criterion: cosine)


def cosine_criterion(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The ``cosine`` text criterion: 1.2·(1 - cos(x, y)), pairwise -> (N, M), in fp32."""
    return COSINE_SCALE * cosine_distance(x, y)


@full_precision
def directional_loss(
    out_e: torch.Tensor, src_e: torch.Tensor, text_dirs: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over views (N) and directions (M) of 1 - cos(out_e - src_e, dir); the directions are
    differences of RAW text embeddings (target - source), as the original subtracts them. With
    ``weights`` (M,) summing to 1, a weighted mean over the directions (see :func:`template_weights`)."""
    image_dirs = out_e.float() - src_e.float()
    return weighted_mean(cosine_distance(image_dirs, text_dirs), weights)


def template_weights(picked: torch.Tensor, n_total: int) -> torch.Tensor:
    """The share of each of ``n_total`` templates in a random subset of indices (with repeats), as a
    fixed-length (n_total,) vector: a mean over the subset's templates is the weighted sum with it,
    and its length does not change from step to step (one compiled shape, no gather)."""
    return torch.bincount(picked, minlength=n_total).double() / len(picked)


def weighted_mean(distances: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """(N, M) distances -> their mean over N, then the mean over M (``weights`` None) or the sum
    weighted by ``weights`` (M,)."""
    if weights is None:
        return distances.mean()
    return (distances.mean(dim=0) * weights.to(distances.dtype)).sum()


@full_precision
def sparsity_loss(alpha_l1: torch.Tensor, alpha_l0: torch.Tensor, l1: float, l0: float) -> torch.Tensor:
    """λ_l1·mean α + λ_l0·mean(2σ(5α) - 1), from the per-image means the compositing op returns."""
    return l1 * alpha_l1.mean() + l0 * alpha_l0.mean()


def bootstrap_weight(step: int, steps: int, weight: float, schedule: str = "linear") -> float:
    """While step < steps: weight·(1 - (step + 1)/steps) (linear) or weight (none); then 0."""
    if step >= steps or steps <= 0:
        return 0.0
    return weight if schedule == "none" else weight * (1 - (step + 1) / steps)


def truncation_warning(tokenizer, prompt: str, templates: tuple[str, ...]) -> str | None:
    """A message naming the words of ``prompt`` that CLIP never reads (its context holds 77 tokens:
    start, 75 text tokens, end) in the longest of ``templates``; None when every word fits."""
    encode = getattr(tokenizer, "encode", None)
    if not callable(encode):
        return None
    room = getattr(tokenizer, "context_length", 77) - 2

    def fits(text: str) -> bool:
        return all(len(encode(t.format(text))) <= room for t in templates)

    words = prompt.split()
    if fits(prompt):
        return None
    kept = 0
    while kept < len(words) and fits(" ".join(words[: kept + 1])):
        kept += 1
    return (
        f"the prompt is longer than CLIP's {room + 2} tokens: the words {' '.join(words[kept:])!r} are "
        "dropped (shorten the prompt to keep them)"
    )


def signature(texts: Texts) -> tuple:
    """The lengths of a run's text lists: variants with equal ones draw the same numbers."""
    return tuple(None if x is None else len(x) for x in (texts.comp, texts.src, texts.screen))


def prompt_warnings(clip: Clip, cfg: Config) -> list[str]:
    """The :func:`truncation_warning` of each of the run's prompts (with every template it is used
    with): what the command line logs and the web page shows."""

    def listed(value) -> list[str]:
        return [value] if isinstance(value, str) else list(value or [])

    uses: dict[str, tuple[str, ...]] = {}  # each prompt with every template it is used with
    for prompts, templates in (
        (cfg.prompt, TEMPLATES),
        (cfg.effective_screen_prompt, SCREEN_TEMPLATES),
        (cfg.roi_prompt, TEMPLATES),
    ):
        for p in listed(prompts):
            uses[p] = uses.get(p, ()) + templates
    messages = (truncation_warning(clip.tokenizer, p, templates) for p, templates in uses.items())
    return [m for m in messages if m]


@dataclass
class Texts:
    """Text embeddings of one run: CLIP's RAW fp32 embeddings (not normalised), computed once.

    The distances normalise them; the directional loss subtracts raw embeddings, as the original does.
    """

    comp: torch.Tensor  # (14·P, E) the prompt(s) with every template
    screen: torch.Tensor  # (2·P, E) the screen prompt(s) with the green-screen templates
    src: torch.Tensor | None  # (14·Q, E) the ROI prompt(s) with every template
    bootstrap: torch.Tensor | None  # (E,) the bootstrap prompt as is (relevancy)

    @staticmethod
    def encode(clip: Clip, cfg: Config, memo: dict | None = None) -> Texts:
        """The run's texts through CLIP; ``memo`` (shared by the variants of a group) keeps every
        list of texts encoded once, and every prompt warning logged once."""
        memo = {} if memo is None else memo
        for message in prompt_warnings(clip, cfg):
            if ("warned", message) not in memo:
                memo["warned", message] = True
                log.warning(message)

        def encode(texts: list[str]) -> torch.Tensor:
            key = ("texts", *texts)
            if key not in memo:
                memo[key] = clip.encode_text(texts)
            return memo[key]

        comp = encode(expand_templates(cfg.prompt))
        screen = encode(expand_templates(cfg.effective_screen_prompt, SCREEN_TEMPLATES))
        src = encode(expand_templates(cfg.roi_prompt)) if cfg.roi_prompt else None
        boot = cfg.effective_bootstrap_prompt
        bootstrap = encode([boot])[0] if boot and cfg.effective_bootstrap_steps > 0 else None
        return Texts(comp, screen, src, bootstrap)


@dataclass
class Layers:
    """What the losses see for B examples of one size: the source and the rendered edit.

    source, composite, greenscreen (B, 3, H, W); alpha (B, 1, H, W); alpha_l1, alpha_l0 (B,) the
    per-example means of α and of 2σ(5α) - 1; bootstrap_share (B floats, None: all 1) how much each
    example counts in the bootstrap term's mean (videos: the original's effective rule, see
    ``pipeline/video.py``).
    """

    source: torch.Tensor
    composite: torch.Tensor
    greenscreen: torch.Tensor
    alpha: torch.Tensor
    alpha_l1: torch.Tensor
    alpha_l0: torch.Tensor
    bootstrap_share: tuple[float, ...] | None = None

    @staticmethod
    def from_rgba(rgba: torch.Tensor, source: torch.Tensor) -> Layers:
        """Generator RGBA (B, 4, H, W) over ``source``, through the fused compositing op."""
        out = composite_rgba(rgba, source)
        return Layers(source, out.composite, out.greenscreen, rgba[:, 3:], out.alpha_l1, out.alpha_l0)

    def __len__(self) -> int:
        return self.source.shape[0]

    def fields(self) -> tuple[torch.Tensor, ...]:
        return (self.source, self.composite, self.greenscreen, self.alpha, self.alpha_l1, self.alpha_l0)

    def shares(self) -> tuple[float, ...]:
        return self.bootstrap_share if self.bootstrap_share is not None else (1.0,) * len(self)

    @staticmethod
    def cat(parts: list[Layers]) -> Layers:
        """The examples of ``parts`` (all of one size) as one batch."""
        columns = (torch.cat(column) for column in zip(*(p.fields() for p in parts), strict=True))
        shares = None
        if any(p.bootstrap_share is not None for p in parts):
            shares = tuple(s for p in parts for s in p.shares())
        return Layers(*columns, bootstrap_share=shares)

    def __getitem__(self, i: int) -> Layers:
        share = None if self.bootstrap_share is None else self.bootstrap_share[i : i + 1]
        return Layers(*(t[i : i + 1] for t in self.fields()), bootstrap_share=share)

    def bootstrap_mean(self, per_example: torch.Tensor) -> torch.Tensor:
        """The mean over the examples of ``per_example`` (B,), each weighted by its share."""
        if self.bootstrap_share is None:
            return per_example.mean()
        weighted = [per_example[i] * s for i, s in enumerate(self.bootstrap_share) if s]
        return sum(weighted, per_example.sum() * 0) / len(self)
