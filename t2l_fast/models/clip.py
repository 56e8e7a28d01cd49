"""CLIP for the losses: open_clip's ViT with our own image forward.

Our forward over open_clip's weights adds what Text2LIVE needs and open_clip does not give in one
pass: bicubic interpolation of the positional embedding for non-square views, the tokens after all
but the last residual block (structure loss), and the attention probabilities of chosen blocks
(relevancy). Attention runs through ``scaled_dot_product_attention`` except where probabilities
are kept. Weights are frozen (``requires_grad_(False)``); gradients flow to the input only.

Loading (:func:`load_clip`): ``test-tiny`` (small, random, deterministic, offline); an open_clip
model name with OpenAI weights from the Hugging Face hub; or a local weights file (safetensors, a
plain state dict, or OpenAI's TorchScript ``ViT-B-32.pt`` after its SHA-256 is verified).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import open_clip
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..io import InputError, atomic_path

log = logging.getLogger(__name__)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
TEST_TINY = "test-tiny"
# SHA-256 of OpenAI's TorchScript archives, as published in their download URLs.
OPENAI_SHA256 = {"ViT-B-32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"}


class ClipWeightsError(InputError):
    """CLIP weights missing, unreachable or not trustworthy."""


def bicubic_matrix(out: int, size: int, device: torch.device | None = None) -> torch.Tensor:
    """(out, size): resampling ``size`` samples to ``out`` along one axis as ``F.interpolate(mode=
    "bicubic", align_corners=False)`` does (cubic convolution, a = -0.75, taps clamped at the border)."""
    a = -0.75
    real = (torch.arange(out, device=device, dtype=torch.float32) + 0.5) * (size / out) - 0.5
    first = torch.floor(real)
    t = (real - first).unsqueeze(1)
    d = torch.cat([t + 1, t, 1 - t, 2 - t], dim=1)  # distance to each of the four taps
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    weights = torch.cat([far[:, :1], near[:, 1:3], far[:, 3:]], dim=1)  # (out, 4)
    taps = (first.long().unsqueeze(1) + torch.arange(-1, 3, device=device)).clamp(0, size - 1)
    return (F.one_hot(taps, size).to(weights.dtype) * weights.unsqueeze(2)).sum(dim=1)


class Clip(nn.Module):
    """A frozen open_clip CLIP with the image forward Text2LIVE needs.

    Images given to the ``encode_*`` methods are RGB in [0, 1], shape (B, 3, h, w); as in the
    original, the strided patch embedding reads whole patches only (pixels past the last whole patch
    are dropped). Normalisation happens inside.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str, is_test_model: bool = False):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.is_test_model = is_test_model
        visual = model.visual
        self.patch = visual.conv1.kernel_size[0]
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self._pos_cache: dict[tuple, torch.Tensor] = {}
        self.attention = "sdpa"

    def set_attention(self, backend: str) -> str:
        """Choose the attention kernel: ``sdpa`` (torch) or ``xformers`` (the optional extra).

        xformers is used only when it imports and has kernels for this device; otherwise one
        warning says why and SDPA stays. Returns the backend in use.
        """
        if backend == "sdpa":
            self.attention = "sdpa"
            return self.attention
        if backend != "xformers":
            raise ValueError(f"unknown attention backend {backend!r}: use sdpa or xformers")
        reason = None
        if self.mean.device.type != "cuda":
            reason = "it has no CPU kernels"
        else:
            try:
                import xformers.ops as xops

                q = torch.zeros(1, 4, 1, 64, device=self.mean.device, dtype=torch.float16)
                xops.memory_efficient_attention(q, q, q)
            except Exception as exc:  # missing package, or extensions built for another torch
                first = str(exc).splitlines()[0][:100] if str(exc) else ""
                reason = f"it cannot run here ({type(exc).__name__}: {first})"
        if reason:
            log.warning("xformers attention not used, %s; using torch SDPA instead", reason)
            self.attention = "sdpa"
        else:
            self.attention = "xformers"
        return self.attention

    # -- text -------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """(N,) strings -> (N, E) embeddings (not normalised)."""
        device = self.mean.device
        tokens = self.tokenizer(texts).to(device)
        return self.model.encode_text(tokens).float()

    # -- image ------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.model.visual.transformer.resblocks)

    def _interpolated_pos(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.model.visual.positional_embedding.detach()  # (1 + g*g, D)
        g = int(round((pos.shape[0] - 1) ** 0.5))
        cls, grid = pos[:1], pos[1:].reshape(g, g, -1).float()
        # bicubic resampling as two small matrices (one per axis): a few ops in a compiled graph at
        # any grid size, where a traced F.interpolate(bicubic) is hundreds; no branch on the size
        # (to the native g x g grid the matrices are the identity, exactly: tested)
        rows, cols = bicubic_matrix(gh, g, grid.device), bicubic_matrix(gw, g, grid.device)
        grid = torch.einsum("hi,wj,ijd->hwd", rows, cols, grid).reshape(gh * gw, -1)
        return torch.cat([cls, grid.to(cls.dtype)], dim=0).to(dtype)

    def _pos_embedding(self, gh: int, gw: int, dtype: torch.dtype) -> torch.Tensor:
        """The positional embedding interpolated bicubically to a gh x gw token grid. Eager calls
        keep it per grid; under torch.compile it is part of the graph (no Python state mutated)."""
        if torch.compiler.is_compiling():
            return self._interpolated_pos(gh, gw, dtype)
        key = (gh, gw, dtype, self.mean.device)
        if key not in self._pos_cache:
            self._pos_cache[key] = self._interpolated_pos(gh, gw, dtype)
        return self._pos_cache[key]

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        if min(images.shape[-2:]) < self.patch:
            raise ValueError(
                f"view size {tuple(images.shape[-2:])} is smaller than one {self.patch}-px patch"
            )
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        x = v.conv1(x.to(v.conv1.weight.dtype))  # (B, D, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (B, gh*gw, D)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self._pos_embedding(gh, gw, x.dtype)
        return v.ln_pre(x)

    def _block(
        self, block: nn.Module, x: torch.Tensor, keep_attention: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One residual block; returns (x, attention probabilities (B, heads, L, L) or None)."""
        attn = block.attn  # nn.MultiheadAttention with packed in-projection
        b, n, d = x.shape
        heads = attn.num_heads
        h = block.ln_1(x)
        qkv = F.linear(h, attn.in_proj_weight, attn.in_proj_bias)  # (B, L, 3D)
        q, k, v = qkv.view(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, L, Dh)
        probs = None
        if keep_attention:
            probs = torch.softmax((q @ k.transpose(-1, -2)) * (d // heads) ** -0.5, dim=-1)
            out = probs @ v
        elif self.attention == "xformers":
            import xformers.ops as xops

            out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            out = out.transpose(1, 2)  # xformers works in (B, L, H, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = attn.out_proj(out.transpose(1, 2).reshape(b, n, d))
        x = x + block.ls_1(out)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        return x, probs

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        v = self.model.visual
        pooled = v.ln_post(x[:, 0])
        return pooled @ v.proj if v.proj is not None else pooled

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, E) image embeddings (not normalised)."""
        x = self._embed(images)
        for block in self.model.visual.transformer.resblocks:
            x, _ = self._block(block, x, False)
        return self._head(x)

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h, w) -> (B, 1 + gh*gw, D): tokens after all but the last block (CLS first)."""
        x = self._embed(images)
        for block in list(self.model.visual.transformer.resblocks)[:-1]:
            x, _ = self._block(block, x, False)
        return x

    def relevancy(self, images: torch.Tensor, text_embedding: torch.Tensor, start_layer: int) -> torch.Tensor:
        """Chefer et al.'s gradient-weighted attention rollout for ``text_embedding``.

        images (B, 3, S, S) in [0, 1] with S a multiple of the patch size; text_embedding (E,).
        For the blocks after ``start_layer`` (clamped so that at least the last block counts):
        cam = mean over heads of clamp(grad * attn, min=0); R <- R + cam @ R from the identity.
        Returns (B, S, S) in [0, 1]: the CLS row over the patches, bilinearly upsampled,
        min-max normalised per image. Needs no gradient from the caller.
        """
        start = min(start_layer, self.num_blocks - 2)
        with torch.enable_grad():
            images = images.detach().requires_grad_(True)  # builds the graph; weights are frozen
            x = self._embed(images)
            kept = []
            for i, block in enumerate(self.model.visual.transformer.resblocks):
                x, probs = self._block(block, x, keep_attention=i > start)
                if probs is not None:
                    kept.append(probs)
            emb = F.normalize(self._head(x).float(), dim=-1)
            score = (emb @ F.normalize(text_embedding.float(), dim=-1)).sum()
            grads = torch.autograd.grad(score, kept)
        b, _, n, _ = kept[0].shape
        rel = torch.eye(n, device=images.device).expand(b, n, n)
        for probs, grad in zip(kept, grads, strict=True):
            cam = (grad * probs).clamp(min=0).mean(dim=1).float()  # (B, L, L)
            rel = rel + cam @ rel
        gh, gw = images.shape[-2] // self.patch, images.shape[-1] // self.patch
        r = rel[:, 0, 1:].reshape(b, 1, gh, gw).detach()
        r = F.interpolate(r, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        lo = r.amin(dim=(1, 2), keepdim=True)
        hi = r.amax(dim=(1, 2), keepdim=True)
        return (r - lo) / (hi - lo).clamp_min(1e-12)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def build_test_tiny() -> Clip:
    """A small random CLIP, identical on every machine: for tests and smoke runs only."""
    vision = {"image_size": 224, "layers": 3, "width": 64, "head_width": 32, "patch_size": 32}
    text = {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(20221012)
        model = open_clip.model.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text, quick_gelu=True)
    return Clip(model, open_clip.get_tokenizer("ViT-B-32"), TEST_TINY, is_test_model=True)


def _hub_file(name: str, tag: str) -> tuple[str, list[str]]:
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if not cfg or not cfg.get("hf_hub"):
        raise ClipWeightsError(f"open_clip has no hub weights for {name} ({tag}): pass --clip-weights PATH")
    repo = cfg["hf_hub"].strip("/")
    return repo, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_hub_weights(name: str, tag: str = "openai") -> str:
    """Path of the hub weights, from the cache if there; fails at once (no retries) when offline."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    repo, files = _hub_file(name, tag)
    for filename in files:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str) and os.path.isfile(cached):
            return cached
    how = (
        f"CLIP weights {name} ({tag}) are not in the Hugging Face cache and the hub cannot be reached; "
        "download them elsewhere and pass --clip-weights PATH "
        "(safetensors, a state dict, or OpenAI's ViT-B-32.pt)"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or not _hub_reachable():
        raise ClipWeightsError(how)
    try:
        return hf_hub_download(repo, files[0])
    except Exception as exc:  # network errors of many kinds
        raise ClipWeightsError(f"{how} [{type(exc).__name__}]") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _cache_dir() -> Path:
    return Path(os.environ.get("T2L_FAST_CACHE", Path.home() / ".cache" / "t2l_fast"))


def read_state_dict(path: str | os.PathLike, name: str = "ViT-B-32") -> dict[str, torch.Tensor]:
    """Load a local CLIP weights file as a state dict, never unpickling arbitrary objects.

    TorchScript archives (OpenAI's ``ViT-B-32.pt``) are accepted only when their SHA-256 matches
    the published one; they are converted once to safetensors in the t2l_fast cache.
    """
    from safetensors.torch import load_file, save_file

    path = Path(path)
    if not path.is_file():
        raise ClipWeightsError(f"CLIP weights file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:
            raise ClipWeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    if _is_torchscript(path):
        digest = _sha256(path)
        expected = OPENAI_SHA256.get(name)
        if digest != expected:
            raise ClipWeightsError(
                f"{path} is a TorchScript archive whose SHA-256 ({digest[:12]}...) is not the published "
                f"OpenAI {name} file; refusing to load it: pass safetensors or a plain state dict"
            )
        converted = _cache_dir() / f"openai-{name}-{digest[:16]}.safetensors"
        if not converted.is_file():
            scripted = torch.jit.load(str(path), map_location="cpu")
            state = {k: v.contiguous() for k, v in scripted.state_dict().items()}
            converted.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(converted) as tmp:
                save_file(state, str(tmp))
            log.info("converted %s to %s", path, converted)
        return load_file(str(converted))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ClipWeightsError(f"{path} is not a CLIP state dict ({first[:120]})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ClipWeightsError(f"{path} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_clip(
    name: str = "ViT-B-32",
    weights: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    quick_gelu: bool = True,
) -> Clip:
    """Build the CLIP the losses use.

    name: ``test-tiny`` or an open_clip model name (default ViT-B-32).
    weights: a local file; None downloads OpenAI's weights from the hub (or uses the cache).
    quick_gelu: OpenAI's weights were trained with QuickGELU; keep True for them.
    """
    if name == TEST_TINY:
        if weights is not None:
            raise ClipWeightsError("--clip test-tiny is a random test model: it takes no --clip-weights")
        return build_test_tiny().to(device)
    if name not in open_clip.list_models():
        raise ClipWeightsError(
            f"unknown CLIP model {name!r}: use ViT-B-32 (default), another open_clip name, or test-tiny"
        )
    if weights is None:
        path = resolve_hub_weights(name, "openai")
        state = read_state_dict(path, name) if path.endswith(".safetensors") else _torch_state(path)
    else:
        state = read_state_dict(weights, name)
    model = open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu, load_weights=False)
    for key in ("input_resolution", "context_length", "vocab_size"):  # OpenAI metadata entries
        if key in state and state[key].dim() == 0:
            state.pop(key)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(v.shape)}, not {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        more = f" and {len(problems) - 2} more" if len(problems) > 2 else ""
        raise ClipWeightsError(
            f"CLIP weights do not match {name} ({'; '.join(problems[:2])}{more}): pass weights of that model"
        )
    model.load_state_dict(state)
    return Clip(model, open_clip.get_tokenizer(name), name).to(device)


def _torch_state(path: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()}
