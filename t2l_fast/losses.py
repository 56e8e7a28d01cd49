"""The Text2LIVE objective (DESIGN §1): one implementation for images and videos.

    L = λ_comp (L_clip + L_dir) + λ_screen L_screen + λ_structure L_structure
        + λ_sparsity (λ_l1 mean α + λ_l0 mean(2σ(5α) - 1)) + λ_boot(t) L_bootstrap

The pure formulas are module functions (tested against hand computations); :class:`Objective`
holds the frozen CLIP, the text embeddings (computed once) and draws the random views.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import ViewParams, make_views, resize_view
from .config import Config
from .kernels import CompositeOut, composite_rgba, self_similarity, self_similarity_mse
from .models.clip import Clip

TEMPLATES = (
    "photo of {}.", "high quality photo of {}.", "a photo of {}.", "the photo of {}.", "image of {}.",
    "an image of {}.", "high quality image of {}.", "a high quality image of {}.", "the {}.", "a {}.",
    "{}.", "{}", "{}!", "{}...",
)
SCREEN_TEMPLATES = ("{} over a green screen.", "{} in front of a green screen.")
RELEVANCY_SIZE = 224


def expand_templates(prompt: str, templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    return [t.format(prompt) for t in templates]


def spherical_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise 2·arcsin(|x̂ - ŷ| / 2)² for x (N, E), y (M, E) -> (N, M), in fp32."""
    x = F.normalize(x.float(), dim=-1)
    y = F.normalize(y.float(), dim=-1)
    chord = (x.unsqueeze(1) - y.unsqueeze(0)).norm(dim=-1)
    return 2 * torch.arcsin((chord / 2).clamp(max=1.0)) ** 2


