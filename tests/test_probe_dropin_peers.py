"""The hook-style API's fast paths, and agreement with the peers a TransformerLens / nnsight user compares it with.

Always run: output-only interventions (ablate_heads / scale_heads / steer) at sites with nothing captured or
hooked take the model's own SDPA plus an output edit (no probed kernel) and agree with the operator path in
float64; SDPA interception by the functional wrapper and by the catch-all TorchFunctionMode name the same
sites. With `transformers` (and nnsight / TransformerLens) installed (`pip install -e .[peers]`): head ablations
on random-init Hugging Face GPT-2 and BERT agree with plain forward hooks, nnsight and TransformerLens's
TransformerBridge; skipped with the reason otherwise.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import latentflow_fast.probe.hooks as hooks_module
from latentflow_fast.probe.hooks import NothingMatchedError, trace

B, N, D, H = 3, 7, 16, 4
HD = D // H
_BOUND_SDPA = torch._C._nn.scaled_dot_product_attention  # what `from ... import` binds: no attribute lookup


class Block(nn.Module):
    def __init__(self, causal=False, bound=False):
        super().__init__()
        self.qkv, self.proj, self.causal, self.bound = nn.Linear(D, 3 * D), nn.Linear(D, D), causal, bound

    def forward(self, x, keep):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, H, HD).permute(2, 0, 3, 1, 4)
        sdpa = _BOUND_SDPA if self.bound else F.scaled_dot_product_attention
        if self.causal:
            z = sdpa(q, k, v, is_causal=True)
        else:
            z = sdpa(q, k, v, attn_mask=keep[:, None, None, :])
        return x + self.proj(z.transpose(1, 2).reshape(b, n, D))


class Model(nn.Module):
    def __init__(self, causal=False, bound=False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(causal, bound), Block(causal, bound)])

    def forward(self, x, keep):
        for block in self.blocks:
            x = block(x, keep)
        return x


def inputs(dtype=torch.float64):
    x = torch.randn(B, N, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[1, 5:] = False  # a padded row
    return x, keep


def configure(tr):
    tr.ablate_heads("blocks.0", heads=1, rows=0)
    tr.scale_heads("blocks.1", 0.5, heads=[0, 3], rows=[1, 2])
    tr.steer("blocks.1", torch.linspace(-1, 1, HD, dtype=torch.float64), heads=2, rows=2)


@pytest.mark.parametrize("causal", [False, True])
def test_output_only_interventions_skip_the_operator_and_match_it(monkeypatch, causal):
    torch.manual_seed(0)
    model = Model(causal).double().eval()
    x, keep = inputs()
    with torch.no_grad():
        clean = model(x, keep)
        with trace(model, backend="reference") as tr:  # the probed operator (float64 reference) at every site
            configure(tr)
            expected = model(x, keep)

        def refuse(*args, **kwargs):
            raise AssertionError("the probed operator ran for an output-only intervention")

        monkeypatch.setattr(hooks_module, "probed_attention", refuse)
        with trace(model) as tr:
            configure(tr)
            got = model(x, keep)
    assert (expected - clean).abs().max() > 1e-2  # the interventions do something
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_a_capture_at_the_site_still_runs_the_operator(monkeypatch):
    torch.manual_seed(0)
    model = Model().double().eval()
    x, keep = inputs()
    calls = []
    real = hooks_module.probed_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(hooks_module, "probed_attention", counting)
    with torch.no_grad(), trace(model, sites="blocks.0", capture=("entropy",)) as tr:
        tr.ablate_heads("blocks.0", heads=1)
        tr.ablate_heads("blocks.1", heads=1)
        model(x, keep)
    assert len(calls) == 1  # blocks.0 (captured) through the operator; blocks.1 (ablation only) through SDPA
    assert tr["blocks.0"].entropy.shape == (B, H, N)


def test_output_edit_keeps_gradients():
    torch.manual_seed(0)
    model = Model().double().eval()
    x, keep = inputs()
    x.requires_grad_(True)
    with trace(model) as tr:
        tr.scale_heads("blocks.0", 0.25, heads=2)
        out = model(x, keep)
    out.square().sum().backward()
    grad_fast = x.grad.clone()
    x.grad = None
    with trace(model, backend="reference") as tr:
        tr.scale_heads("blocks.0", 0.25, heads=2)
        out = model(x, keep)
    out.square().sum().backward()
    torch.testing.assert_close(grad_fast, x.grad, rtol=1e-10, atol=1e-10)


def test_functional_wrapper_and_torch_function_mode_name_the_same_sites():
    torch.manual_seed(0)
    model = Model().eval()
    x, keep = inputs(torch.float32)
    seen = {}
    for via in (None, "mode"):
        with torch.no_grad(), trace(model, capture=("lse",), intercept_sdpa=via) as tr:
            model(x, keep)
        seen[via] = (tr.sites, {s: tr[s].lse for s in tr.sites})
    assert seen[None][0] == seen["mode"][0] == ["blocks.0", "blocks.1"]
    for site in seen[None][0]:
        torch.testing.assert_close(seen[None][1][site], seen["mode"][1][site], rtol=0, atol=0)
    assert F.scaled_dot_product_attention is _BOUND_SDPA  # the wrapper is gone after the trace


def test_sdpa_bound_at_import_needs_the_mode_and_is_never_silent():
    torch.manual_seed(0)
    model = Model(bound=True).eval()
    x, keep = inputs(torch.float32)
    with torch.no_grad():
        with pytest.raises(NothingMatchedError, match="intercept_sdpa='mode'"), trace(model) as tr:
            tr.ablate_heads("blocks.0", heads=0)
            model(x, keep)
        with trace(model, intercept_sdpa="mode") as tr:
            tr.ablate_heads("blocks.0", heads=0)
            got = model(x, keep)
    assert tr.sites == ["blocks.0", "blocks.1"]
    assert not torch.equal(got, model(x, keep))
    with pytest.raises(ValueError, match="intercept_sdpa"):
        trace(model, intercept_sdpa="always")


# ---------------------------------------------------------------------------------------------- peers
_HAVE = {name: importlib.util.find_spec(name) is not None for name in ("transformers", "nnsight", "transformer_lens")}
needs_transformers = pytest.mark.skipif(not _HAVE["transformers"],
                                        reason="transformers not installed (pip install -e .[peers])")
L, DM, NH, V, T = 2, 64, 4, 100, 12
PROBES = [(layer, h) for layer in range(L) for h in range(NH)]


def hf_model(kind):
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=L, n_embd=DM, n_head=NH, vocab_size=V, n_positions=64, bos_token_id=0,
                                      eos_token_id=0, attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(cfg).eval(), cfg, "transformer.h.{l}.attn", "transformer.h.{l}.attn.c_proj"
    cfg = transformers.BertConfig(num_hidden_layers=L, hidden_size=DM, num_attention_heads=NH, intermediate_size=4 * DM,
                                  vocab_size=V, max_position_embeddings=64, attn_implementation="sdpa")
    return (transformers.BertForMaskedLM(cfg).eval(), cfg, "bert.encoder.layer.{l}.attention.self",
            "bert.encoder.layer.{l}.attention.output.dense")


def hf_inputs(kind):
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(2)).expand(len(PROBES), -1)
    if kind == "gpt2":
        return {"input_ids": ids}
    mask = torch.ones(len(PROBES), T, dtype=torch.long)
    mask[:, T - 3:] = 0  # padded rows
    return {"input_ids": ids, "attention_mask": mask}


def plain_hooks(model, proj, kwargs):
    """Row r ablates probe r's head by zeroing its channels at the input of the output projection."""
    handles = []
    for layer in range(L):
        rows = [(r, h) for r, (pl, h) in enumerate(PROBES) if pl == layer]

        def zero(module, args, rows=rows):
            z = args[0].clone()
            for r, h in rows:
                z[r, :, h * (DM // NH):(h + 1) * (DM // NH)] = 0
            return (z,) + tuple(args[1:])

        handles.append(model.get_submodule(proj.format(l=layer)).register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            return model(**kwargs).logits
    finally:
        for handle in handles:
            handle.remove()


def traced(model, site, kwargs, **trace_kwargs):
    with torch.no_grad(), trace(model, **trace_kwargs) as tr:
        for r, (layer, h) in enumerate(PROBES):
            tr.ablate_heads(site.format(l=layer), heads=h, rows=r)
        return model(**kwargs).logits


@needs_transformers
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_head_ablation_matches_plain_hooks(kind):
    model, _, site, proj = hf_model(kind)
    kwargs = hf_inputs(kind)
    with torch.no_grad():
        clean = model(**kwargs).logits
    expected = plain_hooks(model, proj, kwargs)
    effect = (expected - clean).abs().amax()
    assert effect > 1e-3
    assert torch.equal(traced(model, site, kwargs), expected)  # the same SDPA call, the same zeroed rows
    operator = traced(model, site, kwargs, backend="cpu")  # the probed kernel (padding / causal fused)
    assert (operator - expected).abs().amax() <= 1e-4 * effect


@pytest.mark.skipif(not (_HAVE["transformers"] and _HAVE["nnsight"]),
                    reason="transformers and nnsight not installed (pip install -e .[peers])")
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_head_ablation_matches_nnsight(kind):
    from nnsight import NNsight

    model, _, site, proj = hf_model(kind)
    kwargs = hf_inputs(kind)
    nm = NNsight(model)
    with torch.no_grad(), nm.trace(**kwargs):
        for layer in range(L):
            envoy = nm
            for part in proj.format(l=layer).split("."):  # BERT's `output` child is nnsight's `E_output`
                envoy = envoy[int(part)] if part.isdigit() else getattr(
                    envoy, f"{envoy.OVERLOAD_PREFIX}{part}" if part == "output" else part)
            z = envoy.input
            for r, (pl, h) in enumerate(PROBES):
                if pl == layer:
                    z[r, :, h * (DM // NH):(h + 1) * (DM // NH)] = 0
        out = nm.output.save()
    torch.testing.assert_close(traced(model, site, kwargs), out.logits, rtol=0, atol=0)


@pytest.mark.skipif(not (_HAVE["transformers"] and _HAVE["transformer_lens"]),
                    reason="transformers and transformer_lens not installed (pip install -e .[peers])")
@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_hf_head_ablation_matches_transformer_lens_bridge(kind):
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    model, cfg, site, _ = hf_model(kind)
    kwargs = hf_inputs(kind)
    arch = "GPT2LMHeadModel" if kind == "gpt2" else "BertForMaskedLM"
    bridge = build_bridge_from_module(copy.deepcopy(model), arch, hf_config=cfg)

    def hook(layer):
        def zero(z, hook):  # z [B, N, H, D]
            for r, (pl, h) in enumerate(PROBES):
                if pl == layer:
                    z[r, :, h] = 0
            return z

        return zero

    with torch.no_grad():
        clean = model(**kwargs).logits
        got = bridge.run_with_hooks(kwargs["input_ids"], fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hook(layer))
                                                                    for layer in range(L)],
                                    **{k: v for k, v in kwargs.items() if k != "input_ids"})
    expected = traced(model, site, kwargs)
    assert (got - expected).abs().amax() <= 1e-5 * (expected - clean).abs().amax()


def test_module_tree_changes_are_seen_by_the_next_trace():
    """Trace caches what it derives from the module tree (hook points, output projections) per model; a
    changed tree (a layer appended) must be seen, and residual points hooked once a hook names them."""
    layer = nn.TransformerEncoderLayer(D, H, dim_feedforward=32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    names_before = set(trace(model).hook_names())
    model.layers.append(copy.deepcopy(model.layers[0]))
    model.num_layers = 2
    names_after = set(trace(model).hook_names())
    assert "layers.1.hook_resid_post" in names_after - names_before
    seen = []
    with torch.no_grad(), trace(model) as tr:
        tr.add_hook("layers.1.hook_resid_post", lambda t, hook: seen.append(hook.name))  # added inside
        model(x)
    assert seen == ["layers.1.hook_resid_post"]


def test_sdpa_sites_follow_the_module_tree_between_traces():
    """The module tree is walked once per model and reused while it is unchanged; blocks swapped, replaced or
    wrapped between traces must name their SDPA calls by their new paths (a stale cache would attribute a
    capture to the wrong layer)."""
    torch.manual_seed(0)
    model = Model().double().eval()
    x, keep = inputs()

    def entropy_by_site():
        with torch.no_grad(), trace(model, capture=("entropy",)) as tr:
            model(x, keep)
        return {site: tr[site].entropy for site in tr.sites}

    first = entropy_by_site()
    assert list(first) == ["blocks.0", "blocks.1"]
    b0, b1 = model.blocks[0], model.blocks[1]
    model.blocks[0], model.blocks[1] = b1, b0  # same modules, swapped paths
    swapped = entropy_by_site()
    assert list(swapped) == ["blocks.0", "blocks.1"]
    # the first layer's entropy depends only on x and that layer: after the swap it is b1's
    assert not torch.equal(swapped["blocks.0"], first["blocks.0"])
    model.blocks[0], model.blocks[1] = b0, b1
    torch.testing.assert_close(entropy_by_site()["blocks.0"], first["blocks.0"], rtol=0, atol=0)

    class Skip(nn.Module):
        def forward(self, x, keep):
            return x

    model.blocks[1] = Skip()  # a replaced module
    model.wrapped = nn.ModuleDict({"inner": b1})  # a module under a new parent is named by that parent
    with torch.no_grad(), trace(model, capture=("entropy",)) as tr:
        model(x, keep)
        model.wrapped["inner"](x, keep)
    assert tr.sites == ["blocks.0", "wrapped.inner"]


def test_the_cached_module_tree_is_checked_against_every_module():
    """model_tree is reused while every module's children are the same objects under the same names (a
    `_modules` dict rebuilt with the same content included), and rebuilt when any changes: a leaf that gains
    a child, a child removed or replaced at any depth."""
    from latentflow_fast.probe.intercept import model_tree

    model = Model().double().eval()
    tree = model_tree(model)
    assert model_tree(model) is tree
    model.blocks._modules = dict(model.blocks._modules)  # same children, new dict
    assert model_tree(model) is tree
    leaf = next(m for m in model.modules() if not m._modules)
    leaf.extra = nn.Identity()  # a leaf becomes a parent
    grown = model_tree(model)
    assert grown is not tree and any(m is leaf.extra for _, m in grown.below)
    del leaf.extra
    assert model_tree(model) is not grown
    model.blocks[1] = copy.deepcopy(model.blocks[1])
    replaced = model_tree(model)
    assert replaced.paths[id(model.blocks[1])][0] == "blocks.1"


def test_site_patterns_match_like_fnmatch():
    """Site / hook patterns are compiled once per pattern tuple (plain names: a set lookup; globs: one regex);
    they must match exactly as fnmatch.fnmatchcase on each pattern would."""
    import fnmatch
    import itertools

    from latentflow_fast.probe.hooks import _matches

    patterns = ["a.*", "a.?", "[ab].1", "x", "layers.1*.attn", "*#1", "a.[!b]", "a.[", "**", "a.b", "[]]", "é.*"]
    sites = ["a.1", "a.b", "b.1", "x", "layers.10.attn", "layers.1.attn", "blocks.0#1", "a.c", "a.[", "", "a\nb",
             "]", "é.1", "a.12", "X"]
    for r in (1, 2, 3):
        for combo in itertools.permutations(patterns, r):
            for site in sites:
                assert _matches(site, combo) == any(fnmatch.fnmatchcase(site, p) for p in combo), (site, combo)


def test_module_cycles_do_not_hang_the_tree_walk():
    model = Model().double().eval()
    model.blocks[0].back = model  # a cycle through the root
    x, keep = inputs()
    with torch.no_grad(), trace(model, capture=("entropy",)) as tr:
        model(x, keep)
    assert tr.sites == ["blocks.0", "blocks.1"]


def test_output_edit_with_many_gated_pairs_matches_the_operator():
    """Past 32 gated (row, head) pairs the edit is one indexed multiply instead of a loop over views."""
    torch.manual_seed(0)
    model = Model().double().eval()
    x = torch.randn(9, N, D, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    keep = torch.ones(9, N, dtype=torch.bool)
    results = []
    with torch.no_grad():
        for backend in ("reference", "auto"):
            with trace(model, backend=backend) as tr:
                tr.scale_heads("blocks.0", 0.5)  # 9 rows x 4 heads = 36 pairs
                tr.ablate_heads("blocks.0", heads=2, rows=[0, 4])
                results.append(model(x, keep))
    torch.testing.assert_close(results[1], results[0], rtol=1e-12, atol=1e-12)
