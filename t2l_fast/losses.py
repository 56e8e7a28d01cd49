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

from .augment import (
    ViewParams,
    full_precision,
    host_side,
    make_views,
    resample_size,
    resize_view,
    to_device,
    view_size,
)
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
    def encode(clip: Clip, cfg: Config) -> Texts:
        for message in prompt_warnings(clip, cfg):
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


@dataclass
class StepDraw:
    """The random choices of one objective call, drawn before any computation (both modes draw the
    same numbers in the same order): per example the CLIP-loss views, the directional views (paired:
    the same geometry for source and output) and the screen views; the template subsets as
    fixed-length weights (:func:`template_weights`); the step's bootstrap weight (0-dim), so that
    every number of a step that changes from step to step is a tensor of a fixed shape; and the size
    the examples are first resampled to for their views (:func:`~t2l_fast.augment.resample_size`)."""

    clip: list[ViewParams] | None
    direction: list[ViewParams] | None
    screen: list[ViewParams] | None
    comp_w: torch.Tensor | None
    dir_w: torch.Tensor | None
    screen_w: torch.Tensor | None
    bootstrap: torch.Tensor
    base: tuple[int, int]

    def to(self, device: torch.device | str) -> StepDraw:
        """Every parameter on ``device`` in one transfer (drawn on the host: no sync)."""
        views = [p for group in (self.clip, self.direction, self.screen) for p in group or []]
        weights = [t for t in (self.comp_w, self.dir_w, self.screen_w) if t is not None]
        moved = iter(to_device([t for p in views for t in p.tensors()] + weights + [self.bootstrap], device))
        width = len(views[0].tensors()) if views else 0

        def group(items):
            if not items:
                return None
            return [ViewParams.from_tensors([next(moved) for _ in range(width)], p.size) for p in items]

        clip, direction, screen = group(self.clip), group(self.direction), group(self.screen)
        comp, dir_, scr = (
            next(moved) if t is not None else None for t in (self.comp_w, self.dir_w, self.screen_w)
        )
        return StepDraw(clip, direction, screen, comp, dir_, scr, next(moved), self.base)

    def example(self, i: int) -> StepDraw:
        """The draws of example ``i`` alone (reference mode feeds the examples one by one)."""
        views = (p[i : i + 1] if p else None for p in (self.clip, self.direction, self.screen))
        return StepDraw(*views, self.comp_w, self.dir_w, self.screen_w, self.bootstrap, self.base)


