"""Residual-stream hook points (hook_resid_pre / attn_out / mlp_out / resid_post ...), per-head hook_result,
and the dry trace, on SAM Audio's DiT and on nn.TransformerEncoder, against plain forward hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model_fixtures import random_inputs, small_model

from latentflow_fast.models.dit import HOOK_POINTS
from latentflow_fast.probe.hooks import NothingMatchedError, dry_trace, run_with_cache, run_with_hooks, trace


@pytest.fixture(scope="module")
def sam():
    model = small_model(seed=3)
    return model, random_inputs(model, B=2, T=7, L=5, seed=1)


def _call(model, inputs):
    noisy, time, mixture, memory, mask = inputs
    return model(noisy, time, mixture, memory, mask)


def _plain_activations(model, inputs, layer):
    """What the hook points should hold, read with plain torch forward hooks on the block's submodules."""
    block = model.transformer.layers[layer]
    got = {}
    handles = [block.register_forward_pre_hook(lambda m, args: got.__setitem__("resid_pre", args[0])),
               block.register_forward_hook(lambda m, args, out: got.__setitem__("resid_post", out)),
               block.attention.register_forward_hook(lambda m, args, out: got.__setitem__("attn", out)),
               block.cross_attention.register_forward_hook(lambda m, args, out: got.__setitem__("cross", out)),
               block.feed_forward.register_forward_hook(lambda m, args, out: got.__setitem__("ffn", out)),
               block.attention.wo.register_forward_pre_hook(lambda m, args: got.__setitem__("merged", args[0]))]
    try:
        with torch.no_grad():
            out = _call(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return out, got


def test_dit_hook_points_names_shapes_and_values(sam):
    model, inputs = sam
    with torch.no_grad():
        out, cache = run_with_cache(_Adapter(model), inputs,
                                    names_filter=["layers.1.hook_*", "layers.1.self_attn.hook_result"])
    plain_out, plain = _plain_activations(model, inputs, 1)
    torch.testing.assert_close(out, plain_out, rtol=1e-5, atol=1e-6)  # probed sites: the fused operator
    assert set(cache) == {f"layers.1.{k}" for k in HOOK_POINTS} | {"layers.1.self_attn.hook_result"}
    B, T = inputs[0].shape[:2]
    D, H = model.config.dim, model.config.n_heads
    for kind in HOOK_POINTS:
        assert cache[f"layers.1.{kind}"].shape == (B, T, D), kind
    for name, key in (("resid_pre", "resid_pre"), ("resid_post", "resid_post"), ("cross_attn_out", "cross")):
        torch.testing.assert_close(cache[f"layers.1.hook_{name}"], plain[key], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache["layers.1.hook_resid_mid"], cache["layers.1.hook_resid_pre"]
                               + cache["layers.1.hook_attn_out"] + cache["layers.1.hook_cross_attn_out"])
    torch.testing.assert_close(cache["layers.1.hook_resid_post"],
                               cache["layers.1.hook_resid_mid"] + cache["layers.1.hook_mlp_out"])
    result = cache["layers.1.self_attn.hook_result"]
    assert result.shape == (B, T, H, D)
    # heads' terms add up to the output projection of the merged heads (wo has no bias here)
    torch.testing.assert_close(result.sum(2), model.transformer.layers[1].attention.wo(plain["merged"]),
                               rtol=1e-5, atol=1e-6)


class _Adapter(nn.Module):
    """model(inputs_tuple): lets run_with_cache call SAMAudio with its five positional inputs."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, inputs):
        return _call(self.model, inputs)


def test_editing_the_residual_stream_matches_a_plain_hook(sam):
    model, inputs = sam
    direction = torch.randn(model.config.dim, generator=torch.Generator().manual_seed(7))

    def steer(x, hook):
        return x + direction

    with torch.no_grad():
        got = run_with_hooks(_Adapter(model), inputs, fwd_hooks=[("layers.1.hook_resid_pre", steer)])
    handle = model.transformer.layers[1].register_forward_pre_hook(lambda m, args: (args[0] + direction,) + args[1:])
    try:
        with torch.no_grad():
            want = _call(model, inputs)
    finally:
        handle.remove()
    assert torch.equal(got, want)  # unprobed sites run the router's own attention: the same bits


def test_bwd_hooks_on_resid_and_attribution_through_the_dit(sam):
    model, inputs = sam
    grads = {}
    out = run_with_hooks(_Adapter(model), inputs, bwd_hooks=[("layers.*.hook_attn_out",
                                                              lambda g, hook: grads.__setitem__(hook.name, g))])
    out.square().mean().backward()
    assert set(grads) == {"layers.0.hook_attn_out", "layers.1.hook_attn_out"}
    model.zero_grad()
    captured = {}
    block = model.transformer.layers[1]
    handle = block.hook_attn_out.register_forward_hook(lambda m, args, o: captured.__setitem__("a", o))
    try:
        y = _call(model, inputs)
        (want,) = torch.autograd.grad(y.square().mean(), captured["a"])
    finally:
        handle.remove()
    torch.testing.assert_close(grads["layers.1.hook_attn_out"], want, rtol=1e-5, atol=1e-8)


def test_dry_trace_lists_dit_names_without_computing(sam):
    model, inputs = sam
    tr = dry_trace(_Adapter(model), inputs)
    assert tr.sites == [f"layers.{i}.{kind}" for i in range(2) for kind in ("self_attn", "cross_attn")]
    names = tr.hook_names()
    assert "layers.0.self_attn.hook_pattern" in names and "layers.1.cross_attn.hook_result" in names
    assert "layers.1.hook_mlp_out" in names
    with torch.no_grad(), trace(_Adapter(model)) as real:
        _call(model, inputs)
    assert real.hook_names() == names


# ------------------------------------------------------------------------------- nn.TransformerEncoder
@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return model, torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))


def test_transformer_encoder_hook_points_against_plain_hooks(encoder):
    model, x = encoder
    with torch.no_grad():
        out, cache = run_with_cache(model, x, names_filter=["layers.1.hook_*", "layers.1.self_attn.hook_result"])
    layer = model.layers[1]
    got = {}
    handles = [layer.register_forward_pre_hook(lambda m, a: got.__setitem__("pre", a[0])),
               layer.self_attn.register_forward_hook(lambda m, a, o: got.__setitem__("attn", o[0])),
               layer.linear2.register_forward_hook(lambda m, a, o: got.__setitem__("mlp", o)),
               layer.register_forward_hook(lambda m, a, o: got.__setitem__("post", o))]
    try:
        with torch.no_grad():
            plain = model(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    for name, key in (("hook_resid_pre", "pre"), ("hook_attn_out", "attn"), ("hook_mlp_out", "mlp"),
                      ("hook_resid_post", "post")):
        assert cache[f"layers.1.{name}"].shape == (2, 5, 16)
        torch.testing.assert_close(cache[f"layers.1.{name}"], got[key], rtol=1e-5, atol=1e-6)
    result = cache["layers.1.self_attn.hook_result"]
    assert result.shape == (2, 5, 4, 16)
    torch.testing.assert_close(result.sum(2) + layer.self_attn.out_proj.bias, got["attn"], rtol=1e-5, atol=1e-6)


def test_transformer_encoder_dry_trace_and_unknown_names(encoder):
    model, x = encoder
    names = dry_trace(model, x).hook_names()
    assert {"layers.0.self_attn.hook_z", "layers.0.hook_resid_pre", "layers.1.hook_mlp_out"} <= set(names)
    with pytest.raises(NothingMatchedError, match="residual-stream hook points: layers.0.hook_resid_pre"):
        with torch.no_grad():
            run_with_cache(model, x, names_filter="blocks.0.hook_resid_pre")  # TransformerLens's naming


def test_hook_result_is_read_only(encoder):
    model, x = encoder
    with torch.no_grad(), pytest.raises(ValueError, match="hook_z"):
        run_with_hooks(model, x, fwd_hooks=[("layers.0.self_attn.hook_result", lambda t, hook: t * 0)])


# ------------------------------------------------------------------------------- GPT-2 / LLaMA-style blocks
class HFStyleAttention(nn.Module):
    """Laid out as Hugging Face's GPT-2 attention: c_attn / c_proj, SDPA, returns (output, weights)."""

    def __init__(self, d=16, h=4):
        super().__init__()
        self.h = h
        self.c_attn, self.c_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.c_attn(x).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return self.c_proj(z.transpose(1, 2).reshape(b, n, d)), None


class HFStyleBlock(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = HFStyleAttention(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, hidden_states):
        attn_out, _ = self.attn(self.ln_1(hidden_states))
        hidden_states = hidden_states + attn_out
        return (hidden_states + self.mlp(self.ln_2(hidden_states)),)


class HFStyleModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([HFStyleBlock(), HFStyleBlock()])

    def forward(self, x):
        for block in self.h:
            x = block(hidden_states=x)[0]  # keyword call, tuple output, as Hugging Face models do
        return x


def test_gpt2_style_blocks_get_residual_hook_points():
    torch.manual_seed(0)
    model = HFStyleModel().eval()
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out, cache = run_with_cache(model, x, names_filter="h.1.hook_*")
        plain = model(x)
    assert set(cache) == {f"h.1.hook_{k}" for k in ("resid_pre", "attn_out", "mlp_out", "resid_post")}
    torch.testing.assert_close(out, plain)
    torch.testing.assert_close(cache["h.1.hook_resid_post"], out)
    torch.testing.assert_close(cache["h.1.hook_resid_post"], cache["h.1.hook_resid_pre"] + cache["h.1.hook_attn_out"]
                               + cache["h.1.hook_mlp_out"], rtol=1e-5, atol=1e-6)
    # editing through the keyword input and the tuple outputs
    with torch.no_grad():
        zeroed = run_with_hooks(model, x, fwd_hooks=[("h.1.hook_attn_out", lambda t, hook: torch.zeros_like(t)),
                                                     ("h.0.hook_resid_pre", lambda t, hook: t * 2)])
    block1 = model.h[1]
    with torch.no_grad():
        h = model.h[0](hidden_states=x * 2)[0]
        want = h + block1.mlp(block1.ln_2(h))
    torch.testing.assert_close(zeroed, want)
