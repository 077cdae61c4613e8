"""The probe engine vs. hook-based probing: same interventions, same outputs.

Baseline = what hook-library users write today: attention computed eagerly (materialized softmax) through
identity "hook point" modules, and plain PyTorch forward hooks on them that edit the scores (temperature,
knockout) or the per-head outputs (ablation, patching). Engine = `latentflow_fast.probe.trace` on the
unmodified model, its interventions applied inside the probed-attention operator.

Models: a hand-written SDPA model (also in a causal variant), nn.TransformerEncoder (batch_first, eval),
and SAM Audio (small random config). Tolerance: the operator's, relative 2-norm error <= 1e-5 (float32).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentflow_fast.ops import available_backends
from latentflow_fast.probe.hooks import trace

TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ----------------------------------------------------------------------------------- the eager baseline
class EagerCore(nn.Module):
    """softmax(q k^T * scale) v with hook points, as TransformerLens-style code computes attention."""

    def __init__(self):
        super().__init__()
        self.hook_scores = nn.Identity()   # [B, H, Nq, Nk] before masking
        self.hook_pattern = nn.Identity()  # [B, H, Nq, Nk]
        self.hook_z = nn.Identity()        # [B, H, Nq, hd]

    def forward(self, q, k, v, key_padding_mask=None, causal=False):
        scores = self.hook_scores(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]))
        if key_padding_mask is not None:
            scores = scores.masked_fill(~key_padding_mask[:, None, None, :], float("-inf"))
        if causal:
            scores = scores.masked_fill(~torch.ones(scores.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1))
        return self.hook_z(pattern @ v)


def hook_ablate(heads):
    def hook(module, inputs, out):
        out = out.clone()
        out[:, heads] = 0.0
        return out
    return hook


def hook_temperature(temperature, heads):
    def hook(module, inputs, scores):
        scores = scores.clone()
        scores[:, heads] = scores[:, heads] * (0.0 if math.isinf(temperature) else 1.0 / temperature)
        return scores
    return hook


def hook_knockout(start, stop):
    def hook(module, inputs, scores):
        scores = scores.clone()
        scores[..., start:stop] = float("-inf")
        return scores
    return hook


def hook_store(store, key):
    def hook(module, inputs, out):
        store[key] = out.detach().clone()
    return hook


def hook_patch(clean, heads):
    def hook(module, inputs, out):
        out = out.clone()
        out[:, heads] = clean[:, heads]
        return out
    return hook


# ----------------------------------------------------------------------------------- model (a): hand-written
class SDPABlock(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.core = EagerCore()  # used only when the model runs in "eager" mode (the baseline)
        self.impl = "sdpa"

    def forward(self, x, key_padding_mask=None):
        B, N, D = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        if self.impl == "sdpa":
            mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal)
        else:
            z = self.core(q, k, v, key_padding_mask, self.causal)
        return x + self.proj(z.transpose(1, 2).reshape(B, N, D))


class SDPAModel(nn.Module):
    def __init__(self, dim=16, heads=4, layers=2, causal=False):
        super().__init__()
        self.blocks = nn.ModuleList(SDPABlock(dim, heads, causal) for _ in range(layers))

    def forward(self, x, key_padding_mask=None):
        for block in self.blocks:
            x = block(x, key_padding_mask)
        return x


# ----------------------------------------------------------------------------------- the three cases
class Case:
    """A model, inputs, and a way to run it with eager hookable attention at every site."""

    site: str
    cross_site: str  # a site whose keys are segmented for knockout
    segments: list
    heads: int

    def run(self, inputs):
        with torch.no_grad():
            return self.model(*inputs[0], **inputs[1])

    @contextlib.contextmanager
    def eager(self):
        """Yields {site: EagerCore}; the model's attention runs through them meanwhile."""
        raise NotImplementedError


class HandWritten(Case):
    site, cross_site, heads = "blocks.1", "blocks.0", 4
    causal = False

    def __init__(self):
        torch.manual_seed(0)
        self.model = SDPAModel(causal=self.causal).eval()
        g = torch.Generator().manual_seed(1)
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[1, 4:] = False
        mask = None if self.causal else mask  # SDPA takes attn_mask or is_causal
        self.clean = ((torch.randn(2, 6, 16, generator=g), mask), {})
        self.corrupt = ((torch.randn(2, 6, 16, generator=g), mask), {})
        self.segments = [0, 2, 6]

    @contextlib.contextmanager
    def eager(self):
        blocks = list(self.model.blocks)
        for b in blocks:
            b.impl = "eager"
        try:
            yield {f"blocks.{i}": b.core for i, b in enumerate(blocks)}
        finally:
            for b in blocks:
                b.impl = "sdpa"


