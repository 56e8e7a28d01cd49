"""The Text2LIVE objective's computation: the random choices of a step (:class:`StepDraw`) and the
:class:`Objective`, which turns what a generator made (:class:`~t2l_fast.losses.Layers`) into every
loss term through the frozen CLIP, for one run or for the variants of a group. The formulas
themselves are :mod:`t2l_fast.losses`."""

from __future__ import annotations

from collections.abc import Sequence
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
from .kernels import self_similarity, self_similarity_mse
from .losses import (
    RELEVANCY_SIZE,
    Layers,
    Texts,
    bootstrap_weight,
    cosine_criterion,
    directional_loss,
    signature,
    sparsity_loss,
    spherical_distance,
    template_weights,
    weighted_mean,
)
from .models.clip import Clip


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
    """Computes every loss term for a batch of examples of one size (:class:`Layers`), for one run or
    for the N variants of a group (one config each: their prompts; the rest of their settings alike).

    ``batched=True`` (the fast path) feeds all the views of a call to CLIP together (one call with
    gradient, one without for the source views) and computes the structure target in the same call
    as the output's tokens: views, CLIP, targets and every loss are one region (:meth:`_batched`),
    which ``compile`` (e.g. the engine's ``torch.compile``) turns into one graph for every step. For
    a group the region is the same one for all the variants: their views share the draws (one warp
    of their images stacked on the channels), their outputs go through CLIP in that one call, and the
    source side (the directional source views, the structure target) is computed once. The relevancy
    target of the bootstrap (it needs its own gradient pass) is computed outside it, once per
    bootstrap prompt, and cached for a repeated ``cache_key`` (the un-augmented input, the whole
    atlas). ``batched=False`` (the reference mode) does the same computations one variant, one
    example and one loss at a time, as the original code does. Both compute the same values.

    Views follow the original's sizes: ``Resize(224, max_size=320)`` of each example (aspect ratio
    kept; structure view: max 380), then only the whole 32-px patches reach CLIP.
    """

    def __init__(
        self,
        clip: Clip,
        cfg: Config | Sequence[Config],
        texts: Texts | None = None,
        *,
        batched: bool = False,
        compile=None,
    ):
        cfgs = [cfg] if isinstance(cfg, Config) else list(cfg)
        self.clip = clip
        self.cfg = cfgs[0]  # the settings every variant shares (views, loss weights)
        memo: dict = {}  # the variants' shared prompts: encoded once
        self.variant_texts = [texts] if texts is not None else [Texts.encode(clip, c, memo) for c in cfgs]
        self.texts = self.variant_texts[0]
        self._boot_prompts = [c.effective_bootstrap_prompt for c in cfgs]
        self.bootstrap_steps = self.cfg.effective_bootstrap_steps if self.texts.bootstrap is not None else 0
        if len({signature(t) for t in self.variant_texts}) > 1:
            raise ValueError("variants must share their prompts' structure (ROI prompt for all or none)")
        self.criterion = (
            spherical_distance if self.cfg.loss.text_criterion == "spherical" else cosine_criterion
        )
        self.batched = batched
        self.encode_image = clip.encode_image
        self.encode_tokens = clip.encode_tokens
        self._batched_region = compile(self._batched) if compile is not None else self._batched
        self._cache: dict[tuple, torch.Tensor] = {}

    # -- randomness ---------------------------------------------------------------------------------
    @property
    def drawsignature(self) -> tuple:
        """What decides how many numbers a draw takes and the bootstrap weight: objectives with the
        same signature draw the same numbers from the same generator."""
        return signature(self.texts) + (self.bootstrap_steps,)

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

    def relevancy(self, source: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 224, 224) relevancy maps of the bootstrap prompt (``text``: its
        embedding, by default the first variant's). The input is resized as the original's
        ``T.Resize((224, 224))`` on tensors (torchvision 0.11): bilinear, not antialiased."""
        square = F.interpolate(
            source,
            size=(RELEVANCY_SIZE, RELEVANCY_SIZE),
            mode="bilinear",
            antialias=False,
            align_corners=False,
        )
        text = self.texts.bootstrap if text is None else text
        return self.clip.relevancy(square, text, self.cfg.loss.relevancy_num_layers)

    def _relevancies(self, source: torch.Tensor, cache_key: tuple | None) -> list[torch.Tensor]:
        """Each variant's relevancy target of ``source``: computed once per bootstrap prompt."""
        done: dict[str, torch.Tensor] = {}
        for prompt, texts in zip(self._boot_prompts, self.variant_texts, strict=True):
            if prompt not in done:
                key = None if cache_key is None else (prompt, *cache_key)
                done[prompt] = self._cached(
                    "relevancy", key, lambda t=texts: self.relevancy(source, t.bootstrap)
                )
        return [done[prompt] for prompt in self._boot_prompts]

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
        layers: Layers | list[Layers],
        step: int,
        gen: torch.Generator,
        cache_key: tuple | None = None,
        draw: StepDraw | None = None,
    ):
        """-> {term: scalar}; "loss" is the weighted total. Terms are means over the examples. For a
        group, ``layers`` holds one :class:`Layers` per variant (all of one source: the same crop)
        and the result is a list, one dict per variant.

        The step's randomness is drawn first, on the host (:meth:`plan`, unless ``draw`` brings it),
        once for the group, and sent to the device in one copy; :meth:`compute` is then tensor work
        only (it traces as one graph on the fast path)."""
        group = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if draw is None:
            draw = self.plan(step, tuple(group[0].source.shape[-2:]), gen, len(group[0]))
        weight = float(draw.bootstrap)  # the host's copy
        terms = self.compute(group, draw.to(group[0].source.device), weight, cache_key)
        return terms if isinstance(layers, (list, tuple)) else terms[0]

    def compute(
        self,
        layers: Layers | list[Layers],
        draw: StepDraw,
        weight: float = 0.0,
        cache_key: tuple | None = None,
    ):
        """Every term for ``layers`` (one per variant, or one Layers: one dict) with the random
        choices ``draw`` (on the layers' device). ``weight``, the host's copy of ``draw.bootstrap``,
        says whether the relevancy target is needed."""
        group = list(layers) if isinstance(layers, (list, tuple)) else [layers]
        if len(group) != len(self.variant_texts):
            raise ValueError(f"{len(group)} layers for {len(self.variant_texts)} variants")
        targets: list[torch.Tensor | None] = [None] * len(group)
        if weight > 0:
            targets = list(self._relevancies(group[0].source, cache_key))
        if self.batched:
            terms = self._batched_region(group, draw, targets)
        else:
            terms = [
                self._reference(one, draw, t, texts)
                for one, t, texts in zip(group, targets, self.variant_texts, strict=True)
            ]
        return terms if isinstance(layers, (list, tuple)) else terms[0]

    def _reference(
        self, layers: Layers, draw: StepDraw, boot_target, texts: Texts
    ) -> dict[str, torch.Tensor]:
        """Reference mode: one example, one loss, one CLIP call at a time."""
        per_example = []
        for i in range(len(layers)):
            one, mine = layers[i], draw.example(i)
            seen = self._embeddings([one], mine, separate=True)[0]
            if self.cfg.loss.lambda_structure > 0:
                seen["structure_target"] = self.structure_target(one.source)
                seen["tokens"] = self.encode_tokens(self._structure_view(one.composite))
            seen["relevancy"] = boot_target[i : i + 1] if boot_target is not None else None
            per_example.append(self._terms(one, mine, seen, texts))
        return {k: sum(t[k] for t in per_example) / len(layers) for k in per_example[0]}

    def _batched(
        self, layers: list[Layers], draw: StepDraw, relevancy: list[torch.Tensor | None]
    ) -> list[dict[str, torch.Tensor]]:
        """The fast path's region for the variants' ``layers``: every view in one CLIP call with
        gradient (and one without for the directional source views), the structure tokens of the
        outputs and the source in one call, each variant's losses."""
        seen = self._embeddings(layers, draw)
        tokens, target = self._structure_tokens(layers)
        for k, s in enumerate(seen):
            s["tokens"], s["structure_target"] = None if tokens is None else tokens[k], target
            s["relevancy"] = relevancy[k]
        each = zip(layers, seen, self.variant_texts, strict=True)
        return [self._terms(one, draw, s, texts) for one, s, texts in each]

    def _embeddings(self, layers: list[Layers], draw: StepDraw, separate: bool = False) -> list[dict]:
        """What CLIP saw of each variant's examples, by name: the view embeddings "clip" and
        "dir_out" (the composite), "dir_src" (the source, no gradient; the variants share it),
        "screen" (the green-screen image); the caller adds "tokens" and "structure_target"
        (structure loss) and "relevancy" (bootstrap). None where a loss is off. The variants' images
        are stacked on the channels: one warp per view kind for all of them (the views share draws)."""
        source = layers[0].source
        wanted = {
            "clip": ([one.composite for one in layers], draw.clip),
            "dir_out": ([one.composite for one in layers], draw.direction),
            "screen": ([one.greenscreen for one in layers], draw.screen),
        }
        wanted = {k: (images, p) for k, (images, p) in wanted.items() if p}
        names = ("clip", "dir_out", "dir_src", "screen", "tokens", "structure_target", "relevancy")
        emb: list[dict[str, torch.Tensor | None]] = [dict.fromkeys(names) for _ in layers]
        if separate:
            for name, (images, params) in wanted.items():
                for k, image in enumerate(images):
                    emb[k][name] = self.encode_image(self._views(image, params, draw.base))
            if draw.direction:
                with torch.no_grad():
                    src = self.encode_image(self._views(source, draw.direction, draw.base))
                for e in emb:
                    e["dir_src"] = src
            return emb
        views: dict[str, tuple[torch.Tensor, ...]] = {}
        for name, (images, params) in wanted.items():
            if name == "dir_out":  # the paired source views share the warp (one grid for all)
                *views_out, src_views = self._views(
                    torch.cat([*images, source], dim=1), params, draw.base
                ).split(3, dim=1)
                views[name] = tuple(views_out)
            else:
                views[name] = self._views(torch.cat(images, dim=1), params, draw.base).split(3, dim=1)
        flat = [v for parts in views.values() for v in parts]
        if flat:
            out = iter(self.encode_image(torch.cat(flat)).split([len(v) for v in flat]))
            for name in views:
                for e in emb:
                    e[name] = next(out)
        if draw.direction:
            with torch.no_grad():
                src = self.encode_image(src_views.detach())
            for e in emb:
                e["dir_src"] = src
        return emb

    def _structure_tokens(self, layers: list[Layers]):
        """Fast path: each variant's structure tokens, and the target, computed from the source in
        the same CLIP call (every step: a cached target would be a second graph for a 1/75 saving)."""
        if self.cfg.loss.lambda_structure <= 0:
            return None, None
        b = len(layers[0])
        images = [one.composite for one in layers] + [layers[0].source]
        tokens = self.encode_tokens(torch.cat([self._structure_view(x) for x in images]))
        with torch.no_grad():
            target = self_similarity(tokens[-b:].detach())
        return tokens[:-b].split(b), target

    @full_precision
    def _terms(
        self, layers: Layers, draw: StepDraw, seen: dict, texts: Texts | None = None
    ) -> dict[str, torch.Tensor]:
        """The terms and their weighted total from what CLIP saw (``seen``, see :meth:`_embeddings`)
        and the step's draw (its template weights and bootstrap weight), against ``texts`` (the
        variant's; by default the first)."""
        lc, emb = self.cfg.loss, seen
        texts = self.texts if texts is None else texts
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