class Objective:
    """Computes every loss term for a batch of examples of one size (:class:`Layers`).

    ``batched=True`` (the fast path) feeds all the views of a call to CLIP together (one call with
    gradient, one without for the source views) and computes the structure target in the same call
    as the output's tokens: views, CLIP, targets and every loss are one region (:meth:`_batched`),
    which ``compile`` (e.g. the engine's ``torch.compile``) turns into one graph for every step. The
    relevancy target of the bootstrap (it needs its own gradient pass) is computed outside it and
    cached for a repeated ``cache_key`` (the un-augmented input, the whole atlas). ``batched=False``
    (the reference mode) does the same computations one example and one loss at a time, as the
    original code does. Both compute the same values.

    Views follow the original's sizes: ``Resize(224, max_size=320)`` of each example (aspect ratio
    kept; structure view: max 380), then only the whole 32-px patches reach CLIP.
    """

    def __init__(
        self,
        clip: Clip,
        cfg: Config,
        texts: Texts | None = None,
        *,
        batched: bool = False,
        compile=None,
    ):
        self.clip = clip
        self.cfg = cfg
        self.texts = texts or Texts.encode(clip, cfg)
        self.bootstrap_steps = cfg.effective_bootstrap_steps if self.texts.bootstrap is not None else 0
        self.criterion = spherical_distance if cfg.loss.text_criterion == "spherical" else cosine_criterion
        self.batched = batched
        self.encode_image = clip.encode_image
        self.encode_tokens = clip.encode_tokens
        self._batched_region = compile(self._batched) if compile is not None else self._batched
        self._cache: dict[tuple, torch.Tensor] = {}

    # -- randomness ---------------------------------------------------------------------------------
    @property
    def draw_signature(self) -> tuple:
        """What decides how many numbers a draw takes and the bootstrap weight: objectives with the
        same signature draw the same numbers from the same generator."""
        t = self.texts
        return tuple(None if x is None else len(x) for x in (t.comp, t.src, t.screen)) + (
            self.bootstrap_steps,
        )

    def _pick(self, n_total: int, gen: torch.Generator) -> torch.Tensor:
        """A random subset of template indices (random size, drawn with replacement), as the share
        of each template in it (:func:`template_weights`)."""
        k = int(torch.randint(1, n_total + 1, (1,), generator=gen))
        return template_weights(torch.randint(n_total, (k,), generator=gen), n_total)

    @host_side
    def draw(self, b: int, hw: tuple[int, int], gen: torch.Generator, weight: float = 0.0) -> StepDraw:
        """The random choices for ``b`` examples of size ``hw`` (see :class:`StepDraw`); ``weight``
        is the step's bootstrap weight."""
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
            torch.tensor(weight, dtype=torch.float64),
            resample_size(hw, size, v.min_cover),
        )

    # -- source-side targets --------------------------------------------------------------------------
    def _views(self, images: torch.Tensor, params: list[ViewParams], base: tuple[int, int]) -> torch.Tensor:
        """The views, whole: CLIP's strided patch embedding reads only the whole patches of them."""
        return make_views(images, ViewParams.cat(params), self.cfg.views.fill, self.cfg.views.min_cover, base)

    def _structure_view(self, images: torch.Tensor) -> torch.Tensor:
        v = self.cfg.views
        return resize_view(images, v.short_side, v.structure_max_long_side)

    def _cached(self, name: str, key: tuple | None, compute):
        """``compute()``, kept for a repeated ``key``; never kept without one (a crop's own targets)."""
        if key is None:
            return compute()
        if (name, key) not in self._cache:
            self._cache[(name, key)] = compute()
        return self._cache[(name, key)]

    def relevancy(self, source: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 224, 224) relevancy maps of the bootstrap prompt. The input is
        resized as the original's ``T.Resize((224, 224))`` on tensors (torchvision 0.11): bilinear,
        not antialiased."""
        square = F.interpolate(
            source,
            size=(RELEVANCY_SIZE, RELEVANCY_SIZE),
            mode="bilinear",
            antialias=False,
            align_corners=False,
        )
        return self.clip.relevancy(square, self.texts.bootstrap, self.cfg.loss.relevancy_num_layers)

    def structure_target(self, source: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self_similarity(self.encode_tokens(self._structure_view(source)))

    # -- the objective ----------------------------------------------------------------------------
    def plan(self, step: int, hw: tuple[int, int], gen: torch.Generator, b: int = 1) -> StepDraw:
        """The random choices of a call at ``step`` for ``b`` examples of size ``hw``, on the host
        (what :meth:`__call__` draws first; a training loop may draw them ahead of the step)."""
        lc = self.cfg.loss
        weight = bootstrap_weight(step, self.bootstrap_steps, lc.lambda_bootstrap, lc.bootstrap_schedule)
        return self.draw(b, hw, gen, weight)

    def __call__(
        self,
        layers: Layers,
        step: int,
        gen: torch.Generator,
        cache_key: tuple | None = None,
        draw: StepDraw | None = None,
    ) -> dict[str, torch.Tensor]:
        """-> {term: scalar}; "loss" is the weighted total. Terms are means over the examples.

        The step's randomness is drawn first, on the host (:meth:`plan`, unless ``draw`` brings it),
        and sent to the device in one copy; :meth:`compute` is then tensor work only (it traces as
        one graph on the fast path)."""
        if draw is None:
            draw = self.plan(step, tuple(layers.source.shape[-2:]), gen, len(layers))
        weight = float(draw.bootstrap)  # the host's copy
        return self.compute(layers, draw.to(layers.source.device), weight, cache_key)

    def compute(
        self, layers: Layers, draw: StepDraw, weight: float = 0.0, cache_key: tuple | None = None
    ) -> dict[str, torch.Tensor]:
        """Every term for ``layers`` with the random choices ``draw`` (on the layers' device).
        ``weight``, the host's copy of ``draw.bootstrap``, says whether the relevancy target is needed."""
        boot_target = None
        if weight > 0:
            boot_target = self._cached("relevancy", cache_key, lambda: self.relevancy(layers.source))
        if self.batched:
            return self._batched_region(layers, draw, boot_target)
        # reference mode: one example, one loss, one CLIP call at a time
        per_example = []
        for i in range(len(layers)):
            one, mine = layers[i], draw.example(i)
            seen = self._embeddings(one, mine, separate=True)
            if self.cfg.loss.lambda_structure > 0:
                seen["structure_target"] = self.structure_target(one.source)
                seen["tokens"] = self.encode_tokens(self._structure_view(one.composite))
            seen["relevancy"] = boot_target[i : i + 1] if boot_target is not None else None
            per_example.append(self._terms(one, mine, seen))
        return {k: sum(t[k] for t in per_example) / len(layers) for k in per_example[0]}

    def _batched(
        self, layers: Layers, draw: StepDraw, relevancy: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The fast path's region: every view in one CLIP call with gradient (and one without for the
        directional source views), the structure tokens of output and source in one call, the losses."""
        seen = self._embeddings(layers, draw)
        seen["tokens"], seen["structure_target"] = self._structure_tokens(layers)
        seen["relevancy"] = relevancy
        return self._terms(layers, draw, seen)

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
                emb[name] = self.encode_image(self._views(images, params, draw.base))
            if draw.direction:
                with torch.no_grad():
                    emb["dir_src"] = self.encode_image(self._views(layers.source, draw.direction, draw.base))
            return emb
        views = {}
        for name, (images, params) in wanted.items():
            if name == "dir_out":  # the paired source views share the warp (one grid for both)
                pair = self._views(torch.cat([images, layers.source], dim=1), params, draw.base)
                views[name], src_views = pair[:, :3], pair[:, 3:]
            else:
                views[name] = self._views(images, params, draw.base)
        if views:
            out = self.encode_image(torch.cat(list(views.values())))
            for name, part in zip(views, out.split([len(v) for v in views.values()]), strict=True):
                emb[name] = part
        if draw.direction:
            with torch.no_grad():
                emb["dir_src"] = self.encode_image(src_views.detach())
        return emb

    def _structure_tokens(self, layers: Layers):
        """Fast path: the output's structure tokens and the target, computed from the source in the
        same CLIP call (every step: a cached target would be a second graph for a 1/75 saving)."""
        if self.cfg.loss.lambda_structure <= 0:
            return None, None
        b = len(layers)
        views = torch.cat([self._structure_view(layers.composite), self._structure_view(layers.source)])
        tokens = self.encode_tokens(views)
        with torch.no_grad():
            target = self_similarity(tokens[b:].detach())
        return tokens[:b], target

    @full_precision
    def _terms(self, layers: Layers, draw: StepDraw, seen: dict) -> dict[str, torch.Tensor]:
        """The terms and their weighted total from what CLIP saw (``seen``, see :meth:`_embeddings`)
        and the step's draw (its template weights and bootstrap weight)."""
        lc, texts, emb = self.cfg.loss, self.texts, seen
        terms: dict[str, torch.Tensor] = {}
        total = torch.zeros((), device=layers.source.device)
        if emb["clip"] is not None:
            terms["comp_clip"] = weighted_mean(self.criterion(emb["clip"], texts.comp), draw.comp_w)
            comp_total = terms["comp_clip"]
            if emb["dir_out"] is not None:
                paired = len(draw.dir_w)  # the first min(P·14, Q·14) template pairs
                dirs = texts.comp[:paired] - texts.src[:paired]
                terms["comp_dir"] = directional_loss(emb["dir_out"], emb["dir_src"], dirs, draw.dir_w)
                comp_total = comp_total + terms["comp_dir"]
            total = total + lc.lambda_composition * comp_total
        if emb["screen"] is not None:
            terms["screen"] = weighted_mean(self.criterion(emb["screen"], texts.screen), draw.screen_w)
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
            per_example = F.mse_loss(alpha[:, 0], target, reduction="none").mean(dim=(1, 2))
            terms["bootstrap"] = layers.bootstrap_mean(per_example)
            total = total + draw.bootstrap.to(total.dtype) * terms["bootstrap"]
        terms["loss"] = total
        return terms
