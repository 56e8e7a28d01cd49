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

from .augment import ViewParams, make_views, resize_view, view_size
from .config import Config
from .kernels import composite_rgba, self_similarity, self_similarity_mse
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


def expand_templates(prompt: str | list[str], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Every prompt with every template, prompt-major: [p0·t0, p0·t1, ..., p1·t0, ...]."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    return [t.format(p) for p in prompts for t in templates]


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


def bootstrap_weight(step: int, steps: int, weight: float, schedule: str = "linear") -> float:
    """While step < steps: weight·(1 - (step + 1)/steps) (linear) or weight (none); then 0."""
    if step >= steps or steps <= 0:
        return 0.0
    return weight if schedule == "none" else weight * (1 - (step + 1) / steps)


@dataclass
class Texts:
    """Text embeddings of one run (normalised, fp32), computed once."""

    comp: torch.Tensor  # (14·P, E) the prompt(s) with every template
    screen: torch.Tensor  # (2·P, E) the screen prompt(s) with the green-screen templates
    src: torch.Tensor | None  # (14·Q, E) the ROI prompt(s) with every template
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


@dataclass
class Layers:
    """What the losses see for B examples of one size: the source and the rendered edit.

    source, composite, greenscreen (B, 3, H, W); alpha (B, 1, H, W); alpha_l1, alpha_l0 (B,) the
    per-example means of α and of 2σ(5α) - 1.
    """

    source: torch.Tensor
    composite: torch.Tensor
    greenscreen: torch.Tensor
    alpha: torch.Tensor
    alpha_l1: torch.Tensor
    alpha_l0: torch.Tensor

    @staticmethod
    def from_rgba(rgba: torch.Tensor, source: torch.Tensor) -> Layers:
        """Generator RGBA (B, 4, H, W) over ``source``, through the fused compositing op."""
        out = composite_rgba(rgba, source)
        return Layers(source, out.composite, out.greenscreen, rgba[:, 3:], out.alpha_l1, out.alpha_l0)

    def __len__(self) -> int:
        return self.source.shape[0]

    def __getitem__(self, i: int) -> Layers:
        return Layers(
            *(
                t[i : i + 1]
                for t in (
                    self.source,
                    self.composite,
                    self.greenscreen,
                    self.alpha,
                    self.alpha_l1,
                    self.alpha_l0,
                )
            )
        )


class Objective:
    """Computes every loss term for a batch of examples (:class:`Layers`).

    ``batched=True`` (the fast path) feeds all the views of a step to CLIP together and reuses
    source-side results for a repeated ``cache_key``; ``batched=False`` (the reference mode) does
    the same computations one example and one loss at a time, as the original code does. Both draw
    the same random numbers in the same order, so they compute the same values.

    ``view_size``: fixed (h, w) of the augmented views (fast path: fixed shapes); None derives it
    from each example's aspect ratio. ``encode_image`` / ``encode_tokens`` may be compiled
    versions of the CLIP methods.
    """

    def __init__(
        self,
        clip: Clip,
        cfg: Config,
        texts: Texts | None = None,
        *,
        batched: bool = False,
        view_size: tuple[int, int] | None = None,
        structure_size: tuple[int, int] | None = None,
        encode_image=None,
        encode_tokens=None,
    ):
        self.clip = clip
        self.cfg = cfg
        self.texts = texts or Texts.encode(clip, cfg)
        self.bootstrap_steps = cfg.effective_bootstrap_steps if self.texts.bootstrap is not None else 0
        self.distance = spherical_distance if cfg.loss.text_criterion == "spherical" else cosine_distance
        self.batched = batched
        self.view_size = view_size
        self.structure_size = structure_size
        self.encode_image = encode_image or clip.encode_image
        self.encode_tokens = encode_tokens or clip.encode_tokens
        self._cache: dict[tuple, torch.Tensor] = {}

    # -- helpers ----------------------------------------------------------------------------------
    def _pick(self, n_total: int, gen: torch.Generator) -> torch.Tensor:
        """A random subset of template indices (random size, drawn with replacement)."""
        k = int(torch.randint(1, n_total + 1, (1,), generator=gen))
        return torch.randint(n_total, (k,), generator=gen)

    def _views(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        return make_views(images, params, self.cfg.views.fill, self.cfg.views.min_cover)

    def _structure_view(self, images: torch.Tensor) -> torch.Tensor:
        v = self.cfg.views
        if self.structure_size is None:
            return resize_view(images, v.short_side, v.structure_max_long_side, self.clip.patch)
        return F.interpolate(
            images, size=self.structure_size, mode="bilinear", antialias=True, align_corners=False
        )

    def _cached(self, key: tuple | None, compute):
        if key is None:
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def relevancy(self, source: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 224, 224) relevancy maps of the bootstrap prompt."""
        square = F.interpolate(
            source,
            size=(RELEVANCY_SIZE, RELEVANCY_SIZE),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return self.clip.relevancy(square, self.texts.bootstrap, self.cfg.loss.relevancy_num_layers)

    def structure_target(self, source: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self_similarity(self.encode_tokens(self._structure_view(source)))

    # -- the objective ----------------------------------------------------------------------------
    def __call__(
        self, layers: Layers, step: int, gen: torch.Generator, cache_key: tuple | None = None
    ) -> dict[str, torch.Tensor]:
        """-> {term: scalar}; "loss" is the weighted total. Terms are means over the examples."""
        cfg, lc, texts = self.cfg, self.cfg.loss, self.texts
        b = len(layers)
        n = cfg.views.n_aug
        size = self.view_size or view_size(
            *layers.source.shape[-2:], cfg.views.short_side, cfg.views.max_long_side, self.clip.patch
        )
        use_views = lc.lambda_composition > 0 or lc.lambda_screen > 0
        paired = screen = None
        if use_views:
            draws = [
                (ViewParams.draw(n, size, cfg.views, gen), ViewParams.draw(n, size, cfg.views, gen))
                for _ in range(b)
            ]
            paired = ViewParams.cat([d[0] for d in draws])
            screen = ViewParams.cat([d[1] for d in draws])
        comp_idx = self._pick(len(texts.comp), gen) if lc.lambda_composition > 0 else None
        paired_texts = min(len(texts.comp), len(texts.src)) if texts.src is not None else 0
        dir_idx = self._pick(paired_texts, gen) if lc.lambda_composition > 0 and paired_texts else None
        screen_idx = self._pick(len(texts.screen), gen) if lc.lambda_screen > 0 else None
        weight = bootstrap_weight(step, self.bootstrap_steps, lc.lambda_bootstrap, lc.bootstrap_schedule)

        if self.batched:
            emb = self._embeddings(layers, paired, screen)
            boot_target = (
                self._cached(("relevancy", cache_key), lambda: self.relevancy(layers.source))
                if weight > 0
                else None
            )
            struct_target = (
                self._cached(("structure", cache_key), lambda: self.structure_target(layers.source))
                if lc.lambda_structure > 0
                else None
            )
            return self._terms(layers, emb, comp_idx, dir_idx, screen_idx, weight, boot_target, struct_target)
        # reference mode: one example, one loss, one CLIP call at a time
        per_example = []
        for i in range(b):
            one = layers[i]
            sl = slice(i * n, (i + 1) * n)
            emb = self._embeddings(
                one, paired[sl] if paired else None, screen[sl] if screen else None, separate=True
            )
            boot_target = self.relevancy(one.source) if weight > 0 else None
            struct_target = self.structure_target(one.source) if lc.lambda_structure > 0 else None
            per_example.append(
                self._terms(one, emb, comp_idx, dir_idx, screen_idx, weight, boot_target, struct_target)
            )
        return {k: sum(t[k] for t in per_example) / b for k in per_example[0]}

    def _embeddings(self, layers: Layers, paired, screen, separate: bool = False) -> dict:
        """CLIP embeddings of the output, source and screen views (None where a loss is off)."""
        lc = self.cfg.loss
        out_e = src_e = scr_e = None
        want_out, want_scr = lc.lambda_composition > 0, lc.lambda_screen > 0
        if want_out and want_scr and not separate:
            both = self.encode_image(
                torch.cat([self._views(layers.composite, paired), self._views(layers.greenscreen, screen)])
            )
            out_e, scr_e = both[: len(paired)], both[len(paired) :]
        else:
            if want_out:
                out_e = self.encode_image(self._views(layers.composite, paired))
            if want_scr:
                scr_e = self.encode_image(self._views(layers.greenscreen, screen))
        if want_out and self.texts.src is not None:
            with torch.no_grad():
                src_e = self.encode_image(self._views(layers.source, paired))
        return {"out": out_e, "src": src_e, "screen": scr_e}

    def _terms(
        self,
        layers: Layers,
        emb: dict,
        comp_idx,
        dir_idx,
        screen_idx,
        weight: float,
        boot_target,
        struct_target,
    ) -> dict[str, torch.Tensor]:
        lc, texts = self.cfg.loss, self.texts
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=layers.source.device)
        if emb["out"] is not None:
            dev = emb["out"].device
            terms["comp_clip"] = self.distance(emb["out"], texts.comp[comp_idx.to(dev)]).mean()
            comp_total = terms["comp_clip"]
            if emb["src"] is not None:
                idx = dir_idx.to(dev)
                terms["comp_dir"] = directional_loss(emb["out"], emb["src"], texts.comp[idx] - texts.src[idx])
                comp_total = comp_total + terms["comp_dir"]
            total = total + lc.lambda_composition * comp_total
        if emb["screen"] is not None:
            dev = emb["screen"].device
            terms["screen"] = self.distance(emb["screen"], texts.screen[screen_idx.to(dev)]).mean()
            total = total + lc.lambda_screen * terms["screen"]
        if struct_target is not None:
            tokens = self.encode_tokens(self._structure_view(layers.composite))
            terms["structure"] = self_similarity_mse(tokens, struct_target)
            total = total + lc.lambda_structure * terms["structure"]
        if lc.lambda_sparsity > 0:
            terms["sparsity"] = sparsity_loss(
                layers.alpha_l1, layers.alpha_l0, lc.lambda_alpha_l1, lc.lambda_alpha_l0
            )
            total = total + lc.lambda_sparsity * terms["sparsity"]
        if boot_target is not None:
            alpha = F.interpolate(
                layers.alpha.float(), size=boot_target.shape[-2:], mode="bilinear", align_corners=False
            )
            terms["bootstrap"] = F.mse_loss(alpha[:, 0], boot_target)
            total = total + weight * terms["bootstrap"]
        terms["loss"] = total
        return terms
