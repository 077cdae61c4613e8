"""The CUDA backend on a real GPU: realistic sizes vs the float64 reference (every capture and
intervention, masks, GQA, ragged and strided inputs), bitwise determinism and batch invariance, CUDA-graph
capture/replay, torch.compile through the custom op, torch.library.opcheck, dispatch.

Skipped without CUDA (see conftest.py) or when the extension was built without nvcc.
Run with tests/gpu/run_all.sh, or alone: python -m pytest tests/gpu/test_cuda_gpu.py -v
"""

from __future__ import annotations

import math

import pytest
import torch

from op_cases import assert_matches_reference, check_against_reference, make_case  # noqa: E402

from latentflow_fast.ops import CAPTURE_NAMES, build_plan, probed_attention, unavailable_reason  # noqa: E402
from latentflow_fast.ops import backend_cuda, backends  # noqa: E402
from latentflow_fast.ops.reference import reference_attention  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or unavailable_reason("cuda") is not None,
    reason=str(unavailable_reason("cuda")),
)

DEVICE = "cuda"
ALL = CAPTURE_NAMES
BACKEND = "cuda"


def _inputs(B, H, Hkv, Nq, Nk, D, dtype, seed=0, masked_row=True, layout="contiguous"):
    """Random q/k/v, a key mask (the last batch row fully masked), SAM-Audio-like segments."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)

    if layout == "bnhd":  # [B, N, H, D] storage viewed as [B, H, N, D]: read in place (row stride H*D)
        q = randn(B, Nq, H, D, scale=1.5).transpose(1, 2)
        k = randn(B, Nk, Hkv, D, scale=1.5).transpose(1, 2)
        v = randn(B, Nk, Hkv, D).transpose(1, 2)
    elif layout == "strided":  # last dim not contiguous: the backend copies
        q = randn(B, H, Nq, 2 * D, scale=1.5)[..., ::2]
        k = randn(B, Hkv, Nk, 2 * D, scale=1.5)[..., ::2]
        v = randn(B, Hkv, Nk, 2 * D)[..., ::2]
    else:
        q, k, v = randn(B, H, Nq, D, scale=1.5), randn(B, Hkv, Nk, D, scale=1.5), randn(B, Hkv, Nk, D)
    mask = torch.rand(B, Nk, generator=gen, device=DEVICE) < 0.9
    if masked_row and B > 1:
        mask[-1] = False
    segments = torch.unique(torch.tensor([0, min(77, Nk - 1), Nk // 2, Nk])).to(DEVICE)  # sorted, strictly increasing
    return q, k, v, dict(key_padding_mask=mask, segments=segments), gen


def _interventions(q, v, kwargs, gen):
    """Heterogeneous per-row interventions: knockouts (one segment, every segment), gates, bias, patches."""
    (B, H, Nq, _), Dv, G, dtype = q.shape, v.shape[3], kwargs["segments"].numel() - 1, q.dtype
    bias = torch.randn(B, H, G, generator=gen, device=DEVICE)
    bias[0, 0, 0] = -math.inf
    if H > 1:
        bias[0, 1, :] = -math.inf  # every segment knocked out: a fully masked (b, h)
    idx = torch.arange(B * H, device=DEVICE)
    return dict(
        logit_scale=torch.tensor([1.0, 0.5, 0.0, 2.0], device=DEVICE)[idx % 4].reshape(B, H),
        segment_bias=bias,
        head_gate=torch.tensor([1.0, 0.0, 0.5, -1.0], device=DEVICE)[idx % 4].reshape(B, H),
        out_bias=torch.randn(B, H, Dv, generator=gen, device=DEVICE),
        out_patch=torch.randn(B, H, Nq, Dv, generator=gen, device=DEVICE).to(dtype),
        patch_mask=(idx % 3 == 2).reshape(B, H),
    )


def _check(q, k, v, query_chunk=256, **kwargs):
    out, caps = probed_attention(q, k, v, backend=BACKEND, **kwargs)
    plan = build_plan(q, k, v, **kwargs)
    ref_out, ref_caps = reference_attention(plan, torch.float64, query_chunk=query_chunk)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert set(caps) == set(ref_caps)
    for name, ref in ref_caps.items():
        assert caps[name].dtype == torch.float32 and caps[name].shape == ref.shape, name
    assert_matches_reference({"out": out, **caps}, {"out": ref_out, **ref_caps}, q.dtype)
    return out, caps


@pytest.mark.parametrize(
    "N,D,dtype",
    [(1024, 64, torch.bfloat16), (1024, 128, torch.float16), (4096, 128, torch.bfloat16),
     (4096, 64, torch.float16), (8192, 64, torch.bfloat16), (8192, 128, torch.bfloat16),
     (8192, 128, torch.float16)],
)
def test_realistic_sizes_all_captures_and_interventions(N, D, dtype):
    q, k, v, kwargs, gen = _inputs(2, 2, 1, N, N, D, dtype)
    extra = _interventions(q, v, kwargs, gen)
    _check(q, k, v, capture=ALL, **kwargs, **extra)


@pytest.mark.parametrize("N,D,dtype", [(8192, 128, torch.bfloat16), (4096, 64, torch.float16)])
def test_realistic_sizes_plain(N, D, dtype):
    q, k, v, _, _ = _inputs(1, 4, 4, N, N, D, dtype)
    _check(q, k, v)


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 4096), (4096, 1), (1000, 3001), (3001, 1000), (63, 65), (65, 63)])
@pytest.mark.parametrize("D", [64, 128])
def test_ragged_and_single_token_lengths(Nq, Nk, D):
    q, k, v, kwargs, gen = _inputs(2, 4, 2, Nq, Nk, D, torch.bfloat16)
    extra = _interventions(q, v, kwargs, gen)
    _check(q, k, v, capture=ALL, **kwargs, **extra)


@pytest.mark.parametrize("layout", ["bnhd", "strided"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_non_contiguous_layouts(layout, dtype):
    q, k, v, kwargs, gen = _inputs(2, 4, 2, 300, 517, 64, dtype, layout=layout)
    extra = _interventions(q, v, kwargs, gen)
    extra["out_patch"] = extra["out_patch"].transpose(2, 3).contiguous().transpose(2, 3)  # strided patch
    _check(q, k, v, capture=ALL, **kwargs, **extra)


@pytest.mark.parametrize("capture", [(), ("key_mass",), ("entropy",), ("segment_mass",), ("lse", "key_mass")])
def test_capture_subsets(capture):
    # key_mass without lse uses a scratch lse; segment_mass alone exercises the segment path alone.
    q, k, v, kwargs, gen = _inputs(2, 4, 1, 700, 1300, 128, torch.bfloat16)
    _check(q, k, v, capture=capture, **kwargs)


def test_many_small_segments_and_row_params():
    q, k, v, _, gen = _inputs(3, 2, 2, 200, 640, 64, torch.float16)
    bounds = torch.arange(0, 641, 5, device=DEVICE)  # 128 segments, several per key tile
    G = bounds.numel() - 1
    bias = torch.randn(3, 2, G, generator=gen, device=DEVICE)
    bias[bias > 1.0] = -math.inf
    _check(q, k, v, segments=bounds, segment_bias=bias, capture=ALL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
def test_random_cases(dtype, D):
    for seed in range(20):
        case = make_case(seed, dtype=dtype, device=DEVICE, max_n=300, head_dims=(D,))
        check_against_reference(case, BACKEND)


def _flat(out, caps):
    return [out] + [caps[n] for n in sorted(caps)]


def _bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape and torch.equal(_bits(x), _bits(y))


def test_bitwise_determinism_large():
    q, k, v, kwargs, gen = _inputs(2, 4, 2, 4096, 4096, 128, torch.bfloat16)
    extra = _interventions(q, v, kwargs, gen)
    runs = [_flat(*probed_attention(q, k, v, backend=BACKEND, capture=ALL, **kwargs, **extra)) for _ in range(3)]
    _assert_bitwise(runs[0], runs[1])
    _assert_bitwise(runs[0], runs[2])


def test_batch_invariance_bitwise():
    B = 4
    q, k, v, kwargs, gen = _inputs(B, 4, 2, 2048, 2048, 64, torch.bfloat16)
    extra = _interventions(q, v, kwargs, gen)
    batch = _flat(*probed_attention(q, k, v, backend=BACKEND, capture=ALL, **kwargs, **extra))
    for b in range(B):
        row = slice(b, b + 1)
        single_kwargs = dict(kwargs, key_padding_mask=kwargs["key_padding_mask"][row])
        single_extra = {n: t[row] for n, t in extra.items()}
        single = _flat(*probed_attention(q[row], k[row], v[row], backend=BACKEND, capture=ALL,
                                         **single_kwargs, **single_extra))
        _assert_bitwise([t[row] for t in batch], single)


def test_cuda_graph_capture_and_replay():
    q, k, v, kwargs, gen = _inputs(2, 4, 2, 1024, 1024, 64, torch.bfloat16)
    extra = _interventions(q, v, kwargs, gen)

    def call():
        return probed_attention(q, k, v, backend=BACKEND, capture=ALL, **kwargs, **extra)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm the allocator outside the capture
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, static_caps = call()

    for seed in (1, 2):
        g = torch.Generator(device=DEVICE).manual_seed(seed)
        q.copy_(torch.randn(q.shape, generator=g, device=DEVICE))
        v.copy_(torch.randn(v.shape, generator=g, device=DEVICE))
        extra["head_gate"].copy_(torch.rand(extra["head_gate"].shape, generator=g, device=DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        eager = _flat(*call())
        _assert_bitwise(_flat(static_out, static_caps), eager)


def test_runs_on_a_side_stream():
    # The kernels go on torch's *current* stream, not the default one.
    q, k, v, kwargs, gen = _inputs(2, 2, 1, 512, 512, 64, torch.bfloat16)
    expected = _flat(*probed_attention(q, k, v, backend=BACKEND, capture=ALL, **kwargs))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = _flat(*probed_attention(q, k, v, backend=BACKEND, capture=ALL, **kwargs))
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    _assert_bitwise(expected, got)


def test_torch_compile_with_custom_op():
    q, k, v, kwargs, gen = _inputs(2, 4, 2, 512, 700, 64, torch.float16)
    extra = _interventions(q, v, kwargs, gen)

    def fn(q, k, v):
        out, caps = probed_attention(q, k, v, backend=BACKEND, capture=ALL, **kwargs, **extra)
        return out * 2.0, caps["entropy"] + 1.0, caps["key_mass"]

    compiled = torch.compile(fn, dynamic=False)
    expected = fn(q, k, v)
    got = compiled(q, k, v)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_opcheck_on_cuda():
    from latentflow_fast.ops.probed_attention import _probed_attention_op

    q, k, v, kwargs, gen = _inputs(2, 2, 1, 64, 80, 64, torch.bfloat16)
    extra = _interventions(q, v, kwargs, gen)
    plan = build_plan(q, k, v, capture=ALL, **kwargs, **extra)
    args = (plan.q, plan.k, plan.v, plan.key_padding_mask, plan.scale, plan.segments, plan.logit_scale,
            plan.segment_bias, plan.head_gate, plan.out_bias, plan.out_patch, plan.patch_mask,
            [True] * len(ALL), BACKEND)
    torch.library.opcheck(_probed_attention_op, args)


def test_dispatch_rule():
    q, k, v, kwargs, _ = _inputs(1, 2, 2, 64, 64, 64, torch.bfloat16)
    plan = build_plan(q, k, v, **kwargs)
    assert backend_cuda.supports(plan)
    assert backends.choose_backend(plan) in ("cuda", "triton")
    if unavailable_reason("triton") is not None:
        assert backends.choose_backend(plan) == "cuda"
    else:
        assert backends.choose_backend(plan) == backend_cuda.prefer(plan)
        # The table's rule until measurements change it: Triton on sm_90+, CUDA on sm_8x.
        expected = "triton" if torch.cuda.get_device_capability() >= (9, 0) else "cuda"
        assert backends.choose_backend(plan) == expected
    q32 = q.float()
    plan32 = build_plan(q32, k.float(), v.float())
    assert not backend_cuda.supports(plan32)
    assert backends.choose_backend(plan32) != "cuda"


@pytest.mark.parametrize("dtype,D,Dv", [(torch.float32, 64, 64), (torch.bfloat16, 80, 80), (torch.bfloat16, 64, 128)])
def test_unsupported_plans_raise_value_error(dtype, D, Dv):
    q = torch.randn(1, 2, 16, D, device=DEVICE, dtype=dtype)
    k = torch.randn(1, 2, 16, D, device=DEVICE, dtype=dtype)
    v = torch.randn(1, 2, 16, Dv, device=DEVICE, dtype=dtype)
    with pytest.raises(ValueError, match="cuda"):
        probed_attention(q, k, v, backend=BACKEND)


def test_key_mass_sums_to_live_queries():
    # Every query row with a live key distributes mass 1: sum_j key_mass = number of live (b, h, i) rows.
    q, k, v, kwargs, _ = _inputs(3, 2, 2, 777, 1234, 128, torch.float16)
    _, caps = probed_attention(q, k, v, backend=BACKEND, capture=("lse", "key_mass"), **kwargs)
    live = torch.isfinite(caps["lse"]).sum(dim=-1).float()
    torch.testing.assert_close(caps["key_mass"].sum(dim=-1), live, rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize("rows", backend_cuda.ROWS_PER_WARP_CHOICES)
@pytest.mark.parametrize(
    "N,D,dtype", [(4096, 128, torch.bfloat16), (2048, 64, torch.float16), (1000, 128, torch.float16), (129, 64, torch.bfloat16)]
)
def test_both_forward_tilings(monkeypatch, rows, N, D, dtype):
    # 16 rows per warp (64-row CTAs) and 32 (128-row CTAs; 32-key tiles at D=128), whatever the default here.
    monkeypatch.setenv(backend_cuda.ROWS_PER_WARP_ENV, str(rows))
    q, k, v, kwargs, gen = _inputs(2, 4, 2, N, N + 37, D, dtype)
    extra = _interventions(q, v, kwargs, gen)
    out, caps = _check(q, k, v, capture=ALL, **kwargs, **extra)
    again = _flat(*probed_attention(q, k, v, backend=BACKEND, capture=ALL, **kwargs, **extra))
    _assert_bitwise(_flat(out, caps), again)


# ---- query-dependent masks (causal, bottom-right causal, bool / additive attn_mask in every broadcast
# shape) with the other masks, interventions and captures; realistic sizes where the causal loop bound
# and the per-tile masks span many tiles.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_query_mask_random_cases(dtype):
    for seed in range(15):
        case = make_case(5000 + seed, dtype=dtype, device=DEVICE, max_n=300, head_dims=(64, 128), query_masks=True)
        check_against_reference(case, BACKEND)


@pytest.mark.parametrize("masks", ["causal", "bottom_right", "bool", "float"])
def test_query_masks_realistic_sizes(masks):
    q, k, v, kwargs, gen = _inputs(2, 4, 2, 3001, 4096, 128, torch.bfloat16)
    extra = _interventions(q, v, kwargs, gen)
    if masks in ("causal", "bottom_right"):
        extra["causal"] = True if masks == "causal" else "bottom_right"
    elif masks == "bool":
        extra["attn_mask"] = torch.rand(2, 1, 3001, 4096, generator=gen, device=DEVICE) < 0.5
    else:
        m = torch.randn(1, 4, 3001, 4096, generator=gen, device=DEVICE)
        extra["attn_mask"] = m.masked_fill(m < -1.5, float("-inf"))
    _check(q, k, v, capture=ALL, **kwargs, **extra)
