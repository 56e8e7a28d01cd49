"""The edit-layer generator: a Deep-Image-Prior "skip" encoder-decoder (DESIGN §1).

Input (B, 3, H, W) in [0, 1]; output RGBA (B, 4, H, W) in (0, 1) of the same size. Every scale
halves the resolution with a stride-2 3x3 conv; the decoder upsamples bilinearly and centre-crops
to the skip branch, so any size >= MIN_SIDE works. BatchNorm always uses batch statistics (the
reference never switches it to eval mode); we build it with ``track_running_stats=False`` so that
no running-statistics buffers are mutated inside a compiled graph.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import GeneratorConfig


def min_side(scales: int) -> int:
    """Smallest input side: the deepest feature map must keep 2 pixels for reflection padding."""
    return 2**scales + 1


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
    pad = (k - 1) // 2
    layers: list[nn.Module] = [nn.ReflectionPad2d(pad)] if pad else []
    layers.append(nn.Conv2d(cin, cout, k, stride=stride, bias=True))
    return nn.Sequential(*layers)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, track_running_stats=False)


def _act() -> nn.LeakyReLU:
    return nn.LeakyReLU(0.2)


def _upsample_to(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear upsampling by exactly 2 (align_corners=False), keeping the top-left (h, w): the same
    values as ``interpolate(scale_factor=2)`` then a centred crop to (h, w) (the stride-2 conv gives
    ceil(n / 2), so the doubled map has n or n + 1 pixels and the centred crop starts at 0). One op
    with the output size given: a compiled graph needs no guard on whether a crop happens, so one
    dynamic graph serves every input size."""
    return torch.ops.aten.upsample_bilinear2d.default(x, [h, w], False, 2.0, 2.0)