class CausalHandWritten(HandWritten):
    """GPT-style is_causal=True: probed through the fused operator's causal mask."""

    causal = True


def eager_mha(mha: nn.MultiheadAttention, core: EagerCore):
    """nn.MultiheadAttention (batch_first, packed in-projection) computed eagerly through `core`."""

    def forward(query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        assert attn_mask is None
        B, L, E = query.shape
        H = mha.num_heads
        q, k, v = F.linear(query, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(B, L, H, E // H).transpose(1, 2) for t in (q, k, v))
        keep = None
        if key_padding_mask is not None:
            keep = ~key_padding_mask if key_padding_mask.dtype == torch.bool else key_padding_mask == 0
        z = core(q, k, v, keep)
        return mha.out_proj(z.transpose(1, 2).reshape(B, L, E)), None

    return forward


class Encoder(Case):
    site, cross_site, heads = "layers.1.self_attn", "layers.0.self_attn", 4

    def __init__(self):
        torch.manual_seed(0)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
        g = torch.Generator().manual_seed(1)
        pad = torch.zeros(2, 6, dtype=torch.bool)  # torch convention: True = padding
        pad[1, 5:] = True
        self.clean = ((torch.randn(2, 6, 16, generator=g),), {"src_key_padding_mask": pad})
        self.corrupt = ((torch.randn(2, 6, 16, generator=g),), {"src_key_padding_mask": pad})
        self.segments = [0, 3, 6]

    @contextlib.contextmanager
    def eager(self):
        cores = {f"layers.{i}.self_attn": EagerCore() for i in range(len(self.model.layers))}
        prev = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)  # as hook users must: the fused path skips self_attn
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.forward = eager_mha(layer.self_attn, cores[f"layers.{i}.self_attn"])
        try:
            yield cores
        finally:
            for layer in self.model.layers:
                del layer.self_attn.forward
            torch.backends.mha.set_fastpath_enabled(prev)


class SAMAudioCase(Case):
    site, cross_site, heads = "layers.1.self_attn", "layers.0.cross_attn", 4

    def __init__(self):
        from latentflow_fast.models import SAMAudio, SAMAudioConfig

        torch.manual_seed(0)
        cfg = SAMAudioConfig(dim=32, n_heads=4, n_layers=2, latent_dim=8, text_dim=8, multiple_of=16)
        self.model = SAMAudio(cfg).eval()
        g = torch.Generator().manual_seed(1)
        B, T, L, C = 2, 6, 5, cfg.latent_dim
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, 4:] = False

        def inputs():
            return ((torch.randn(B, T, 2 * C, generator=g), torch.rand(B, generator=g),
                     torch.randn(B, T, C, generator=g), torch.randn(B, L, cfg.text_dim, generator=g), mask), {})

        self.clean, self.corrupt = inputs(), inputs()
        self.segments = {"*.cross_attn": [0, 2, 5], "*.self_attn": [0, 3, 6]}

    @contextlib.contextmanager
    def eager(self):
        router = self.model.attention_router
        sites = [m.site for m in self.model.modules() if hasattr(m, "site")]
        cores = {site: EagerCore() for site in sites}
        saved = dict(router.handlers)
        for site in sites:
            router.handlers[site] = lambda s, q, k, v, kpm: cores[s](q, k, v, kpm)
        try:
            yield cores
        finally:
            router.handlers.clear()
            router.handlers.update(saved)


CASES = {"handwritten": HandWritten, "handwritten_causal": CausalHandWritten, "transformer_encoder": Encoder,
         "sam_audio": SAMAudioCase}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    return CASES[request.param]()


def engine_run(case, inputs, configure, capture=(), backend="reference"):
    with trace(case.model, capture=capture, segments=case.segments, backend=backend) as tr:
        configure(tr)
        out = case.run(inputs)
    return out, tr


def eager_run(case, inputs, install):
    with case.eager() as cores:
        handles = install(cores)
        try:
            return case.run(inputs)
        finally:
            for h in handles:
                h.remove()


# ----------------------------------------------------------------------------------- tests
def test_unprobed_and_captured_runs_match_the_model(case):
    plain = case.run(case.clean)
    eager = eager_run(case, case.clean, lambda cores: [])
    assert rel_err(eager, plain) <= TOL  # the baseline's eager attention is the model's attention
    out, tr = engine_run(case, case.clean, lambda tr: None, capture=("entropy",))
    assert rel_err(out, plain) <= TOL
    assert case.site in tr.records and tr[case.site].entropy.shape[1] == case.heads


def _check(case, configure, install, inputs=None, backend="reference"):
    inputs = inputs or case.clean
    engine, _ = engine_run(case, inputs, configure, backend=backend)
    baseline = eager_run(case, inputs, install)
    assert rel_err(engine, baseline) <= TOL
    assert rel_err(baseline, case.run(inputs)) > 1e-4  # the intervention does something


def test_head_ablation(case):
    _check(case, lambda tr: tr.ablate_heads(case.site, heads=[1, 3]),
           lambda cores: [cores[case.site].hook_z.register_forward_hook(hook_ablate([1, 3]))])


def test_head_ablation_on_one_batch_row(case):
    def install(cores):
        def hook(module, inputs, out):
            out = out.clone()
            out[0, 2] = 0.0
            return out
        return [cores[case.site].hook_z.register_forward_hook(hook)]

    _check(case, lambda tr: tr.ablate_heads(case.site, heads=2, rows=[0]), install)


@pytest.mark.parametrize("temperature", [2.0, 0.5, float("inf")])
def test_temperature(case, temperature):
    _check(case, lambda tr: tr.set_temperature(case.site, temperature, heads=[0, 2]),
           lambda cores: [cores[case.site].hook_scores.register_forward_hook(hook_temperature(temperature, [0, 2]))])


def test_segment_knockout(case):
    segments = case.segments if isinstance(case.segments, list) else case.segments["*.cross_attn"]
    # a causal model's first queries see only the first keys: knock out the last segment there (an
    # all-masked row is 0 for the operator, NaN for eager softmax)
    g = len(segments) - 2 if getattr(case, "causal", False) else 0
    _check(case, lambda tr: tr.knockout_segments(case.cross_site, segments=g),
           lambda cores: [cores[case.cross_site].hook_scores.register_forward_hook(
               hook_knockout(segments[g], segments[g + 1]))])


def test_token_knockout(case):
    _check(case, lambda tr: tr.knockout_keys(case.cross_site, keys=[1, 2]),
           lambda cores: [cores[case.cross_site].hook_scores.register_forward_hook(hook_knockout(1, 3))])


def test_activation_patching(case):
    heads = [0, 3]
    # engine: record the clean head outputs, patch them into the corrupted run
    _, clean_tr = engine_run(case, case.clean, lambda tr: None, capture=("out",))
    clean_out = clean_tr[case.site].out
    engine, _ = engine_run(case, case.corrupt, lambda tr: tr.patch_output(case.site, clean_out, heads=heads))
    # hooks: store hook_z in the clean run, overwrite it in the corrupted run
    store = {}
    eager_run(case, case.clean, lambda cores: [cores[case.site].hook_z.register_forward_hook(hook_store(store, "z"))])
    baseline = eager_run(case, case.corrupt,
                         lambda cores: [cores[case.site].hook_z.register_forward_hook(hook_patch(store["z"], heads))])
    assert rel_err(clean_out, store["z"]) <= TOL
    assert rel_err(engine, baseline) <= TOL
    assert rel_err(baseline, case.run(case.corrupt)) > 1e-4


@pytest.mark.skipif("cpu" not in available_backends("cpu"), reason="the C++ CPU backend is not built")
def test_fused_cpu_backend_matches_hooks(case):
    """Ablation + temperature + token knockout at once, on the fused C++ kernel (the causal case through the
    kernel's causal mask)."""

    def configure(tr):
        tr.ablate_heads(case.site, heads=1).set_temperature(case.site, 2.0, heads=0)
        tr.knockout_keys(case.cross_site, keys=[1, 2])

    def install(cores):
        return [cores[case.site].hook_z.register_forward_hook(hook_ablate([1])),
                cores[case.site].hook_scores.register_forward_hook(hook_temperature(2.0, [0])),
                cores[case.cross_site].hook_scores.register_forward_hook(hook_knockout(1, 3))]

    _check(case, configure, install, backend="cpu")
