"""The CLIP wrapper: our forward against open_clip's, tokens, relevancy, and weight loading."""

from __future__ import annotations

import os
import subprocess
import sys

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from t2l_fast.models import clip as clip_mod
from t2l_fast.models.clip import Clip, ClipWeightsError, build_test_tiny, load_clip, read_state_dict


@pytest.fixture(scope="module")
def vit_b32() -> Clip:
    """The real ViT-B/32 architecture with random weights (no download)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_quick_gelu=True, load_weights=False)
    return Clip(model, open_clip.get_tokenizer("ViT-B-32"), "ViT-B-32")


def test_image_forward_equals_open_clip(vit_b32):
    x = torch.rand(2, 3, 224, 224)
    reference = vit_b32.model.encode_image((x - vit_b32.mean) / vit_b32.std)
    torch.testing.assert_close(vit_b32.encode_image(x), reference, atol=1e-4, rtol=1e-4)


def test_quick_gelu_everywhere(vit_b32, tiny_clip):
    for model in (vit_b32, tiny_clip):
        acts = [type(b.mlp.gelu).__name__ for b in model.model.visual.transformer.resblocks]
        assert acts and set(acts) == {"QuickGELU"}


def test_positional_embedding_interpolation_and_tokens(vit_b32):
    pos = vit_b32._pos_embedding(7, 7, torch.float32)
    # the native grid: exactly unchanged (the resampling runs there too: no branch on the size)
    torch.testing.assert_close(pos, vit_b32.model.visual.positional_embedding, rtol=0, atol=0)
    pos = vit_b32._pos_embedding(7, 11, torch.float32)
    assert pos.shape == (1 + 7 * 11, 768)
    torch.testing.assert_close(pos[0], vit_b32.model.visual.positional_embedding[0])  # CLS untouched
    tokens = vit_b32.encode_tokens(torch.rand(1, 3, 224, 352))
    assert tokens.shape == (1, 1 + 7 * 11, 768)  # structure tokens: width 768, CLS included


def test_tokens_are_the_penultimate_block(tiny_clip):
    x = torch.rand(1, 3, 224, 224)
    v = tiny_clip.model.visual
    h = v._embeds((x - tiny_clip.mean) / tiny_clip.std)
    for block in list(v.transformer.resblocks)[:-1]:
        h = block(h)
    torch.testing.assert_close(tiny_clip.encode_tokens(x), h, atol=1e-5, rtol=1e-5)


def test_pixels_past_the_last_whole_patch_are_dropped(tiny_clip):
    """As the original's strided patch embedding: a 213x320 view reads its top-left 192x320."""
    x = torch.rand(2, 3, 213, 330, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(tiny_clip.encode_image(x), tiny_clip.encode_image(x[..., :192, :320]))
    changed = x.clone()
    changed[..., 200:, :] = 0.0  # the dropped rows do not matter ...
    torch.testing.assert_close(tiny_clip.encode_image(changed), tiny_clip.encode_image(x))
    changed[..., 100, :] = 0.0  # ... the others do
    assert not torch.allclose(tiny_clip.encode_image(changed), tiny_clip.encode_image(x))
    with pytest.raises(ValueError, match="smaller than one"):
        tiny_clip.encode_image(torch.rand(1, 3, 20, 230))


def test_text_embeddings(tiny_clip):
    e = tiny_clip.encode_text(["a cat", "a dog", "a cat"])
    assert e.shape == (3, 64)
    torch.testing.assert_close(e[0], e[2])
    assert not torch.allclose(e[0], e[1])


def test_relevancy_shape_range_and_prompt_dependence(tiny_clip):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 224, 224, generator=g)
    cat, car = tiny_clip.encode_text(["cat", "car"])
    r_cat = tiny_clip.relevancy(x, cat, start_layer=10)
    r_car = tiny_clip.relevancy(x, car, start_layer=10)
    assert r_cat.shape == (1, 224, 224)
    assert float(r_cat.min()) == 0.0 and float(r_cat.max()) == pytest.approx(1.0)
    assert (r_cat - r_car).abs().max() > 1e-3


