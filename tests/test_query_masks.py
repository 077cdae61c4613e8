"""Query-dependent masks of the operator: `causal` and `attn_mask` (docs/design.md, section 2).

The float64 reference is checked against torch's own scaled_dot_product_attention; the fused CPU kernel
(on every micro-kernel path this CPU runs) against the reference on seeded sweeps that combine the masks
with GQA, Nq != Nk, odd sizes, N = 1, fully masked rows, broadcast mask shapes, non-contiguous inputs,
key padding, every intervention and every capture. The Triton and CUDA kernels get the same sweeps in
test_triton_interpreter.py and test_cuda_emulated.py.
"""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import latentflow_fast as lf
from latentflow_fast.ops import build_plan
from latentflow_fast.ops.reference import reference_attention
from op_cases import INTERVENTIONS, check_against_reference, make_case

ALL = ("lse", "max", "entropy", "segment_mass", "key_mass")
HAS_CPU = "cpu" in lf.available_backends("cpu")
needs_cpu = pytest.mark.skipif(not HAS_CPU, reason="the fused CPU kernel is not built")


def _isas():
    if not HAS_CPU:
        return ["generic"]
    from latentflow_fast.ops.backend_cpu import supported_isas

    return supported_isas()


@pytest.fixture(params=_isas())
def isa(request, monkeypatch):
    monkeypatch.setenv("LATENTFLOW_CPU_ISA", request.param)
    return request.param


def _qkv(B=2, H=4, Hkv=2, Nq=9, Nk=13, D=8, Dv=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Nq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Nk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Nk, Dv, generator=g, dtype=dtype))


# ------------------------------------------------------------------------------- the reference vs torch
@pytest.mark.parametrize("Nq, Nk", [(9, 13), (13, 9), (7, 7), (1, 5)])
def test_reference_causal_is_torch_is_causal(Nq, Nk):
    """causal=True is SDPA's is_causal, top-left aligned also when Nq != Nk; "bottom_right" shifts by Nk - Nq."""
    q, k, v = _qkv(Nq=Nq, Nk=Nk)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    out, _ = lf.probed_attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, kk, vv, is_causal=True), rtol=1e-12, atol=1e-12)
    out, cap = lf.probed_attention(q, k, v, causal="bottom_right", capture=("lse",), backend="reference")
    keep = torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
    live = keep.any(-1)
    expected = F.scaled_dot_product_attention(q, kk, vv, attn_mask=keep)
    torch.testing.assert_close(out[:, :, live], expected[:, :, live], rtol=1e-12, atol=1e-12)
    assert torch.all(out[:, :, ~live] == 0) and torch.all(cap["lse"][:, :, ~live] == -math.inf)


@pytest.mark.parametrize("shape", [(2, 4, 9, 13), (2, 1, 9, 13), (1, 4, 9, 13), (9, 13), (2, 1, 1, 13), (1, 9, 13)])
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_reference_attn_mask_is_torch_attn_mask(shape, kind):
    q, k, v = _qkv()
    g = torch.Generator().manual_seed(1)
    if kind == "bool":
        mask = torch.rand(shape, generator=g) < 0.7
    else:
        mask = torch.randn(shape, generator=g, dtype=torch.float64)
        mask[torch.rand(shape, generator=g) < 0.2] = -math.inf
    out, _ = lf.probed_attention(q, k, v, attn_mask=mask, backend="reference")
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask)
    live = torch.isfinite(expected).all(-1)  # torch gives NaN for a row without a visible key
    torch.testing.assert_close(out[live], expected[live], rtol=1e-12, atol=1e-12)
    assert torch.all(out[~live] == 0)


# ------------------------------------------------------------------------------- every backend vs reference
@needs_cpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_matches_reference_with_query_masks(dtype, isa):
    """Seeded sweep: causal / bottom-right / bool / float masks with random interventions and captures;
    max_n 150 spans three 64-key tiles (diagonal tiles, skipped tiles, partial last tiles)."""
    for seed in range(24 if dtype == torch.float32 else 10):
        case = make_case(1000 + seed, dtype=dtype, max_n=150, query_masks=True)
        check_against_reference(case, "cpu")


@needs_cpu
def test_cpu_masks_with_every_intervention_and_capture(isa):
    for seed in range(12):
        case = make_case(2000 + seed, max_n=150, interventions=INTERVENTIONS, captures=ALL, query_masks=True)
        check_against_reference(case, "cpu")


