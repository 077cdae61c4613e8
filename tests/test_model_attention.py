"""DiT semantics on a small config: head layout, RoPE, the attention router, how text enters."""

import math

import pytest
import torch

from latentflow_fast.models import AttentionRouter, sdpa
from latentflow_fast.models.dit import RotaryEmbedding, merge_heads, split_heads, modulate
from model_fixtures import random_inputs, small_model


def test_forward_shape_and_finite():
    model = small_model()
    out = model(*random_inputs(model))
    assert out.shape == (2, 7, 32) and torch.isfinite(out).all()
    # a float time and memory=None (time embedding only) are accepted
    noisy, _, mixture, _, _ = random_inputs(model)
    assert model(noisy, 0.25, mixture).shape == (2, 7, 32)


def test_strided_head_split_and_contiguous_merge():
    B, T, H, hd = 2, 3, 4, 5
    x = torch.arange(B * T * H * hd, dtype=torch.float32).reshape(B, T, H * hd)
    heads = split_heads(x, H)
    assert heads.shape == (B, H, T, hd)
    for h in range(H):
        for d in range(hd):
            assert torch.equal(heads[:, h, :, d], x[:, :, h + d * H])  # head h holds channels h, h+H, ...
    merged = merge_heads(heads)
    for h in range(H):
        assert torch.equal(merged[:, :, h * hd:(h + 1) * hd], heads[:, h])  # merge is contiguous "(h d)"


def test_rope_adjacent_pairs():
    hd, theta = 8, 20000.0
    rope = RotaryEmbedding(hd, theta, max_positions=64)
    x = torch.zeros(1, 1, 10, hd)
    x[..., 2] = 1.0  # only pair (2, 3), frequency index 1
    out = rope(x)
    assert torch.equal(out[..., [0, 1, 4, 5, 6, 7]], torch.zeros(1, 1, 10, 6))
    pos = torch.arange(10, dtype=torch.float64)
    angle = pos * theta ** (-2 / hd)
    torch.testing.assert_close(out[0, 0, :, 2].double(), angle.cos(), atol=1e-5, rtol=0)
    torch.testing.assert_close(out[0, 0, :, 3].double(), angle.sin(), atol=1e-5, rtol=0)
    assert torch.equal(rope(x)[..., 0, :], x[..., 0, :])  # position 0 is the identity
    # relative positions: <rope(q)_m, rope(k)_n> depends on m - n only
    q, k = torch.randn(hd), torch.randn(hd)
    qs = rope(q.expand(1, 1, 20, hd).contiguous())[0, 0]
    ks = rope(k.expand(1, 1, 20, hd).contiguous())[0, 0]
    torch.testing.assert_close(qs[5] @ ks[2], qs[15] @ ks[12], atol=1e-4, rtol=0)


def test_router_is_shared_and_stateless():
    model = small_model()
    router = model.attention_router
    assert isinstance(router, AttentionRouter)
    sites = [m.site for m in model.modules() if hasattr(m, "site")]
    assert sites == [f"layers.{i}.{k}" for i in range(2) for k in ("self_attn", "cross_attn")]
    assert all(m.router is router for m in model.modules() if hasattr(m, "site"))
    assert not any("router" in k for k in model.state_dict())


def test_router_default_equals_sdpa_handler_and_sees_post_rope_qk():
    model = small_model()
    inputs = random_inputs(model)
    ref = model(*inputs)
    seen = {}

    def handler(site, q, k, v, mask):
        seen[site] = (q.shape, k.shape, None if mask is None else mask.clone())
        return sdpa(q, k, v, mask)

    for i in range(2):
        for kind in ("self_attn", "cross_attn"):
            model.attention_router.handlers[f"layers.{i}.{kind}"] = handler
    out = model(*inputs)
    assert torch.equal(out, ref)
    assert seen["layers.0.self_attn"][:2] == ((2, 4, 7, 8), (2, 4, 7, 8))
    assert seen["layers.1.cross_attn"][:2] == ((2, 4, 7, 8), (2, 4, 5, 8))
    assert torch.equal(seen["layers.0.cross_attn"][2], inputs[4])
    assert seen["layers.0.self_attn"][2] is None


