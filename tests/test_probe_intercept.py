"""Interception of attention calls: site naming, argument conversion, refusals, MultiheadAttention, cleanup."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentflow_fast import probed_attention
from latentflow_fast.probe.hooks import trace
from latentflow_fast.probe.intercept import Interceptor, UnsupportedAttentionError, static_sites


class Recorder:
    """A SiteHandler that records the converted calls and computes them with the reference operator."""

    def __init__(self, want=lambda site: True):
        self.want = want
        self.calls = []

    def wants(self, site):
        return self.want(site)

    def attend(self, call):
        self.calls.append(call)
        out, _ = probed_attention(call.q, call.k, call.v, key_padding_mask=call.key_padding_mask,
                                  scale=call.scale, causal=call.causal, attn_mask=call.attn_bias, backend="reference")
        return out, None


class TwoCalls(nn.Module):
    """One module that calls SDPA twice per forward (e.g. self- then cross-attention), with an SDPA kwargs mix."""

    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.kw = sdpa_kwargs

    def forward(self, q, k, v):
        a = F.scaled_dot_product_attention(q, k, v, **self.kw)
        return F.scaled_dot_product_attention(a, k, v, **self.kw)


class Net(nn.Module):
    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList([TwoCalls(**sdpa_kwargs), TwoCalls(**sdpa_kwargs)])

    def forward(self, q, k, v):
        for block in self.blocks:
            q = block(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)  # called by the root module itself


def qkv(B=2, H=4, Hkv=4, Nq=5, Nk=6, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g), torch.randn(B, Hkv, Nk, D, generator=g),
            torch.randn(B, Hkv, Nk, D, generator=g))


def test_sites_are_module_paths_with_call_suffix():
    net, rec = Net(), Recorder()
    with Interceptor(net, rec) as icpt:
        net(*qkv(Nk=5))
        net(*qkv(Nk=5))  # a second forward reuses the same names
    names = ["blocks.0", "blocks.0#1", "blocks.1", "blocks.1#1", "root"]
    assert list(icpt.seen) == names
    assert [c.site for c in rec.calls] == names * 2


def test_unwanted_sites_run_the_original_sdpa_bitwise():
    net = Net()
    q, k, v = qkv(Nk=5)
    plain = net(q, k, v)
    rec = Recorder(want=lambda site: site == "blocks.1")
    with Interceptor(net, rec):
        out = net(q, k, v)
    assert [c.site for c in rec.calls] == ["blocks.1"]
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    with Interceptor(net, Recorder(want=lambda site: False)):
        assert torch.equal(net(q, k, v), plain)


def test_everything_is_removed_on_exit_even_after_an_error():
    net = Net()
    rec = Recorder()
    with pytest.raises(RuntimeError):
        with Interceptor(net, rec):
            net(*qkv(Nk=5))
            raise RuntimeError("boom")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert all("forward" not in m.__dict__ for m in net.modules())  # the call-count restart wrappers are gone
    n = len(rec.calls)
    net(*qkv(Nk=5))
    assert len(rec.calls) == n  # the torch-function mode is gone


@pytest.mark.parametrize("form", ["bool", "float", "rank2"])
def test_key_padding_masks_become_the_operator_key_padding_mask(form):
    q, k, v = qkv()
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, 4:] = False
    if form == "bool":
        mask = keep[:, None, None, :]
    elif form == "float":
        mask = torch.zeros(2, 1, 1, 6).masked_fill(~keep[:, None, None, :], float("-inf"))
    else:  # [B?]: a mask without batch dim broadcasts over the batch
        keep = keep[1:].expand(2, 6)
        mask = keep[0].reshape(1, 6)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    net, rec = TwoCalls(attn_mask=mask), Recorder()
    with Interceptor(net, rec):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # outside any module: not intercepted
        assert not rec.calls
        got = net(q, k, v)
    assert torch.equal(rec.calls[0].key_padding_mask, keep)
    ref = F.scaled_dot_product_attention(expected, k, v, attn_mask=mask)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, expected)


def test_scale_gqa_and_extra_batch_dims_are_honoured():
    q, k, v = qkv(H=4, Hkv=2, Nk=5)
    net = TwoCalls(scale=0.3, enable_gqa=True)
    plain = net(q, k, v)
    rec = Recorder()
    with Interceptor(net, rec):
        out = net(q, k, v)
    assert rec.calls[0].scale == 0.3 and rec.calls[0].k.shape[1] == 2
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    # rank-5 inputs [B, G, H, N, D]: leading dims are flattened into the operator's batch
    q5, k5, v5 = (t.reshape(1, 2, *t.shape[1:]) for t in qkv(Nk=5))
    net = TwoCalls()
    with Interceptor(net, Recorder()):
        torch.testing.assert_close(net(q5, k5, v5), TwoCalls()(q5, k5, v5), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    dict(is_causal=True),
    dict(attn_mask=torch.ones(5, 5, dtype=torch.bool).tril()),                  # per-query bool mask
    dict(attn_mask=torch.randn(2, 1, 1, 5)),                                    # additive key bias
    dict(attn_mask=torch.randn(1, 4, 5, 5).masked_fill(torch.eye(5, dtype=torch.bool), float("-inf"))),
], ids=["causal", "bool_per_query", "float_bias", "per_head_float"])
def test_general_masks_are_probed_exactly(kwargs):
    q, k, v = qkv(Nk=5)
    net = TwoCalls(**kwargs)
    plain = net(q, k, v)
    rec = Recorder()
    with Interceptor(net, rec):
        out = net(q, k, v)
    assert (rec.calls[0].attn_bias is not None or rec.calls[0].causal) and rec.calls[0].key_padding_mask is None
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_general_masks_with_trace_captures_and_pattern():
    q, k, v = qkv(Nk=5)
    net = TwoCalls(is_causal=True)
    with torch.no_grad(), trace(net, capture=("entropy",)) as tr:
        tr.cache_hooks(lambda name: name == "root.hook_pattern")
        net(q, k, v)
    p = tr.cache["root.hook_pattern"]
    expected = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(
        ~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf")), -1)
    torch.testing.assert_close(p, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tr["root"].entropy, -torch.special.xlogy(expected, expected).sum(-1),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(dropout_p=0.1), UnsupportedAttentionError, "dropout"),
    (dict(is_causal=True, attn_mask=torch.ones(5, 5, dtype=torch.bool)), ValueError, "not both"),
])
def test_unsupported_forms_are_refused_at_probed_sites_only(kwargs, error, match):
    q, k, v = qkv(Nk=5)
    net = TwoCalls(**kwargs)
    with Interceptor(net, Recorder()):
        with pytest.raises(error, match=match):
            net(q, k, v)
    if "dropout_p" in kwargs:
        with Interceptor(net, Recorder(want=lambda site: False)):
            net(q, k, v)  # not probed: runs as written


def test_three_dim_sdpa_inputs_are_refused_when_probed():
    q, k, v = (t[:, 0] for t in qkv(Nk=5))
    net = TwoCalls()
    with Interceptor(net, Recorder()):
        with pytest.raises(UnsupportedAttentionError, match="rank >= 4"):
            net(q, k, v)


# ----------------------------------------------------------------------------------- MultiheadAttention
MHA_CONFIGS = {
    "batch_first": dict(batch_first=True),
    "seq_first": dict(batch_first=False),
    "kdim_vdim": dict(batch_first=True, kdim=6, vdim=10),
    "bias_kv_zero_attn": dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
    "no_bias": dict(batch_first=True, bias=False),
}


def _mha_masks(B, H, L, S):
    g = torch.Generator().manual_seed(2)
    blocked = torch.rand(L, S, generator=g) < 0.3
    blocked[:, 0] = False  # every query keeps a key
    pad = torch.zeros(B, S, dtype=torch.bool)
    pad[1, 5:] = True
    return {
        "padding": dict(key_padding_mask=pad),
        "float_padding_bias": dict(key_padding_mask=torch.randn(B, S, generator=g)),
        "attn_mask_bool": dict(attn_mask=blocked, key_padding_mask=pad),
        "attn_mask_float_3d": dict(attn_mask=torch.randn(B * H, L, S, generator=g)),
    }


@pytest.mark.parametrize("config", list(MHA_CONFIGS))
@pytest.mark.parametrize("masks", ["padding", "float_padding_bias", "attn_mask_bool", "attn_mask_float_3d"])
def test_multihead_attention_matches_native_with_weights(config, masks):
    torch.manual_seed(0)
    kw = MHA_CONFIGS[config]
    mha = nn.MultiheadAttention(16, 4, **kw).eval()
    B, L, S = 2, 5, 7
    g = torch.Generator().manual_seed(1)
    first = kw["batch_first"]
    shape = (lambda n, d: (B, n, d)) if first else (lambda n, d: (n, B, d))
    query = torch.randn(*shape(L, 16), generator=g)
    key = torch.randn(*shape(S, kw.get("kdim", 16)), generator=g)
    value = torch.randn(*shape(S, kw.get("vdim", 16)), generator=g)
    mask_kw = _mha_masks(B, 4, L, S)[masks]
    average = masks != "padding"
    with torch.no_grad():
        out, weights = mha(query, key, value, average_attn_weights=average, **mask_kw)
        with trace(mha, capture=("entropy",), backend="reference") as tr:
            got, got_w = mha(query, key, value, average_attn_weights=average, **mask_kw)
    assert "root" in tr.records
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, weights, rtol=1e-5, atol=1e-6)


def test_multihead_attention_unbatched_and_causal():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    x = torch.randn(5, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        out, w = mha(x, x, x)
        out_c, w_c = mha(x, x, x, attn_mask=causal, is_causal=True)
        with trace(mha, capture=("lse",)):
            got, got_w = mha(x, x, x)
            got_c, got_wc = mha(x, x, x, attn_mask=causal, is_causal=True)
            with pytest.raises(ValueError, match="is_causal"):
                mha(x, x, x, is_causal=True)
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_w, w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_c, out_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_wc, w_c, rtol=1e-5, atol=1e-6)
    assert "forward" not in mha.__dict__


def test_transformer_encoder_fast_path_is_bypassed_and_restored():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    assert static_sites(enc) == [f"layers.{i}.self_attn" for i in range(3)]
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        plain = enc(x)
        plain_causal = enc(x, mask=causal, is_causal=True)
        with trace(enc, sites="layers.1.*", capture=("entropy",)) as tr:
            out = enc(x)
            out_causal = enc(x, mask=causal, is_causal=True)
    assert tr.sites == [f"layers.{i}.self_attn" for i in range(3)]  # every call reached self_attn
    assert list(tr.records) == ["layers.1.self_attn"]
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_causal, plain_causal, rtol=1e-5, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad(), trace(enc, capture=("lse",), intercept_sdpa=False) as tr:  # MHA swap alone
        torch.testing.assert_close(enc(x), plain, rtol=1e-5, atol=1e-5)
    assert list(tr.records) == [f"layers.{i}.self_attn" for i in range(3)]


# ----------------------------------------------------------------------------------- router models
class RouterModel(nn.Module):
    """The shape of a latentflow_fast model: attention modules with `.site` calling a shared router."""

    def __init__(self):
        super().__init__()
        from latentflow_fast.models import AttentionRouter

        self.attention_router = AttentionRouter()
        self.attn = nn.ModuleList()
        for i in range(2):
            m = nn.Module()
            m.site, m.router = f"layers.{i}.self_attn", self.attention_router
            self.attn.append(m)

    def forward(self, q, k, v):
        for m in self.attn:
            q = m.router(m.site, q, k, v, None)
        return q


def test_router_sites_are_used_and_previous_handlers_restored():
    model = RouterModel()
    calls = []

    def previous(site, q, k, v, kpm):
        calls.append(site)
        return F.scaled_dot_product_attention(q, k, v)

    model.attention_router.handlers["layers.0.self_attn"] = previous
    rec = Recorder(want=lambda site: site == "layers.1.self_attn")
    q, k, v = qkv(Nk=5)
    plain = model(q, k, v)
    with Interceptor(model, rec) as icpt:
        out = model(q, k, v)
    assert icpt._mode is None and not icpt.intercept_sdpa  # router models need no torch-function mode
    assert list(icpt.seen) == ["layers.0.self_attn", "layers.1.self_attn"]
    assert calls == ["layers.0.self_attn"] * 2  # the unprobed site still ran the earlier handler
    assert [c.site for c in rec.calls] == ["layers.1.self_attn"]
    assert model.attention_router.handlers == {"layers.0.self_attn": previous}
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)


def test_sam_audio_sites():
    from latentflow_fast.models import SAMAudio, SAMAudioConfig

    model = SAMAudio(SAMAudioConfig(dim=32, n_heads=4, n_layers=2, latent_dim=8, text_dim=8, multiple_of=16)).eval()
    assert static_sites(model) == [f"layers.{i}.{k}" for i in range(2) for k in ("self_attn", "cross_attn")]


def test_interceptor_argument_checks():
    with pytest.raises(TypeError, match="model"):
        Interceptor(object(), Recorder())


# ----------------------------------------------------------------------------------- threads
def _in_thread(fn):
    """Run fn in a new thread; re-raise its exception here."""
    import threading

    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _joined(thread, box):
    thread.join(timeout=120)
    assert not thread.is_alive()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def test_two_threads_tracing_different_models_do_not_interfere():
    """Thread A traces one encoder, thread B another; A leaves first, while B is still tracing. B's trace
    still reaches its self-attention (the MHA fast-path switch is shared by count, not restored by A under
    B), its ablation still applies, and afterwards the switch is back to what it was."""
    import threading

    torch.manual_seed(0)

    def encoder():
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()

    enc_a, enc_b = encoder(), encoder()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        plain_a, plain_b = enc_a(x), enc_b(x)
    b_entered, a_left = threading.Event(), threading.Event()

    def thread_a():
        with torch.no_grad(), trace(enc_a, capture=("entropy",)) as tr:
            b_entered.wait(60)
            out = enc_a(x)
        a_left.set()
        return out, sorted(tr.records)

    def thread_b():
        with torch.no_grad(), trace(enc_b, capture=("entropy",)) as tr:
            tr.ablate_heads("layers.0.self_attn", heads=[0, 1, 2, 3])
            b_entered.set()
            a_left.wait(60)
            out = enc_b(x)  # A has left: its exit must not have switched B's interception off
            # the other model, run here without a trace, is untouched by A's (gone) and B's traces
            other = enc_a(x)
        return out, sorted(tr.records), other

    ta, box_a = _in_thread(thread_a)
    tb, box_b = _in_thread(thread_b)
    out_a, records_a = _joined(ta, box_a)
    out_b, records_b, other = _joined(tb, box_b)
    assert records_a == records_b == ["layers.0.self_attn", "layers.1.self_attn"]
    torch.testing.assert_close(out_a, plain_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other, plain_a, rtol=1e-5, atol=1e-5)
    assert (out_b - plain_b).abs().max() > 1e-3  # B's ablation applied after A left
    assert torch.backends.mha.get_fastpath_enabled()  # restored once both left
    for enc in (enc_a, enc_b):
        assert all("forward" not in m.__dict__ for m in enc.modules())
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in enc.modules())


def test_a_trace_acts_only_in_its_thread_and_chains_unwind_in_any_order():
    """The same router model traced by two threads at once: each thread sees only its own interventions,
    an untraced thread sees none, and the handlers are gone once both traces left (first-in left first)."""
    import threading

    model = RouterModel()
    q, k, v = qkv(Nk=5)
    plain = model(q, k, v)
    site = "layers.0.self_attn"
    inside, release = threading.Barrier(3), threading.Event()
    a_left = threading.Event()

    def traced(heads, wait_for=None):
        def run():
            with torch.no_grad(), trace(model) as tr:
                tr.ablate_heads(site, heads=heads)
                inside.wait(60)
                first = model(q, k, v)
                release.wait(60)
                if wait_for is not None:
                    wait_for.wait(60)
                second = model(q, k, v)
            if wait_for is None:
                a_left.set()
            return first, second

        return run

    ta, box_a = _in_thread(traced([0]))
    tb, box_b = _in_thread(traced([1, 2], wait_for=a_left))
    inside.wait(60)
    untraced = model(q, k, v)  # this thread has no trace: plain attention
    release.set()
    first_a, second_a = _joined(ta, box_a)
    first_b, second_b = _joined(tb, box_b)
    torch.testing.assert_close(untraced, plain)
    with torch.no_grad(), trace(model) as tr:
        tr.ablate_heads(site, heads=[0])
        expect_a = model(q, k, v)
    with torch.no_grad(), trace(model) as tr:
        tr.ablate_heads(site, heads=[1, 2])
        expect_b = model(q, k, v)
    assert not torch.equal(expect_a, expect_b)
    for got in (first_a, second_a):
        torch.testing.assert_close(got, expect_a)
    for got in (first_b, second_b):  # second_b ran after A had left, through A's inactive handler
        torch.testing.assert_close(got, expect_b)
    assert model.attention_router.handlers == {}


def test_call_numbering_restarts_per_forward_and_leaves_the_module_as_it_was():
    """The `#k` count restarts at each forward through a wrapper of the module's forward, installed while
    active only: it chains to a forward someone else put on the instance (as nnsight and accelerate do), keeps
    the signature visible to inspect, and every trace (and a re-entered interceptor) starts from zero."""
    import inspect

    net = Net()
    calls = []

    def outer_forward(q, k, v):  # another tool's instance-level forward on blocks.0
        calls.append("outer")
        return TwoCalls.forward(net.blocks[0], q, k, v)

    net.blocks[0].forward = outer_forward
    rec = Recorder()
    icpt = Interceptor(net, rec)
    for _ in range(2):  # the same interceptor entered twice: counts start again
        with icpt:
            net(*qkv(Nk=5))
            wrapped = inspect.signature(net.blocks[1].forward)
            assert wrapped == inspect.signature(TwoCalls.forward.__get__(net.blocks[1]))
            net(*qkv(Nk=5))
    assert [c.site for c in rec.calls] == ["blocks.0", "blocks.0#1", "blocks.1", "blocks.1#1", "root"] * 4
    assert calls == ["outer"] * 4
    assert net.blocks[0].__dict__["forward"] is outer_forward and "forward" not in net.blocks[1].__dict__


def test_call_numbering_of_nested_interceptors_unwinds_in_any_order():
    net = Net()
    outer, inner = Recorder(), Recorder()
    a = Interceptor(net, outer)
    b = Interceptor(net, inner)
    a.__enter__()
    b.__enter__()
    net(*qkv(Nk=5))
    a.__exit__(None, None, None)  # the outer one leaves first: the inner one keeps numbering per forward
    net(*qkv(Nk=5))
    b.__exit__(None, None, None)
    names = ["blocks.0", "blocks.0#1", "blocks.1", "blocks.1#1", "root"]
    assert [c.site for c in inner.calls] == names * 2 and outer.calls == []
    assert all("forward" not in m.__dict__ for m in net.modules())


def test_a_trace_leaves_no_forward_behind_on_any_root():
    """trace() counts the model's forwards and restarts `#k` counts through forward wrappers stacked on the
    same modules (the root too when it calls SDPA itself, or is a MultiheadAttention); leaving must unwind
    them to exactly what was there before, and a trace cannot be entered twice."""
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    net = Net()

    def own_forward(q, k, v):  # an instance forward another tool installed on the root
        return Net.forward(net, q, k, v)

    for model, run in ((mha, lambda: mha(x, x, x)), (net, lambda: net(*qkv(Nk=5)))):
        for own in (None, own_forward if model is net else None):
            if own is not None:
                model.forward = own
            with torch.no_grad(), trace(model, capture=("entropy",)) as tr:
                run()
                run()
                with pytest.raises(RuntimeError, match="already active"):
                    tr.__enter__()
            assert tr.sites
            if own is None:
                assert all("forward" not in m.__dict__ for m in model.modules())
            else:
                assert model.__dict__["forward"] is own
                assert all("forward" not in m.__dict__ for m in model.modules() if m is not model)
                del model.forward
