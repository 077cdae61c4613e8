"""The user-facing probing API: trace records and interventions, TransformerLens-style hook names,
run_with_cache (sliced patterns), run_with_hooks (what may and may not be edited)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentflow_fast.probe import hooks as hooks_module
from latentflow_fast.probe.hooks import (HOOK_KINDS, HookPoint, NothingMatchedError, run_with_cache, run_with_hooks,
                                         trace)

B, N, D, H = 2, 6, 16, 4
HD = D // H
SITE = "blocks.1"


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(D, 3 * D)
        self.proj = nn.Linear(D, D)

    def forward(self, x, keep):
        q, k, v = self.qkv(x).reshape(B, N, 3, H, HD).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return x + self.proj(z.transpose(1, 2).reshape(B, N, D))


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x, keep):
        for block in self.blocks:
            x = block(x, keep)
        return x


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Model().eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, D, generator=g)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 4:] = False
    return model, x, keep


def eager_qkv(model, x, keep, layer):
    """q, k, v [B, H, N, HD] entering block `layer`'s attention, and its eager scores / pattern."""
    with torch.no_grad():
        for block in model.blocks[:layer]:
            x = block(x, keep)
        q, k, v = model.blocks[layer].qkv(x).reshape(B, N, 3, H, HD).permute(2, 0, 3, 1, 4)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(HD)).masked_fill(~keep[:, None, None, :], float("-inf"))
    return q, k, v, scores, scores.softmax(-1)


def run(model, x, keep):
    with torch.no_grad():
        return model(x, keep)


# ----------------------------------------------------------------------------------- run_with_cache
def test_run_with_cache_names_layouts_and_values(setup):
    model, x, keep = setup
    with torch.no_grad():
        out, cache = run_with_cache(model, x, keep, backend="reference")
    torch.testing.assert_close(out, run(model, x, keep), rtol=1e-5, atol=1e-6)
    assert set(cache) == {f"blocks.{i}.{kind}" for i in range(2) for kind in HOOK_KINDS
                          if kind != "hook_segment_mass"}
    q, k, v, scores, pattern = eager_qkv(model, x, keep, 1)
    assert cache[f"{SITE}.hook_q"].shape == (B, N, H, HD)
    torch.testing.assert_close(cache[f"{SITE}.hook_q"], q.transpose(1, 2))
    torch.testing.assert_close(cache[f"{SITE}.hook_attn_scores"], scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[f"{SITE}.hook_pattern"], pattern, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache[f"{SITE}.hook_z"], (pattern @ v).transpose(1, 2), rtol=1e-5, atol=1e-6)
    entropy = -torch.special.xlogy(pattern, pattern).sum(-1)
    torch.testing.assert_close(cache[f"{SITE}.hook_entropy"], entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache[f"{SITE}.hook_key_mass"], pattern.sum(2), rtol=1e-5, atol=1e-5)


def test_pattern_slice_materializes_only_the_slice(setup, monkeypatch):
    model, x, keep = setup
    requested = []
    real = hooks_module.attention_scores

    def spy(q, k, scale, args, heads, queries):
        requested.append((len(heads), len(queries)))
        return real(q, k, scale, args, heads, queries)

    monkeypatch.setattr(hooks_module, "attention_scores", spy)
    with torch.no_grad():
        _, cache = run_with_cache(model, x, keep, names_filter=[f"{SITE}.hook_pattern"],
                                  pattern_slice=([0, 3], (2, 5)), backend="reference")
    assert list(cache) == [f"{SITE}.hook_pattern"]
    assert requested == [(2, 3)]
    _, _, _, _, pattern = eager_qkv(model, x, keep, 1)
    torch.testing.assert_close(cache[f"{SITE}.hook_pattern"], pattern[:, [0, 3], 2:5], rtol=1e-5, atol=1e-6)