@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPU else []))
def test_fully_masked_rows_attend_to_nothing(backend):
    """Rows whose keys are all masked (bottom-right causal with Nq > Nk, an all-False bool row, an all -inf
    float row) give p = 0: out = gate * 0 + bias, lse = max = -inf, entropy +0, no key mass."""
    q, k, v = _qkv(B=2, H=2, Hkv=2, Nq=70, Nk=66, dtype=torch.float32)
    boolm = torch.ones(2, 2, 70, 66, dtype=torch.bool)
    boolm[1, 0, 5] = False
    floatm = torch.zeros(70, 66)
    floatm[6] = -math.inf
    bias = torch.randn(2, 2, 5)
    for kwargs, dead in (({"causal": "bottom_right"}, (slice(None), slice(None), slice(0, 4))),
                         ({"attn_mask": boolm}, (1, 0, 5)), ({"attn_mask": floatm}, (slice(None), slice(None), 6))):
        out, cap = lf.probed_attention(q, k, v, backend=backend, out_bias=bias, segments=[0, 30, 66], capture=ALL,
                                       **kwargs)
        assert torch.all(cap["lse"][dead] == -math.inf) and torch.all(cap["max"][dead] == -math.inf)
        assert torch.all(cap["entropy"][dead] == 0) and not torch.signbit(cap["entropy"][dead]).any()
        assert torch.all(cap["segment_mass"][dead] == 0)
        assert torch.equal(out[dead], bias[:, :, None, :].expand(out.shape)[dead]), kwargs  # p = 0: only the bias
        ref = lf.probed_attention(q.double(), k.double(), v.double(), backend="reference", capture=ALL,
                                  out_bias=bias, segments=[0, 30, 66],
                                  **{n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
                                     for n, t in kwargs.items()})[1]
        torch.testing.assert_close(cap["key_mass"], ref["key_mass"].float(), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- tile skipping, determinism
@needs_cpu
def test_cpu_never_reads_key_tiles_the_masks_hide(isa):
    """Key tiles that causal or an all-False bool mask hide are skipped, not computed and discarded: a NaN
    planted there (after the argument checks) does not reach any output, key_mass included."""
    from latentflow_fast.ops import backend_cpu

    mask = torch.ones(1, 1, 64, 192, dtype=torch.bool)
    mask[..., 128:] = False  # key tile 2 hidden from every query of the (single) query tile
    # causal: tiles 1 and 2 lie beyond the diagonal of every query row 0..63; the bool mask hides tile 2.
    for kwargs, hidden in (({"causal": True}, 64), ({"attn_mask": mask}, 128)):
        q, k, v = _qkv(B=1, H=2, Hkv=1, Nq=64, Nk=192, D=16, Dv=16, dtype=torch.float32)
        plan = build_plan(q, k, v, segments=[0, 100, 192], capture=ALL, **kwargs)
        k[:, :, hidden:] = float("nan")  # p * NaN would be NaN even where p = 0
        v[:, :, hidden:] = float("nan")
        out, cap = backend_cpu.run(plan)
        assert torch.isfinite(out).all(), kwargs
        assert all(torch.isfinite(cap[n]).all() for n in ("lse", "entropy", "segment_mass", "key_mass")), kwargs
        assert torch.all(cap["key_mass"][..., hidden:] == 0)


@needs_cpu
@pytest.mark.parametrize("kind", ["causal", "bool", "float"])
def test_cpu_masks_are_deterministic_and_batch_invariant(kind, isa):
    q, k, v = _qkv(B=3, H=4, Hkv=2, Nq=100, Nk=140, D=16, Dv=16, dtype=torch.float32, seed=3)
    g = torch.Generator().manual_seed(4)
    kwargs = {"causal": True}
    if kind == "bool":
        kwargs = {"attn_mask": torch.rand(3, 1, 100, 140, generator=g) < 0.6}
    elif kind == "float":
        kwargs = {"attn_mask": torch.randn(3, 4, 100, 140, generator=g)}
    run = lambda q, k, v, **kw: lf.probed_attention(q, k, v, backend="cpu", capture=ALL, segments=[0, 70, 140], **kw)
    out, cap = run(q, k, v, **kwargs)
    out2, cap2 = run(q, k, v, **kwargs)
    assert torch.equal(out, out2) and all(torch.equal(cap[n], cap2[n]) for n in ALL)
    for b in range(3):
        single = {n: (t[b : b + 1] if torch.is_tensor(t) else t) for n, t in kwargs.items()}
        o1, c1 = run(q[b : b + 1], k[b : b + 1], v[b : b + 1], **single)
        assert torch.equal(o1, out[b : b + 1]), b
        assert all(torch.equal(c1[n], cap[n][b : b + 1]) for n in ALL), b


@needs_cpu
def test_broadcast_mask_equals_expanded_mask():
    """A [1, 1, Nq, Nk] mask (stride-0 batch and head in the kernel) gives the bits of its expanded copy."""
    q, k, v = _qkv(B=2, H=4, Hkv=2, Nq=70, Nk=90, dtype=torch.float32)
    mask = torch.randn(1, 1, 70, 90)
    a = lf.probed_attention(q, k, v, attn_mask=mask, capture=ALL, segments=[0, 45, 90], backend="cpu")
    b = lf.probed_attention(q, k, v, attn_mask=mask.expand(2, 4, 70, 90).contiguous(), capture=ALL,
                            segments=[0, 45, 90], backend="cpu")
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][n], b[1][n]) for n in ALL)