def test_relevancy_matches_a_manual_rollout_of_the_last_block(tiny_clip):
    """Independent computation with open_clip's own blocks and need_weights attention."""
    x = torch.rand(1, 3, 224, 224)
    text = tiny_clip.encode_text(["cat"])[0]
    v = tiny_clip.model.visual
    h = v._embeds((x - tiny_clip.mean) / tiny_clip.std)
    blocks = list(v.transformer.resblocks)
    for block in blocks[:-1]:
        h = block(h)
    last = blocks[-1]
    h = h.detach()
    ln = last.ln_1(h)
    _, probs = last.attn(ln, ln, ln, need_weights=True, average_attn_weights=False)  # (1, H, L, L)
    heads, d = last.attn.num_heads, h.shape[-1]
    with torch.enable_grad():
        probs = probs.detach().requires_grad_(True)  # a leaf: its gradient is what the rollout weighs
        v_proj = torch.nn.functional.linear(
            ln, last.attn.in_proj_weight[2 * d :], last.attn.in_proj_bias[2 * d :]
        )
        v_heads = v_proj.view(1, -1, heads, d // heads).transpose(1, 2)
        out = last.attn.out_proj((probs @ v_heads).transpose(1, 2).reshape(1, -1, d))
        y = h + last.ls_1(out)
        y = y + last.ls_2(last.mlp(last.ln_2(y)))
        emb = torch.nn.functional.normalize(v.ln_post(y[:, 0]) @ v.proj, dim=-1)
        (emb @ torch.nn.functional.normalize(text, dim=-1)).sum().backward()
    cam = (probs.grad * probs).clamp(min=0).mean(dim=1)[0]  # (L, L)
    row = cam[0, 1:].reshape(1, 1, 7, 7)
    up = torch.nn.functional.interpolate(row, size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
    expected = (up - up.min()) / (up.max() - up.min())
    torch.testing.assert_close(
        tiny_clip.relevancy(x, text, start_layer=10)[0], expected, atol=1e-4, rtol=1e-4
    )


def test_test_tiny_is_deterministic():
    a, b = build_test_tiny(), build_test_tiny()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_load_errors(tmp_path):
    with pytest.raises(ClipWeightsError, match="not found"):
        load_clip("ViT-B-32", tmp_path / "missing.safetensors")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ClipWeightsError, match="not a CLIP state dict"):
        load_clip("ViT-B-32", garbage)
    small = tmp_path / "small.safetensors"
    save_file({"visual.conv1.weight": torch.zeros(2, 3, 4, 4)}, str(small))
    with pytest.raises(ClipWeightsError, match="do not match ViT-B-32"):
        load_clip("ViT-B-32", small)
    with pytest.raises(ClipWeightsError, match="unknown CLIP model"):
        load_clip("ViT-Nope")
    with pytest.raises(ClipWeightsError, match="takes no --clip-weights"):
        load_clip("test-tiny", small)


def test_torchscript_with_unknown_hash_is_refused(tmp_path):
    scripted = torch.jit.script(torch.nn.Linear(2, 2))
    path = tmp_path / "ViT-B-32.pt"
    scripted.save(str(path))
    with pytest.raises(ClipWeightsError, match="SHA-256"):
        read_state_dict(path)


def test_torchscript_with_published_hash_is_converted_once(tmp_path, monkeypatch):
    module = torch.nn.Linear(2, 3)
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(module).save(str(path))
    monkeypatch.setitem(clip_mod.OPENAI_SHA256, "ViT-B-32", clip_mod._sha256(path))
    monkeypatch.setenv("T2L_FAST_CACHE", str(tmp_path / "cache"))
    state = read_state_dict(path)
    torch.testing.assert_close(state["weight"], module.weight.detach())
    converted = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(converted) == 1


def test_state_dict_round_trip_for_the_real_architecture(tmp_path, vit_b32):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit_b32.model.state_dict().items()}, str(path))
    loaded = load_clip("ViT-B-32", path)
    x = torch.rand(1, 3, 224, 224)
    torch.testing.assert_close(loaded.encode_image(x), vit_b32.encode_image(x))
    pt = tmp_path / "vit.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in vit_b32.model.state_dict().items()}}, pt)
    torch.testing.assert_close(load_clip("ViT-B-32", pt).encode_image(x), vit_b32.encode_image(x))


def test_offline_without_cache_fails_at_once_with_the_fix(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    code = "from t2l_fast.models.clip import load_clip\nload_clip('ViT-B-32')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "--clip-weights PATH" in proc.stderr and "ClipWeightsError" in proc.stderr


@pytest.mark.parametrize("out", [(7, 7), (7, 11), (6, 10), (12, 3), (2, 9), (1, 5)])
def test_bicubic_matrices_resample_as_interpolate_does(out):
    """The positional embedding's resampling (two matrices) against F.interpolate's bicubic mode."""
    from t2l_fast.models.clip import bicubic_matrix

    grid = torch.randn(1, 5, 7, 7, generator=torch.Generator().manual_seed(0))
    want = torch.nn.functional.interpolate(grid, size=out, mode="bicubic", align_corners=False)[0]
    got = torch.einsum("hi,wj,cij->chw", bicubic_matrix(out[0], 7), bicubic_matrix(out[1], 7), grid[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 if out != (7, 7) else 0)
