"""The Text2LIVE objective (DESIGN §1): one implementation for images and videos.

    L = λ_comp (L_clip + L_dir) + λ_screen L_screen + λ_structure L_structure
        + λ_sparsity (λ_l1 mean α + λ_l0 mean(2σ(5α) - 1)) + λ_boot(t) L_bootstrap

The pure formulas are module functions (tested against hand computations); :class:`Objective`
holds the frozen CLIP, the text embeddings (computed once) and draws the random views.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .augment import ViewParams, make_views, resize_view, to_device, view_size, whole_patches
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

log = logging.getLogger(__name__)


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


COSINE_SCALE = 1.2  # the original's ``cosine_loss`` scales 1 - cos by 1.2 (text_criterion: cosine)


def cosine_criterion(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The ``cosine`` text criterion: 1.2·(1 - cos(x, y)), pairwise -> (N, M), in fp32."""
    return COSINE_SCALE * cosine_distance(x, y)


def directional_loss(out_e: torch.Tensor, src_e: torch.Tensor, text_dirs: torch.Tensor) -> torch.Tensor:
    """Mean over views (N) and directions (M) of 1 - cos(out_e - src_e, dir); the directions are
    differences of RAW text embeddings (target - source), as the original subtracts them."""
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
    def encode(clip: Clip, cfg: Config) -> Texts:
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
        for p, templates in uses.items():
            message = truncation_warning(clip.tokenizer, p, templates)
            if message:
                log.warning(message)
        comp = clip.encode_text(expand_templates(cfg.prompt))
        screen = clip.encode_text(expand_templates(cfg.effective_screen_prompt, SCREEN_TEMPLATES))
        src = clip.encode_text(expand_templates(cfg.roi_prompt)) if cfg.roi_prompt else None
        boot = cfg.effective_bootstrap_prompt
        bootstrap = clip.encode_text([boot])[0] if boot and cfg.effective_bootstrap_steps > 0 else None
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

    def fields(self) -> tuple[torch.Tensor, ...]:
        return (self.source, self.composite, self.greenscreen, self.alpha, self.alpha_l1, self.alpha_l0)

    @staticmethod
    def cat(parts: list[Layers]) -> Layers:
        """The examples of ``parts`` (all of one size) as one batch."""
        return Layers(*(torch.cat(column) for column in zip(*(p.fields() for p in parts), strict=True)))

    def __getitem__(self, i: int) -> Layers:
        return Layers(*(t[i : i + 1] for t in self.fields()))


@dataclass
class StepDraw:
    """The random choices of one objective call, drawn before any computation (both modes draw the
    same numbers in the same order): per example the CLIP-loss views, the directional views (paired:
    the same geometry for source and output) and the screen views; the template subsets."""

    clip: list[ViewParams] | None
    direction: list[ViewParams] | None
    screen: list[ViewParams] | None
    comp_idx: torch.Tensor | None
    dir_idx: torch.Tensor | None
    screen_idx: torch.Tensor | None

    def to(self, device: torch.device | str) -> StepDraw:
        """Every parameter on ``device`` in one transfer (drawn on the host: no sync)."""
        views = [p for group in (self.clip, self.direction, self.screen) for p in group or []]
        idx = [t for t in (self.comp_idx, self.dir_idx, self.screen_idx) if t is not None]
        moved = iter(to_device([t for p in views for t in p.tensors()] + idx, device))
        width = len(views[0].tensors()) if views else 0

        def group(items):
            if not items:
                return None
            return [ViewParams.from_tensors([next(moved) for _ in range(width)], p.size) for p in items]

        clip, direction, screen = group(self.clip), group(self.direction), group(self.screen)
        comp, dir_, scr = (
            next(moved) if t is not None else None for t in (self.comp_idx, self.dir_idx, self.screen_idx)
        )
        return StepDraw(clip, direction, screen, comp, dir_, scr)


