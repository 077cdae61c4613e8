"""TransformerLens-style code that edits hook_attn_scores / hook_pattern, per-head key knockout, and never
silent traces -- checked against a plain eager baseline (the model with an eager attention that applies the
same edit), on models built from torch.nn only."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentflow_fast.probe.hooks import NothingMatchedError, run_with_cache, run_with_hooks, trace

B, N, D, H = 2, 6, 16, 4
HD = D // H
SITE = "blocks.1"


class Block(nn.Module):
    def __init__(self, eager=False):
        super().__init__()
        self.qkv, self.proj, self.eager = nn.Linear(D, 3 * D), nn.Linear(D, D), eager
        self.edit_scores = self.edit_pattern = None  # the eager baseline's edits

    def forward(self, x, keep):
        q, k, v = self.qkv(x).reshape(B, N, 3, H, HD).permute(2, 0, 3, 1, 4)
        if self.eager or self.edit_scores or self.edit_pattern:
            s = (q @ k.transpose(-1, -2) / math.sqrt(HD)).masked_fill(~keep[:, None, None, :], float("-inf"))
            if self.edit_scores:
                s = self.edit_scores(s.clone())
            p = s.softmax(-1)
            if self.edit_pattern:
                p = self.edit_pattern(p.clone())
            z = p @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        return x + self.proj(z.transpose(1, 2).reshape(B, N, D))


class Model(nn.Module):
    def __init__(self, eager=False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(eager), Block(eager)])

    def forward(self, x, keep):
        for block in self.blocks:
            x = block(x, keep)
        return x


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 5:] = False
    return model, x, keep


def baseline(model, x, keep, edit_scores=None, edit_pattern=None):
    block = model.blocks[1]
    block.edit_scores, block.edit_pattern = edit_scores, edit_pattern
    try:
        with torch.no_grad():
            return model(x, keep)
    finally:
        block.edit_scores = block.edit_pattern = None


def hooked(model, x, keep, kind, fn, expect_note, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            out = run_with_hooks(model, x, keep, fwd_hooks=[(f"{SITE}.{kind}", fn)], backend="reference", **kwargs)
    notes = [str(w.message) for w in caught if "computed eagerly" in str(w.message)]
    assert bool(notes) == expect_note, notes
    return out


def _scale(t, hook=None):
    return t * 0.5


def _key_bias(t, hook=None):
    t[:, :, :, 2] += 1.5  # in place, TL style
    return None


def _mask_key_head(t, hook=None):
    t[:, 1, :, 3] = float("-inf")
    return t


def _bias_per_head_and_key(t, hook=None):
    return t + torch.arange(N, dtype=t.dtype) * torch.tensor([0.0, 1.0, -0.5, 2.0])[:, None, None]


def _causal(t, hook=None):  # varies over queries: not a fused argument
    return t.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))


@pytest.mark.parametrize("edit,fused", [(_scale, True), (_key_bias, True), (_mask_key_head, True),
                                        (_bias_per_head_and_key, True), (_causal, False)])
def test_score_edits_match_the_eager_baseline(setup, edit, fused):
    model, x, keep = setup
    got = hooked(model, x, keep, "hook_attn_scores", edit, expect_note=not fused)

    def apply(s):
        result = edit(s)
        return s if result is None else result

    torch.testing.assert_close(got, baseline(model, x, keep, edit_scores=apply), rtol=1e-5, atol=1e-5)


def test_scaling_the_scores_is_the_temperature_intervention(setup):
    model, x, keep = setup
    got = hooked(model, x, keep, "hook_attn_scores", _scale, expect_note=False)
    with torch.no_grad(), trace(model, backend="reference") as tr:
        tr.set_temperature(SITE, 2.0)
        want = model(x, keep)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _zero_head(t, hook=None):
    t[:, 2] = 0


def _halve_head(t, hook=None):
    return t * torch.tensor([1.0, 0.5, 1.0, 1.0])[:, None, None]


def _zero_key_no_renorm(t, hook=None):
    t[..., 0] = 0


@pytest.mark.parametrize("edit,fused", [(_zero_head, True), (_halve_head, True), (_zero_key_no_renorm, False)])
def test_pattern_edits_match_the_eager_baseline(setup, edit, fused):
    model, x, keep = setup
    got = hooked(model, x, keep, "hook_pattern", edit, expect_note=not fused)

    def apply(p):
        result = edit(p)
        return p if result is None else result

    torch.testing.assert_close(got, baseline(model, x, keep, edit_pattern=apply), rtol=1e-5, atol=1e-5)


def test_zeroing_a_head_pattern_is_head_ablation(setup):
    model, x, keep = setup
    got = hooked(model, x, keep, "hook_pattern", _zero_head, expect_note=False)
    with torch.no_grad(), trace(model, backend="reference") as tr:
        tr.ablate_heads(SITE, heads=2)
        want = model(x, keep)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_an_edit_on_a_query_slice_is_computed_eagerly_for_that_slice_only(setup):
    model, x, keep = setup
    seen = []

    def edit(p, hook):
        seen.append(tuple(p.shape))
        p[:, 0] = 0  # head 1 of the slice = model head 3, queries 2..4

    got = hooked(model, x, keep, "hook_pattern", edit, expect_note=True, pattern_slice=([3], (2, 5)))
    assert seen == [(B, 1, 3, N)]

    def apply(p):
        p[:, 3, 2:5] = 0
        return p

    torch.testing.assert_close(got, baseline(model, x, keep, edit_pattern=apply), rtol=1e-5, atol=1e-5)


def test_edits_compose_with_trace_interventions(setup):
    model, x, keep = setup
    with torch.no_grad(), trace(model, backend="reference") as tr:
        tr.scale_heads(SITE, 2.0, heads=0).add_hook(f"{SITE}.hook_pattern", _zero_key_no_renorm)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = model(x, keep)

    def apply(p):
        p[..., 0] = 0
        p[:, 0] *= 2.0  # the gate scales head 0's output, i.e. its pattern
        return p

    torch.testing.assert_close(got, baseline(model, x, keep, edit_pattern=apply), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ knockout_keys
def test_knockout_keys_per_head_with_segments_and_segment_mass(setup):
    model, x, keep = setup
    with torch.no_grad(), trace(model, sites=SITE, capture=("segment_mass", "entropy"), segments=[0, 3, N],
                                backend="reference") as tr:
        tr.knockout_keys(SITE, keys=[1, 4], heads=[0, 2]).bias_segments(SITE, segments=1, bias=0.7, heads=2)
        got = model(x, keep)

    def apply(s):
        s[:, [0, 2], :, 1] = float("-inf")
        s[:, [0, 2], :, 4] = float("-inf")
        s[:, 2, :, 3:] += 0.7
        return s

    torch.testing.assert_close(got, baseline(model, x, keep, edit_scores=apply), rtol=1e-5, atol=1e-5)
    mass = tr[SITE].segment_mass
    assert mass.shape == (B, H, N, 2)  # the user's two segments, not the refined ones
    torch.testing.assert_close(mass.sum(-1), torch.ones(B, H, N))
    with torch.no_grad(), trace(model, sites=SITE, capture=("segment_mass",), segments=[0, 3, N],
                                backend="reference") as plain:
        model(x, keep)
    torch.testing.assert_close(mass[:, 1], plain[SITE].segment_mass[:, 1])  # untouched head


# ------------------------------------------------------------------------------------ never silent
def test_an_eager_attention_model_is_not_silently_unprobed(setup):
    _, x, keep = setup
    torch.manual_seed(0)
    eager = Model(eager=True).eval()
    with pytest.raises(NothingMatchedError, match="eager matmul"):
        with torch.no_grad(), trace(eager, capture=("entropy",)):
            eager(x, keep)
    with pytest.raises(NothingMatchedError, match="cache names_filter"):
        with torch.no_grad():
            run_with_cache(eager, x, keep)
    with torch.no_grad(), trace(eager) as tr:  # nothing requested: nothing to complain about
        eager(x, keep)
    assert tr.sites == []


def test_a_trace_that_never_ran_the_model_does_not_raise(setup):
    model, _, _ = setup
    with trace(model, capture=("entropy",)) as tr:
        tr.ablate_heads("nonexistent", heads=0)
    assert not tr.records


def test_a_fused_score_edit_composes_with_per_head_knockout_and_segments(setup):
    model, x, keep = setup
    with torch.no_grad(), trace(model, sites=SITE, capture=("segment_mass",), segments=[0, 2, N],
                                backend="reference") as tr:
        tr.knockout_keys(SITE, keys=[3], heads=1).add_hook(f"{SITE}.hook_attn_scores", _key_bias)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # both are fused: no eager note
            got = model(x, keep)

    def apply(s):
        s[:, 1, :, 3] = float("-inf")
        s[:, :, :, 2] += 1.5
        return s

    torch.testing.assert_close(got, baseline(model, x, keep, edit_scores=apply), rtol=1e-5, atol=1e-5)
    assert tr[SITE].segment_mass.shape == (B, H, N, 2)
    torch.testing.assert_close(tr[SITE].segment_mass.sum(-1), torch.ones(B, H, N))


def test_unknown_hook_names_get_a_suggestion(setup):
    model, x, keep = setup
    with pytest.raises(NothingMatchedError, match=r"did you mean 'blocks.1.hook_pattern'"):
        with torch.no_grad():
            run_with_hooks(model, x, keep, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda t, hook: None)])


@pytest.mark.parametrize("edit", [_zero_key_no_renorm, _mask_key_head])
def test_gradients_through_edited_patterns_match_the_eager_baseline(setup, edit):
    """Eagerly computed (pattern) and fused (score) edits are both differentiable: input gradients match the
    eager baseline's autograd."""
    model, x, keep = setup
    xr = x.clone().requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kind = "hook_pattern" if edit is _zero_key_no_renorm else "hook_attn_scores"
        out = run_with_hooks(model, xr, keep, fwd_hooks=[(f"{SITE}.{kind}", edit)], backend="cpu")
    (got,) = torch.autograd.grad(out.square().sum(), xr)

    def apply(t):
        result = edit(t)
        return t if result is None else result

    block = model.blocks[1]
    setattr(block, "edit_pattern" if kind == "hook_pattern" else "edit_scores", apply)
    try:
        xe = x.clone().requires_grad_()
        (want,) = torch.autograd.grad(model(xe, keep).square().sum(), xe)
    finally:
        block.edit_scores = block.edit_pattern = None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