def cosine_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pairwise 1 - cos(x, y) for x (N, E), y (M, E) -> (N, M), in fp32."""
    return 1 - F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).T


def directional_loss(out_e: torch.Tensor, src_e: torch.Tensor, text_dirs: torch.Tensor) -> torch.Tensor:
    """Mean over views (N) and directions (M) of 1 - cos(out_e - src_e, dir)."""
    image_dirs = out_e.float() - src_e.float()
    return cosine_distance(image_dirs, text_dirs).mean()


def sparsity_loss(alpha_l1: torch.Tensor, alpha_l0: torch.Tensor, l1: float, l0: float) -> torch.Tensor:
    """λ_l1·mean α + λ_l0·mean(2σ(5α) - 1), from the per-image means the compositing op returns."""
    return l1 * alpha_l1.mean() + l0 * alpha_l0.mean()


def bootstrap_weight(step: int, steps: int, weight: float) -> float:
    """Linear annealing: weight·(1 - (step + 1)/steps) while step < steps, then 0."""
    if step >= steps or steps <= 0:
        return 0.0
    return weight * (1 - (step + 1) / steps)


@dataclass
class Texts:
    """Text embeddings of one run (normalised, fp32), computed once."""

    comp: torch.Tensor  # (14, E) the prompt with every template
    screen: torch.Tensor  # (2, E) the screen prompt with the green-screen templates
    src: torch.Tensor | None  # (14, E) the ROI prompt with every template
    bootstrap: torch.Tensor | None  # (E,) the bootstrap prompt as is (relevancy)

    @staticmethod
    def encode(clip: Clip, cfg: Config) -> Texts:
        def enc(texts: list[str]) -> torch.Tensor:
            return F.normalize(clip.encode_text(texts), dim=-1)

        comp = enc(expand_templates(cfg.prompt))
        screen = enc(expand_templates(cfg.effective_screen_prompt, SCREEN_TEMPLATES))
        src = enc(expand_templates(cfg.roi_prompt)) if cfg.roi_prompt else None
        boot = cfg.effective_bootstrap_prompt
        bootstrap = enc([boot])[0] if boot and cfg.effective_bootstrap_steps > 0 else None
        return Texts(comp, screen, src, bootstrap)


class Objective:
    """Computes every loss term for (source, generator RGBA) pairs.

    Each call takes one example at a time (the reference's per-view, per-example order): the
    fast path of a later issue batches the same computations.
    """

    def __init__(self, clip: Clip, cfg: Config, texts: Texts | None = None):
        self.clip = clip
        self.cfg = cfg
        self.texts = texts or Texts.encode(clip, cfg)
        self.bootstrap_steps = cfg.effective_bootstrap_steps if self.texts.bootstrap is not None else 0
        self.distance = spherical_distance if cfg.loss.text_criterion == "spherical" else cosine_distance

    def _pick(self, n_total: int, gen: torch.Generator) -> torch.Tensor:
        """A random subset of template indices (random size, drawn with replacement)."""
        k = int(torch.randint(1, n_total + 1, (1,), generator=gen))
        return torch.randint(n_total, (k,), generator=gen)

    def relevancy(self, source: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) -> (1, 224, 224) relevancy map of the bootstrap prompt."""
        square = F.interpolate(source, size=(RELEVANCY_SIZE, RELEVANCY_SIZE), mode="bilinear",
                               antialias=True, align_corners=False)
        return self.clip.relevancy(square, self.texts.bootstrap, self.cfg.loss.relevancy_num_layers)

    def __call__(self, source: torch.Tensor, rgba: torch.Tensor, step: int, gen: torch.Generator,
                 composite: CompositeOut | None = None) -> dict[str, torch.Tensor]:
        """source (1, 3, H, W), rgba (1, 4, H, W) -> {term name: scalar}; "loss" is the total."""
        cfg, lc, texts = self.cfg, self.cfg.loss, self.texts
        comp = composite or composite_rgba(rgba, source)
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=rgba.device)

        if lc.lambda_composition > 0 or lc.lambda_screen > 0:
            hw = tuple(source.shape[-2:])
            n = cfg.views.n_aug
            paired = ViewParams.draw(n, hw, cfg.views, gen, self.clip.patch)
            screen = ViewParams.draw(n, hw, cfg.views, gen, self.clip.patch)
        if lc.lambda_composition > 0:
            out_e = self.clip.encode_image(make_views(comp.composite, paired, cfg.views.fill, cfg.views.min_cover))
            idx = self._pick(len(texts.comp), gen).to(out_e.device)
            terms["comp_clip"] = self.distance(out_e, texts.comp[idx]).mean()
            comp_total = terms["comp_clip"]
            if texts.src is not None:
                with torch.no_grad():
                    src_views = make_views(source, paired, cfg.views.fill, cfg.views.min_cover)
                    src_e = self.clip.encode_image(src_views)
                idx = self._pick(len(texts.src), gen).to(out_e.device)
                dirs = texts.comp[idx] - texts.src[idx]
                terms["comp_dir"] = directional_loss(out_e, src_e, dirs)
                comp_total = comp_total + terms["comp_dir"]
            total = total + lc.lambda_composition * comp_total
        if lc.lambda_screen > 0:
            scr_e = self.clip.encode_image(make_views(comp.greenscreen, screen, cfg.views.fill, cfg.views.min_cover))
            idx = self._pick(len(texts.screen), gen).to(scr_e.device)
            terms["screen"] = self.distance(scr_e, texts.screen[idx]).mean()
            total = total + lc.lambda_screen * terms["screen"]
        if lc.lambda_structure > 0:
            short, long = cfg.views.short_side, cfg.views.structure_max_long_side
            with torch.no_grad():
                target = self_similarity(self.clip.encode_tokens(resize_view(source, short, long, self.clip.patch)))
            tokens = self.clip.encode_tokens(resize_view(comp.composite, short, long, self.clip.patch))
            terms["structure"] = self_similarity_mse(tokens, target)
            total = total + lc.lambda_structure * terms["structure"]
        if lc.lambda_sparsity > 0:
            terms["sparsity"] = sparsity_loss(comp.alpha_l1, comp.alpha_l0, lc.lambda_alpha_l1, lc.lambda_alpha_l0)
            total = total + lc.lambda_sparsity * terms["sparsity"]
        weight = bootstrap_weight(step, self.bootstrap_steps, lc.lambda_bootstrap)
        if weight > 0:
            target = self.relevancy(source)  # (1, 224, 224)
            alpha = F.interpolate(rgba[:, 3:], size=target.shape[-2:], mode="bilinear", align_corners=False)
            terms["bootstrap"] = F.mse_loss(alpha[:, 0].float(), target)
            total = total + weight * terms["bootstrap"]
        terms["loss"] = total
        return terms