def test_causal_costs_half_of_dense_in_tiles():
    """The causal loop bound: with Nq = Nk = 256 (4 x 4 tiles) 10 of the 16 (query tile, key tile) pairs run."""
    tiles = 0
    for qt in range(4):
        last_visible = qt * 64 + 63
        tiles += min(4, last_visible // 64 + 1)
    assert tiles == 10  # the kernel's causal_tile_end rule, as documented in docs/design.md


# ------------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("kwargs, error, match", [
    ({"causal": "diagonal"}, TypeError, "causal must be a bool, 'top_left' or 'bottom_right'"),
    ({"causal": 1}, TypeError, "causal must be"),
    ({"attn_mask": torch.ones(6, 6, dtype=torch.int64)}, TypeError, "attn_mask must be bool .* or floating point"),
    ({"attn_mask": [[True]]}, TypeError, "attn_mask must be a bool or floating-point tensor"),
    ({"attn_mask": torch.ones(2, 2, 5, 6, dtype=torch.bool)}, ValueError, r"attn_mask of shape \(2, 2, 5, 6\) is not broadcastable"),
    ({"attn_mask": torch.ones(3, 1, 6, 6, dtype=torch.bool)}, ValueError, "attn_mask of shape .* not broadcastable"),
    ({"attn_mask": torch.ones(1, 2, 2, 6, 6, dtype=torch.bool)}, ValueError, "attn_mask must have 2 to 4 dims"),
    ({"attn_mask": torch.ones(6, dtype=torch.bool)}, ValueError, "attn_mask must have 2 to 4 dims"),
    ({"attn_mask": torch.tensor([[0.0, 0, 0, float("nan"), 0, 0]])}, ValueError, r"attn_mask must be finite or -inf; it holds \d+ NaN"),
    ({"attn_mask": torch.tensor([[0.0, 0, 0, math.inf, 0, 0]])}, ValueError, r"attn_mask must be finite or -inf; it holds \+inf"),
])
@pytest.mark.parametrize("backend", ["reference"] + (["cpu"] if HAS_CPU else []))
def test_bad_mask_arguments_name_the_argument(kwargs, error, match, backend):
    q, k, v = _qkv(B=2, H=2, Hkv=2, Nq=6, Nk=6, dtype=torch.float32)
    with pytest.raises(error, match=match):
        lf.probed_attention(q, k, v, backend=backend, **kwargs)


def test_masks_on_meta_tensors_give_meta_results():
    q = torch.empty(2, 4, 5, 8, device="meta")
    k = torch.empty(2, 2, 7, 8, device="meta")
    out, cap = lf.probed_attention(q, k, k, causal=True, attn_mask=torch.empty(2, 1, 5, 7, device="meta"),
                                   capture=("lse", "key_mass"))
    assert out.shape == (2, 4, 5, 8) and out.device.type == "meta" and cap["key_mass"].shape == (2, 4, 7)


def test_minus_inf_only_float_mask_equals_bool_mask():
    """An additive mask of 0 / -inf and the bool mask it encodes give the same float64 result."""
    q, k, v = _qkv()
    keep = torch.rand(2, 1, 9, 13, generator=torch.Generator().manual_seed(5)) < 0.6
    additive = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, -math.inf)
    a = lf.probed_attention(q, k, v, attn_mask=keep, capture=ALL[:3], backend="reference")
    b = lf.probed_attention(q, k, v, attn_mask=additive, capture=ALL[:3], backend="reference")
    assert torch.equal(a[0], b[0]) and all(torch.equal(a[1][n], b[1][n]) for n in ALL[:3])


# ------------------------------------------------------------------------------- intercepted models
class _SdpaBlock(torch.nn.Module):
    """A model core that calls SDPA with the masks decoder LMs and padded HF batches pass."""

    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.kw = sdpa_kwargs

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, **self.kw)


def _hf_masks(B=2, N=70):
    """GPT-2 style (causal & right padding) and BERT style (padding only) additive masks holding
    torch.finfo(float32).min, as transformers builds them for SDPA, plus a bool causal & padding mask."""
    lengths = torch.tensor([N, N - 23])
    pad = torch.arange(N)[None, :] < lengths[:, None]  # [B, Nk] True = real token
    causal = torch.ones(N, N, dtype=torch.bool).tril()
    keep = causal[None, None] & pad[:, None, None, :]
    low = torch.finfo(torch.float32).min
    return {
        "is_causal": dict(is_causal=True),
        "gpt2_padded": dict(attn_mask=torch.zeros(B, 1, N, N).masked_fill(~keep, low)),
        "bert_padded": dict(attn_mask=torch.zeros(B, 1, 1, N).masked_fill(~pad[:, None, None, :], low)),
        "bool_causal_padded": dict(attn_mask=keep),
    }