def test_text_reaches_only_through_cross_attention():
    model = small_model()
    noisy, time, mixture, memory, mask = random_inputs(model)
    for i in range(2):
        model.attention_router.handlers[f"layers.{i}.cross_attn"] = lambda s, q, k, v, m: torch.zeros_like(q)
    a = model(noisy, time, mixture, memory, mask)
    b = model(noisy, time, mixture, torch.randn_like(memory), mask)
    assert torch.equal(a, b)
    model.attention_router.handlers.clear()
    assert not torch.equal(model(noisy, time, mixture, memory, mask), model(noisy, time, mixture, -memory, mask))


def test_masked_memory_tokens_are_ignored():
    model = small_model()
    noisy, time, mixture, memory, mask = random_inputs(model)
    other = memory.clone()
    other[~mask] = 123.0
    torch.testing.assert_close(model(noisy, time, mixture, memory, mask), model(noisy, time, mixture, other, mask),
                               atol=1e-6, rtol=0)


def test_block_formula_cross_attention_ungated_unnormed():
    model = small_model()
    block = model.transformer.layers[0]
    D = 32
    x, y = torch.randn(2, 7, D), torch.randn(2, 5, D)
    t0 = torch.randn(2, 6 * D)
    rope = model.transformer.rope
    out = block(x, y, t0, None, None, rope)
    mods = block.scale_shift_table[None] + t0.reshape(2, 6, D)
    sh1, sc1, g1, sh2, sc2, g2 = mods.chunk(6, dim=1)
    h = x + g1 * block.attention(modulate(block.attention_norm(x), sh1, sc1), rope=rope)
    h = h + block.cross_attention(h, context=y)  # ungated, no norm on h
    ref = h + g2 * block.feed_forward(modulate(block.ffn_norm(h), sh2, sc2))
    assert torch.equal(out, ref)


def test_time_embedding_uses_unit_interval():
    model = small_model()
    t = torch.tensor([0.0, 0.5])
    emb = model.transformer.t_embedder.sinusoid(t)
    assert emb.shape == (2, 256)
    torch.testing.assert_close(emb[1, 0], torch.tensor(math.cos(0.5)))  # frequency 1 at index 0: t, not 1000 t
    torch.testing.assert_close(emb[1, 128], torch.tensor(math.sin(0.5)))


def test_video_and_anchor_paths_are_additive():
    model = small_model(vision_dim=6, num_anchors=3)
    noisy, time, mixture, memory, mask = random_inputs(model)
    default = model(noisy, time, mixture, memory, mask)
    zeros_video = torch.zeros(2, 6, 7)
    null_anchors = torch.tensor([[0, 3], [0, 3]])
    same = model(noisy, time, mixture, memory, mask, video_features=zeros_video, anchor_ids=null_anchors,
                 anchor_alignment=torch.zeros(2, 7, dtype=torch.long))
    assert torch.equal(default, same)  # SAM Audio's defaults: zero video, "<null>" anchor everywhere
    video = model(noisy, time, mixture, memory, mask, video_features=torch.randn(2, 6, 7))
    assert not torch.equal(video, default)
    with torch.no_grad():
        model.align_masked_video.gate.zero_()
        model.embed_anchors.gate.zero_()
    closed = model(noisy, time, mixture, memory, mask, video_features=torch.randn(2, 6, 7))
    plain = small_model()
    assert torch.equal(closed, plain(noisy, time, mixture, memory, mask))  # gate 0 = path off
    with pytest.raises(ValueError, match="video_features"):
        plain(noisy, time, mixture, memory, mask, video_features=zeros_video)


def test_bad_shapes():
    model = small_model()
    noisy, time, mixture, memory, mask = random_inputs(model)
    with pytest.raises(ValueError, match="noisy"):
        model(noisy[..., :-1], time, mixture, memory, mask)
    with pytest.raises(ValueError, match="mixture"):
        model(noisy, time, mixture[:, :-1], memory, mask)