class Objective:
    """Computes every loss term for a batch of examples of one size (:class:`Layers`).

    ``batched=True`` (the fast path) feeds all the views of a call to CLIP together (one call with
    gradient, one without for the source views), computes a crop's structure target in the same
    call as its output tokens, and caches source-side targets (structure, relevancy) for a repeated
    ``cache_key`` (the un-augmented input, the whole atlas); a call without a key (a training crop)
    computes them from that crop. ``batched=False`` (the reference mode) does the same computations
    one example and one loss at a time, as the original code does. Both compute the same values.

    Views follow the original's sizes: ``Resize(224, max_size=320)`` of each example (aspect ratio
    kept; structure view: max 380), then only the whole 32-px patches reach CLIP.
    ``encode_image`` / ``encode_tokens`` may be compiled versions of the CLIP methods.
    """

    def __init__(
        self,
        clip: Clip,
        cfg: Config,
        texts: Texts | None = None,
        *,
        batched: bool = False,
        encode_image=None,
        encode_tokens=None,
    ):
        self.clip = clip
        self.cfg = cfg
        self.texts = texts or Texts.encode(clip, cfg)
        self.bootstrap_steps = cfg.effective_bootstrap_steps if self.texts.bootstrap is not None else 0
        self.criterion = spherical_distance if cfg.loss.text_criterion == "spherical" else cosine_criterion
        self.batched = batched
        self.encode_image = encode_image or clip.encode_image
        self.encode_tokens = encode_tokens or clip.encode_tokens
        self._cache: dict[tuple, torch.Tensor] = {}

    # -- randomness ---------------------------------------------------------------------------------
    def _pick(self, n_total: int, gen: torch.Generator) -> torch.Tensor:
        """A random subset of template indices (random size, drawn with replacement)."""
        k = int(torch.randint(1, n_total + 1, (1,), generator=gen))
        return torch.randint(n_total, (k,), generator=gen)

    def draw(self, b: int, hw: tuple[int, int], gen: torch.Generator) -> StepDraw:
        cfg, lc, texts = self.cfg, self.cfg.loss, self.texts
        v = cfg.views
        size = view_size(*hw, v.short_side, v.max_long_side)
        comp, screen = lc.lambda_composition > 0, lc.lambda_screen > 0
        directional = comp and texts.src is not None
        clip_v, dir_v, screen_v = [], [], []
        for _ in range(b):
            if comp:
                clip_v.append(ViewParams.draw(v.n_aug, size, v, gen))
            if directional:
                dir_v.append(ViewParams.draw(v.n_aug, size, v, gen))
            if screen:
                screen_v.append(ViewParams.draw(v.n_aug, size, v, gen))
        paired_texts = min(len(texts.comp), len(texts.src)) if directional else 0
        return StepDraw(
            clip_v or None,
            dir_v or None,
            screen_v or None,
            self._pick(len(texts.comp), gen) if comp else None,
            self._pick(paired_texts, gen) if directional else None,
            self._pick(len(texts.screen), gen) if screen else None,
        )

    # -- source-side targets --------------------------------------------------------------------------
    def _views(self, images: torch.Tensor, params: list[ViewParams]) -> torch.Tensor:
        views = make_views(images, ViewParams.cat(params), self.cfg.views.fill, self.cfg.views.min_cover)
        return whole_patches(views, self.clip.patch)

    def _structure_view(self, images: torch.Tensor) -> torch.Tensor:
        v = self.cfg.views
        return whole_patches(resize_view(images, v.short_side, v.structure_max_long_side), self.clip.patch)

    def _cached(self, name: str, key: tuple | None, compute):
        """``compute()``, kept for a repeated ``key``; never kept without one (a crop's own targets)."""
        if key is None:
            return compute()
        if (name, key) not in self._cache:
            self._cache[(name, key)] = compute()
        return self._cache[(name, key)]

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
        """-> {term: scalar}; "loss" is the weighted total. Terms are means over the examples.

        The step's randomness is drawn first, on the host, and sent to the device in one copy;
        :meth:`compute` is then tensor work only (it traces as one graph on the fast path)."""
        lc = self.cfg.loss
        draw = self.draw(len(layers), tuple(layers.source.shape[-2:]), gen).to(layers.source.device)
        weight = bootstrap_weight(step, self.bootstrap_steps, lc.lambda_bootstrap, lc.bootstrap_schedule)
        return self.compute(layers, draw, weight, cache_key)

    def compute(
        self, layers: Layers, draw: StepDraw, weight: float = 0.0, cache_key: tuple | None = None
    ) -> dict[str, torch.Tensor]:
        """Every term for ``layers`` with the random choices ``draw`` (on the layers' device) and the
        bootstrap weight of the step."""
        lc = self.cfg.loss
        boot_target = None
        if weight > 0:
            boot_target = self._cached("relevancy", cache_key, lambda: self.relevancy(layers.source))
        if self.batched:
            seen = self._embeddings(layers, draw)
            seen["tokens"], seen["structure_target"] = self._structure_tokens(layers, cache_key)
            seen["relevancy"] = boot_target
            return self._terms(layers, draw, weight, seen)
        # reference mode: one example, one loss, one CLIP call at a time
        per_example = []
        for i in range(len(layers)):
            one = layers[i]
            mine = StepDraw(
                *(p[i : i + 1] if p else None for p in (draw.clip, draw.direction, draw.screen)),
                draw.comp_idx,
                draw.dir_idx,
                draw.screen_idx,
            )
            seen = self._embeddings(one, mine, separate=True)
            if lc.lambda_structure > 0:
                seen["structure_target"] = self.structure_target(one.source)
                seen["tokens"] = self.encode_tokens(self._structure_view(one.composite))
            seen["relevancy"] = boot_target[i : i + 1] if boot_target is not None else None
            per_example.append(self._terms(one, mine, weight, seen))
        return {k: sum(t[k] for t in per_example) / len(layers) for k in per_example[0]}

    def _embeddings(self, layers: Layers, draw: StepDraw, separate: bool = False) -> dict:
        """What CLIP saw of the examples, by name: the view embeddings "clip" and "dir_out" (the
        composite), "dir_src" (the source, no gradient), "screen" (the green-screen image); the
        caller adds "tokens" and "structure_target" (structure loss) and "relevancy" (bootstrap).
        None where a loss is off."""
        wanted = {
            "clip": (layers.composite, draw.clip),
            "dir_out": (layers.composite, draw.direction),
            "screen": (layers.greenscreen, draw.screen),
        }
        wanted = {k: (images, p) for k, (images, p) in wanted.items() if p}
        names = ("clip", "dir_out", "dir_src", "screen", "tokens", "structure_target", "relevancy")
        emb: dict[str, torch.Tensor | None] = dict.fromkeys(names)
        if separate:
            for name, (images, params) in wanted.items():
                emb[name] = self.encode_image(self._views(images, params))
            if draw.direction:
                with torch.no_grad():
                    emb["dir_src"] = self.encode_image(self._views(layers.source, draw.direction))
            return emb
        views = {}
        for name, (images, params) in wanted.items():
            if name == "dir_out":  # the paired source views share the warp (one grid for both)
                pair = self._views(torch.cat([images, layers.source], dim=1), params)
                views[name], src_views = pair[:, :3], pair[:, 3:]
            else:
                views[name] = self._views(images, params)
        if views:
            out = self.encode_image(torch.cat(list(views.values())))
            for name, part in zip(views, out.split([len(v) for v in views.values()]), strict=True):
                emb[name] = part
        if draw.direction:
            with torch.no_grad():
                emb["dir_src"] = self.encode_image(src_views.detach())
        return emb

    def _structure_tokens(self, layers: Layers, cache_key: tuple | None):
        """Fast path: the output's structure tokens and the target, the crop's target computed in the
        same CLIP call (a cached target for a repeated key)."""
        if self.cfg.loss.lambda_structure <= 0:
            return None, None
        out_view = self._structure_view(layers.composite)
        if cache_key is not None and ("structure", cache_key) in self._cache:
            return self.encode_tokens(out_view), self._cache[("structure", cache_key)]
        b = len(layers)
        tokens = self.encode_tokens(torch.cat([out_view, self._structure_view(layers.source)]))
        with torch.no_grad():
            target = self_similarity(tokens[b:].detach())
        if cache_key is not None:
            self._cache[("structure", cache_key)] = target
        return tokens[:b], target

    def _terms(self, layers: Layers, draw: StepDraw, weight: float, seen: dict) -> dict[str, torch.Tensor]:
        """The terms and their weighted total from what CLIP saw (``seen``, see :meth:`_embeddings`)
        and the step's draw; ``weight`` is the bootstrap term's."""
        lc, texts, emb = self.cfg.loss, self.texts, seen
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=layers.source.device)
        if emb["clip"] is not None:
            terms["comp_clip"] = self.criterion(emb["clip"], texts.comp[draw.comp_idx]).mean()
            comp_total = terms["comp_clip"]
            if emb["dir_out"] is not None:
                dirs = texts.comp[draw.dir_idx] - texts.src[draw.dir_idx]
                terms["comp_dir"] = directional_loss(emb["dir_out"], emb["dir_src"], dirs)
                comp_total = comp_total + terms["comp_dir"]
            total = total + lc.lambda_composition * comp_total
        if emb["screen"] is not None:
            terms["screen"] = self.criterion(emb["screen"], texts.screen[draw.screen_idx]).mean()
            total = total + lc.lambda_screen * terms["screen"]
        if emb["structure_target"] is not None:
            terms["structure"] = self_similarity_mse(emb["tokens"], emb["structure_target"])
            total = total + lc.lambda_structure * terms["structure"]
        if lc.lambda_sparsity > 0:
            terms["sparsity"] = sparsity_loss(
                layers.alpha_l1, layers.alpha_l0, lc.lambda_alpha_l1, lc.lambda_alpha_l0
            )
            total = total + lc.lambda_sparsity * terms["sparsity"]
        if emb["relevancy"] is not None:
            target = emb["relevancy"]
            alpha = F.interpolate(
                layers.alpha.float(), size=target.shape[-2:], mode="bilinear", align_corners=False
            )
            terms["bootstrap"] = F.mse_loss(alpha[:, 0], target)
            total = total + weight * terms["bootstrap"]
        terms["loss"] = total
        return terms