@needs_cpu
@pytest.mark.parametrize("name", ["is_causal", "gpt2_padded", "bert_padded", "bool_causal_padded"])
def test_intercepted_causal_and_padded_sdpa_runs_fused(name, monkeypatch):
    """SDPA calls with is_causal or a causal / padding attn_mask are probed by the fused CPU kernel (the float64
    reference is never called) and match plain SDPA; the entropy capture matches the float64 reference."""
    from latentflow_fast.ops import backend_reference
    from latentflow_fast.probe.hooks import trace

    kwargs = _hf_masks()[name]
    net = _SdpaBlock(**kwargs)
    q, k, v = _qkv(B=2, H=4, Hkv=4, Nq=70, Nk=70, D=16, Dv=16, dtype=torch.float32)
    plain = net(q, k, v)

    def refuse(plan):
        raise AssertionError("the float64 reference ran: the call was not fused")

    monkeypatch.setattr(backend_reference, "run", refuse)
    with torch.no_grad(), trace(net, capture=("entropy",), backend="auto") as tr:
        out = net(q, k, v)
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    monkeypatch.undo()
    mask = kwargs.get("attn_mask")
    _, ref = lf.probed_attention(q.double(), k.double(), v.double(), backend="reference", capture=("entropy",),
                                 causal=kwargs.get("is_causal", False),
                                 attn_mask=mask.double() if mask is not None and mask.is_floating_point() else mask)
    torch.testing.assert_close(tr["root"].entropy, ref["entropy"].float(), rtol=1e-5, atol=1e-5)


def test_finfo_min_counts_as_masked():
    """Additive values at or below -1e30 (torch.finfo(dtype).min, as HF uses) are masking: a row made only of
    them attends to nothing, like a row of -inf."""
    q, k, v = _qkv(Nq=3, Nk=4)
    mask = torch.zeros(3, 4, dtype=torch.float64)
    mask[1] = torch.finfo(torch.float32).min
    mask[2, :2] = -1e31
    out, cap = lf.probed_attention(q, k, v, attn_mask=mask, capture=("lse",), backend="reference")
    keep = torch.tensor([[True] * 4, [False] * 4, [False, False, True, True]])
    out2, cap2 = lf.probed_attention(q, k, v, attn_mask=keep, capture=("lse",), backend="reference")
    assert torch.equal(out, out2) and torch.equal(cap["lse"], cap2["lse"]) and torch.isneginf(cap["lse"][:, :, 1]).all()


# ------------------------------------------------------------------------------- the custom op
@needs_cpu
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck_with_masks(backend):
    """The custom op with its causal_offset / attn_mask arguments passes torch.library.opcheck (schema,
    fake implementation, autograd registration)."""
    from latentflow_fast.ops import CAPTURE_NAMES

    q, k, v = _qkv(B=2, H=4, Hkv=2, Nq=9, Nk=13, D=8, Dv=8, dtype=torch.float32)
    keep = torch.rand(2, 1, 9, 13, generator=torch.Generator().manual_seed(6)) < 0.7
    plan = build_plan(q, k, v, causal="bottom_right", attn_mask=keep, segments=[0, 5, 13], capture=ALL)
    args = (plan.q, plan.k, plan.v, plan.key_padding_mask, plan.scale, plan.segments, plan.logit_scale,
            plan.segment_bias, plan.head_gate, plan.out_bias, plan.out_patch, plan.patch_mask,
            [n in plan.capture for n in CAPTURE_NAMES], backend, plan.causal_offset, plan.attn_mask)
    torch.library.opcheck(torch.ops.latentflow.probed_attention.default, args)


@needs_cpu
def test_torch_compile_with_masks():
    q, k, v = _qkv(B=2, H=4, Hkv=2, Nq=9, Nk=13, D=8, Dv=8, dtype=torch.float32)
    mask = torch.randn(1, 4, 9, 13, generator=torch.Generator().manual_seed(7))

    def probe(q, k, v):
        out, caps = lf.probed_attention(q, k, v, backend="cpu", causal=True, attn_mask=mask, capture=("entropy",))
        return out * 2, caps["entropy"] + 1

    compiled = torch.compile(probe, backend="aot_eager")
    eager = probe(q, k, v)
    got = compiled(q, k, v)
    assert torch.equal(eager[0], got[0]) and torch.equal(eager[1], got[1])