def test_cached_pattern_reflects_interventions(setup):
    model, x, keep = setup
    with torch.no_grad(), trace(model, segments=[0, 2, N], backend="reference") as tr:
        tr.set_temperature(SITE, 2.0, heads=1).knockout_segments(SITE, 0, heads=2)
        tr.cache_hooks(f"{SITE}.hook_pattern")
        model(x, keep)
    p = tr.cache[f"{SITE}.hook_pattern"]
    q, k, v, scores, pattern = eager_qkv(model, x, keep, 1)
    torch.testing.assert_close(p[:, 0], pattern[:, 0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p[:, 1], (scores[:, 1] / 2).softmax(-1), rtol=1e-5, atol=1e-6)
    assert torch.all(p[:, 2, :, :2] == 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(B, H, N))
    assert torch.all(p[1, :, :, 4:] == 0)  # padded keys


# ----------------------------------------------------------------------------------- run_with_hooks
def test_hook_z_return_and_in_place_edit_patch_head_outputs(setup):
    model, x, keep = setup

    def zero_head(z, hook):
        assert hook.name == f"{SITE}.hook_z" and hook.layer() == 1
        z = z.clone()
        z[:, :, 2] = 0
        return z

    def zero_head_in_place(z, hook):
        z[:, :, 2] = 0

    with torch.no_grad():
        with trace(model, backend="reference") as tr:
            tr.ablate_heads(SITE, heads=2)
            expected = model(x, keep)
        got = run_with_hooks(model, x, keep, fwd_hooks=[(f"{SITE}.hook_z", zero_head)], backend="reference")
        got2 = run_with_hooks(model, x, keep, fwd_hooks=[(f"{SITE}.hook_z", zero_head_in_place)], backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got2, expected, rtol=1e-6, atol=1e-6)
    assert (got - run(model, x, keep)).abs().max() > 1e-4


def test_hook_q_edit_equals_temperature(setup):
    model, x, keep = setup
    with torch.no_grad():
        with trace(model, backend="reference") as tr:
            tr.set_temperature(SITE, 0.5)
            expected = model(x, keep)
        got = run_with_hooks(model, x, keep, fwd_hooks=[(lambda name: name.endswith(".hook_q") and "1" in name,
                                                         lambda q, hook: q * 2)], backend="reference")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["hook_lse", "hook_entropy"])
@pytest.mark.parametrize("style", ["return", "in_place"])
def test_editing_read_only_hooks_raises_with_alternatives(setup, kind, style):
    model, x, keep = setup

    def edit(t, hook):
        if style == "return":
            return t * 0
        t.mul_(0.5)

    with torch.no_grad(), pytest.raises(ValueError, match="ablate_heads, set_temperature"):
        run_with_hooks(model, x, keep, fwd_hooks=[(f"{SITE}.{kind}", edit)], backend="reference")


def test_read_only_hooks_that_only_read_are_fine(setup):
    model, x, keep = setup
    seen = {}
    with torch.no_grad():
        out = run_with_hooks(model, x, keep, pattern_slice=(0, None), backend="reference",
                             fwd_hooks=[("*.hook_pattern", lambda p, hook: seen.__setitem__(hook.name, p.shape))])
    assert seen == {f"blocks.{i}.hook_pattern": (B, 1, N, N) for i in range(2)}
    torch.testing.assert_close(out, run(model, x, keep), rtol=1e-5, atol=1e-6)


def test_bwd_hooks_and_bad_fwd_hooks_are_refused(setup):
    model, x, keep = setup
    with pytest.raises(NothingMatchedError, match="hook 'x'"):
        run_with_hooks(model, x, keep, bwd_hooks=[("x", print)])
    with pytest.raises(TypeError, match="fwd_hooks"):
        run_with_hooks(model, x, keep, fwd_hooks=["blocks.0.hook_z"])


# ----------------------------------------------------------------------------------- trace
def test_trace_records_history_and_lookup_errors(setup):
    model, x, keep = setup
    with torch.no_grad(), trace(model, sites="blocks.*", capture=("entropy", "out"), history=True,
                                backend="reference") as tr:
        model(x, keep)
        model(x, keep)
    assert tr.sites == ["blocks.0", "blocks.1"]
    assert len(tr.history[SITE]) == 2 and tr[SITE] is tr.history[SITE][-1]
    _, _, v, _, pattern = eager_qkv(model, x, keep, 1)
    torch.testing.assert_close(tr[SITE].out, pattern @ v, rtol=1e-5, atol=1e-6)
    assert tr[SITE]["entropy"].shape == (B, H, N)
    with pytest.raises(KeyError, match="recorded"):
        tr["blocks.7"]
    with pytest.raises(AttributeError, match="captured"):
        tr[SITE].lse


