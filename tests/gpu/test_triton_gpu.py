"""The Triton backend on a real GPU: realistic sizes vs the float64 reference, bitwise determinism and
batch invariance, CUDA-graph capture/replay, torch.compile through the custom op, torch.library.opcheck.

Skipped without CUDA (see conftest.py). Run with tests/gpu/run_all.sh.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from op_cases import assert_matches_reference, check_against_reference, make_case  # noqa: E402

from latentflow_fast.ops import CAPTURE_NAMES, build_plan, probed_attention  # noqa: E402
from latentflow_fast.ops.reference import reference_attention  # noqa: E402

DEVICE = "cuda"
ALL = CAPTURE_NAMES


def _inputs(B, H, Hkv, Nq, Nk, D, dtype, Dv=None, seed=0, masked_row=True):
    """Random q/k/v, a key mask (one fully masked row), SAM-Audio-like segments (text prefix + audio)."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    Dv = Dv or D

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)

    q, k, v = randn(B, H, Nq, D, scale=1.5), randn(B, Hkv, Nk, D, scale=1.5), randn(B, Hkv, Nk, Dv)
    mask = torch.rand(B, Nk, generator=gen, device=DEVICE) < 0.9
    if masked_row and B > 1:
        mask[-1] = False
    segments = torch.tensor(sorted({0, min(77, Nk - 1), Nk // 2, Nk}), device=DEVICE)
    return q, k, v, dict(key_padding_mask=mask, segments=segments), gen


def _interventions(q, v, kwargs, gen):
    """Heterogeneous per-row interventions: knockouts (one segment, every segment), gates, bias, patches."""
    (B, H, Nq, _), Dv, G, dtype = q.shape, v.shape[3], kwargs["segments"].numel() - 1, q.dtype
    bias = torch.randn(B, H, G, generator=gen, device=DEVICE)
    bias[0, 0, 0] = -math.inf
    if H > 1:
        bias[0, 1, :] = -math.inf
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
    out, caps = probed_attention(q, k, v, backend="triton", **kwargs)
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


@pytest.mark.parametrize("D", [32, 48, 80, 96, 256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_other_head_dims(D, dtype):
    q, k, v, kwargs, gen = _inputs(2, 4, 2, 333, 517, D, dtype, Dv=D if D != 48 else 64)
    extra = _interventions(q, v, kwargs, gen)
    _check(q, k, v, capture=ALL, **kwargs, **extra)


@pytest.mark.parametrize("Nq,Nk", [(1, 1), (1, 4096), (4096, 1), (1000, 3001), (3001, 1000)])
def test_unequal_and_single_token_lengths(Nq, Nk):
    q, k, v, kwargs, _ = _inputs(2, 2, 1, Nq, Nk, 128, torch.bfloat16)
    _check(q, k, v, capture=ALL, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_random_cases(dtype):
    for seed in range(25):
        case = make_case(seed, dtype=dtype, device=DEVICE, max_n=300, head_dims=(16, 32, 33, 64, 96, 128))
        check_against_reference(case, "triton")


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
    runs = [_flat(*probed_attention(q, k, v, backend="triton", capture=ALL, **kwargs, **extra)) for _ in range(3)]
    _assert_bitwise(runs[0], runs[1])
    _assert_bitwise(runs[0], runs[2])


def test_batch_invariance_bitwise():
    B = 4
    q, k, v, kwargs, gen = _inputs(B, 4, 2, 2048, 2048, 64, torch.bfloat16)
    extra = _interventions(q, v, kwargs, gen)
    batch = _flat(*probed_attention(q, k, v, backend="triton", capture=ALL, **kwargs, **extra))
    for b in range(B):
        row = slice(b, b + 1)
        single_kwargs = dict(kwargs, key_padding_mask=kwargs["key_padding_mask"][row])
        single_extra = {n: t[row] for n, t in extra.items()}
        single = _flat(*probed_attention(q[row], k[row], v[row], backend="triton", capture=ALL,
                                         **single_kwargs, **single_extra))
        _assert_bitwise([t[row] for t in batch], single)


def test_cuda_graph_capture_and_replay():
    q, k, v, kwargs, gen = _inputs(2, 4, 2, 1024, 1024, 64, torch.bfloat16)
    extra = _interventions(q, v, kwargs, gen)

    def call():
        return probed_attention(q, k, v, backend="triton", capture=ALL, **kwargs, **extra)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # compile the kernels and warm the allocator outside the capture
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


def test_torch_compile_with_custom_op():
    q, k, v, kwargs, gen = _inputs(2, 4, 2, 512, 700, 64, torch.float16)
    extra = _interventions(q, v, kwargs, gen)

    def fn(q, k, v):
        out, caps = probed_attention(q, k, v, backend="triton", capture=ALL, **kwargs, **extra)
        return out * 2.0, caps["entropy"] + 1.0

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
            [True] * len(ALL), "triton")
    torch.library.opcheck(_probed_attention_op, args)


# ---- query-dependent masks (causal, bottom-right causal, bool / additive attn_mask in every broadcast
# shape) with the other masks, interventions and captures; realistic sizes where the causal loop bound
# and the per-tile masks span many tiles.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_query_mask_random_cases(dtype):
    for seed in range(15):
        case = make_case(5000 + seed, dtype=dtype, device=DEVICE, max_n=300, head_dims=(16, 32, 33, 64, 96, 128), query_masks=True)
        check_against_reference(case, "triton")


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