class _Level(nn.Module):
    """One scale: a 1x1 skip branch beside (down, inner levels, upsample), then the up convs."""

    def __init__(
        self,
        cin: int,
        down: int,
        up: int,
        skip: int,
        inner: nn.Module | None,
        inner_out: int,
        bn_after_1x1: bool,
    ):
        super().__init__()
        self.skip = nn.Sequential(_conv(cin, skip, 1), _bn(skip), _act()) if skip else None
        self.down = nn.Sequential(
            _conv(cin, down, 3, stride=2), _bn(down), _act(), _conv(down, down, 3), _bn(down), _act()
        )
        self.inner = inner
        deep = inner_out if inner is not None else down
        self.up = nn.Sequential(
            _bn(skip + deep),
            _conv(skip + deep, up, 3),
            _bn(up),
            _act(),
            _conv(up, up, 1),
            *([_bn(up)] if bn_after_1x1 else []),
            _act(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        deep = self.down(x)
        if self.inner is not None:
            deep = self.inner(deep)
        # doubled and cropped to x's size (the skip branch has that size already), sizes from x alone
        deep = _upsample_to(deep, x.shape[2], x.shape[3])
        if self.skip is None:
            return self.up(deep)
        return self.up(torch.cat([self.skip(x), deep], dim=1))


def _decorrelation_matrix() -> torch.Tensor:
    """3x3 map from a decorrelated colour space to RGB (square root of ImageNet's colour covariance,
    first component damped by 1.6, normalised by the largest column norm)."""
    m = torch.tensor([[0.26, 0.09, 0.02], [0.27, 0.00, -0.05], [0.27, -0.09, 0.03]])
    m = m / torch.tensor([1.6, 1.0, 1.0])
    return m / m.norm(dim=0).max()


class Generator(nn.Module):
    """RGBA edit-layer generator. ``forward``: (B, 3, H, W) -> (B, 4, H, W), values in (0, 1)."""

    def __init__(self, cfg: GeneratorConfig | None = None):
        super().__init__()
        cfg = cfg or GeneratorConfig()
        self.scales = cfg.scales
        inner: nn.Module | None = None
        inner_out = 0
        for i in reversed(range(cfg.scales)):
            cin = 3 if i == 0 else cfg.channels_down
            inner = _Level(
                cin,
                cfg.channels_down,
                cfg.channels_up,
                cfg.channels_skip,
                inner,
                inner_out,
                bn_after_1x1=i > 0,
            )
            inner_out = cfg.channels_up
        self.body = inner
        self.head = nn.Conv2d(cfg.channels_up, 4, 1, bias=True)
        self.register_buffer("decorrelate", _decorrelation_matrix(), persistent=False)

    @property
    def min_side(self) -> int:
        return min_side(self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(f"generator input {tuple(x.shape[-2:])} is smaller than {self.min_side} px")
        out = self.head(self.body(x))  # (B, 4, H, W) logits
        rgb = torch.einsum("dc,bchw->bdhw", self.decorrelate.to(out.dtype), out[:, :3])
        return torch.sigmoid(torch.cat([rgb, out[:, 3:]], dim=1))


class GeneratorGroup(nn.Module):
    """N generators of one structure run as one network (variants trained together): every
    convolution grouped (``groups=N``; the first level's read the shared input), every BatchNorm
    over the N·C channels (each generator's own batch statistics), each skip concatenation
    interleaved per generator. ``forward(x)``: (B, 3, H, W) -> (N, B, 4, H, W), generator k's output
    at [k]. The weights are the generators' own, concatenated at each call, so each gets its own
    gradient. Plain ops on dynamic sizes: one compiled graph serves every crop size (``vmap`` over
    the generators specialised on the size, through BatchNorm's batching rule)."""

    def __init__(self, generators: list[Generator]):
        super().__init__()
        self.generators = nn.ModuleList(generators)
        self.min_side = generators[0].min_side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if min(x.shape[-2:]) < self.min_side:
            raise ValueError(f"generator input {tuple(x.shape[-2:])} is smaller than {self.min_side} px")
        gens = list(self.generators)
        n = len(gens)
        out = self._level([g.body for g in gens], x, shared=True)
        out = self._layer([g.head for g in gens], out, shared=False)[0].unflatten(1, (n, 4))
        decorrelate = gens[0].decorrelate.to(out.dtype)
        rgb = torch.einsum("dc,bnchw->nbdhw", decorrelate, out[:, :, :3])
        return torch.sigmoid(torch.cat([rgb, out[:, :, 3:].transpose(0, 1)], dim=2))

    def _level(self, levels: list, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """:class:`_Level`'s forward for the group (``shared``: x is the input every generator reads)."""
        n = len(levels)
        deep = self._layer([lv.down for lv in levels], x, shared)[0]
        if levels[0].inner is not None:
            deep = self._level([lv.inner for lv in levels], deep, shared=False)
        deep = _upsample_to(deep, x.shape[2], x.shape[3])
        if levels[0].skip is not None:
            skip = self._layer([lv.skip for lv in levels], x, shared)[0]
            deep = torch.cat([skip.unflatten(1, (n, -1)), deep.unflatten(1, (n, -1))], dim=2).flatten(1, 2)
        return self._layer([lv.up for lv in levels], deep, shared=False)[0]

    def _layer(self, mods: list, x: torch.Tensor, shared: bool) -> tuple[torch.Tensor, bool]:
        """The same layer of every generator on the group's activations -> (output, shared)."""
        first = mods[0]
        if isinstance(first, nn.Sequential):
            for i in range(len(first)):
                x, shared = self._layer([m[i] for m in mods], x, shared)
            return x, shared
        if isinstance(first, nn.Conv2d):
            weight = torch.cat([m.weight for m in mods])
            bias = torch.cat([m.bias for m in mods])
            groups = 1 if shared else len(mods)
            return F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation, groups), False
        if isinstance(first, nn.BatchNorm2d):
            weight = torch.cat([m.weight for m in mods])
            bias = torch.cat([m.bias for m in mods])
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, first.eps), shared
        if isinstance(first, (nn.ReflectionPad2d, nn.LeakyReLU)):  # no parameters: the same op
            return first(x), shared
        raise TypeError(f"GeneratorGroup: no grouped form for {type(first).__name__}")