def test_steer_mean_ablation_and_row_selection(setup):
    model, x, keep = setup
    _, _, v, _, pattern = eager_qkv(model, x, keep, 1)
    z = pattern @ v  # [B, H, N, HD]
    vec = torch.arange(HD, dtype=torch.float32)
    mean = z.mean(dim=(0, 2), keepdim=True)  # mean ablation: [1, H, 1, HD]
    expected = z.clone()
    expected[0, 1] += vec
    expected[:, 3] = mean[:, 3]
    with torch.no_grad(), trace(model, sites=SITE, capture=("out",), backend="reference") as tr:
        tr.steer(SITE, vec, heads=1, rows=0).patch_output(SITE, mean, heads=3)
        model(x, keep)
    torch.testing.assert_close(tr[SITE].out, expected, rtol=1e-5, atol=1e-5)


def test_knockout_keys_per_row(setup):
    model, x, keep = setup
    with torch.no_grad(), trace(model, sites=SITE, capture=("key_mass",), backend="reference") as tr:
        tr.knockout_keys(SITE, keys=[0, 1], rows=1)
        model(x, keep)
    mass = tr[SITE].key_mass
    assert torch.all(mass[1, :, :2] == 0) and torch.all(mass[0, :, :2] > 0)


def test_multihead_attention_weights_follow_interventions():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(D, H, batch_first=True).eval()
    x = torch.randn(B, N, D)
    with torch.no_grad(), trace(mha, backend="reference") as tr:
        tr.set_temperature("root", float("inf"), heads=0)  # uniform attention in head 0
        _, weights = mha(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(weights[:, 0], torch.full((B, N, N), 1.0 / N))
    assert not torch.allclose(weights[:, 1], torch.full((B, N, N), 1.0 / N))


def test_argument_errors(setup):
    model, x, keep = setup
    with pytest.raises(ValueError, match="capture"):
        trace(model, capture=("pattern",))
    with pytest.raises(TypeError, match="sites"):
        trace(model, sites=[1])
    tr = trace(model)
    with pytest.raises(ValueError, match="temperature"):
        tr.set_temperature(SITE, 0.0)
    with pytest.raises(TypeError, match="temperature"):
        tr.set_temperature(SITE, "hot")
    with pytest.raises(TypeError, match="value"):
        tr.patch_output(SITE, [1.0])
    with pytest.raises(ValueError, match="vector"):
        tr.steer(SITE, torch.zeros(1, 1, 1))
    with pytest.raises(TypeError, match="pattern_slice"):
        tr.cache_hooks(pattern_slice=[0])
    for configure, match in [
        (lambda t: t.ablate_heads(SITE, heads=9), "heads: index 9"),
        (lambda t: t.knockout_segments(SITE, 0), "segments"),
        (lambda t: t.patch_output(SITE, torch.zeros(3, HD)), "not broadcastable"),
    ]:
        with torch.no_grad(), pytest.raises(ValueError, match=match), trace(model, backend="reference") as t:
            configure(t)
            model(x, keep)


def test_nothing_probed_means_the_model_runs_untouched(setup):
    model, x, keep = setup
    with torch.no_grad(), trace(model, sites="*", capture=()) as tr:
        out = model(x, keep)
    assert torch.equal(out, run(model, x, keep)) and not tr.records
    assert tr.sites == ["blocks.0", "blocks.1"]


def test_hook_point_layer():
    assert HookPoint("layers.12.self_attn.hook_z", "layers.12.self_attn", "hook_z").layer() == 12
    assert HookPoint("root.hook_z", "root", "hook_z").layer() is None


def test_mistyped_sites_and_hook_names_raise_listing_what_exists(setup):
    model, x, keep = setup
    with pytest.raises(NothingMatchedError, match=r"ablate_heads/scale_heads on \['block.1'\].*'blocks.0', 'blocks.1'"):
        with torch.no_grad(), trace(model, backend="reference") as tr:
            tr.ablate_heads("block.1", heads=0)
            model(x, keep)
    with pytest.raises(NothingMatchedError, match="hook 'blocks.1.hook_zz'.*hook_pattern"):
        with torch.no_grad():
            run_with_hooks(model, x, keep, fwd_hooks=[("blocks.1.hook_zz", lambda t, hook: None)])
    with pytest.raises(NothingMatchedError, match="'blocks.0.attn.hook_pattern'"):  # a TransformerLens name
        with torch.no_grad():
            run_with_cache(model, x, keep, names_filter="blocks.0.attn.hook_pattern")
    with pytest.raises(NothingMatchedError, match=r"sites=\['layers.\*'\]"):
        with torch.no_grad(), trace(model, sites="layers.*", capture=("entropy",)):
            model(x, keep)
