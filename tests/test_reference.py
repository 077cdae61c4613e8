"""The float64 oracle itself, against a naive per-(b, h, i) loop written straight from docs/design.md, section 2."""

from __future__ import annotations

import math

import pytest
import torch

from latentflow_fast.ops import CAPTURE_NAMES, build_plan, probed_attention
from latentflow_fast.ops.reference import reference_attention
from op_cases import make_case


def naive_attention(plan):
    """One loop iteration per (b, h, i), every formula of the contract written out in float64."""
    B, H, Nq, Nk, Dv = plan.batch, plan.heads, plan.num_queries, plan.num_keys, plan.value_dim
    group = H // plan.kv_heads
    bounds = plan.segments.tolist() if plan.segments is not None else None
    G = plan.num_segments
    out = torch.zeros(B, H, Nq, Dv, dtype=torch.float64)
    caps = {"lse": torch.zeros(B, H, Nq), "max": torch.zeros(B, H, Nq), "entropy": torch.zeros(B, H, Nq),
            "segment_mass": torch.zeros(B, H, Nq, G), "key_mass": torch.zeros(B, H, Nk)}
    caps = {n: t.double() for n, t in caps.items()}
    for b in range(B):
        for h in range(H):
            hk = h // group
            for i in range(Nq):
                s = []
                for j in range(Nk):
                    dot = float(plan.q[b, h, i].double() @ plan.k[b, hk, j].double())
                    x = plan.scale * dot
                    if plan.logit_scale is not None:
                        x *= float(plan.logit_scale[b, h])
                    if plan.segment_bias is not None:
                        g = max(n for n in range(G) if bounds[n] <= j)
                        x += float(plan.segment_bias[b, h, g])
                    if plan.key_padding_mask is not None and not plan.key_padding_mask[b, j]:
                        x = -math.inf
                    s.append(x)
                m = max(s)
                if m == -math.inf:
                    p = [0.0] * Nk
                    lse = -math.inf
                else:
                    z = sum(math.exp(x - m) for x in s)
                    lse = m + math.log(z)
                    p = [math.exp(x - lse) for x in s]
                o = sum(p[j] * plan.v[b, hk, j].double() for j in range(Nk))
                if plan.patch_mask is not None and plan.patch_mask[b, h]:
                    o = plan.out_patch[b, h, i].double()
                if plan.head_gate is not None:
                    o = o * float(plan.head_gate[b, h])
                if plan.out_bias is not None:
                    o = o + plan.out_bias[b, h].double()
                out[b, h, i] = o
                caps["lse"][b, h, i] = lse
                caps["max"][b, h, i] = m
                caps["entropy"][b, h, i] = -sum(x * math.log(x) for x in p if x > 0)
                for g in range(G):
                    caps["segment_mass"][b, h, i, g] = sum(p[bounds[g] : bounds[g + 1]])
                for j in range(Nk):
                    caps["key_mass"][b, h, j] += p[j]
    return out, {n: caps[n] for n in plan.capture}


@pytest.mark.parametrize("seed", range(12))
def test_reference_matches_naive_loop(seed):
    case = make_case(seed, torch.float64, max_n=9, head_dims=(1, 3, 5))
    plan = build_plan(case.q, case.k, case.v, **case.kwargs)
    out, caps = reference_attention(plan)
    naive_out, naive_caps = naive_attention(plan)
    torch.testing.assert_close(out, naive_out, rtol=1e-10, atol=1e-12)
    assert set(caps) == set(naive_caps)
    for name in caps:
        torch.testing.assert_close(caps[name], naive_caps[name], rtol=1e-10, atol=1e-12, msg=name)


def _qkv(B=2, H=2, N=7, D=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, N, D, generator=gen, dtype=torch.float64) for _ in range(3)]


def test_all_masked_rule():
    q, k, v = _qkv()
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0] = False
    out, caps = probed_attention(q, k, v, key_padding_mask=mask, segments=[0, 3, 7], capture=CAPTURE_NAMES,
                                 out_bias=torch.ones(2, 2, 4), backend="reference")
    assert torch.equal(out[0], torch.ones(2, 7, 4, dtype=torch.float64))
    assert torch.all(caps["lse"][0] == -math.inf) and torch.all(caps["max"][0] == -math.inf)
    assert torch.all(caps["entropy"][0] == 0) and torch.all(caps["segment_mass"][0] == 0)
    assert torch.all(caps["key_mass"][0] == 0)
    assert torch.all(torch.isfinite(caps["lse"][1]))


def test_logit_scale_zero_is_uniform():
    q, k, v = _qkv()
    mask = torch.tensor([[True] * 7, [True, False, True, True, False, True, True]])
    out, caps = probed_attention(q, k, v, key_padding_mask=mask, logit_scale=0.0, capture=("entropy", "key_mass"),
                                 backend="reference")
    for b in range(2):
        live = mask[b]
        torch.testing.assert_close(out[b], v[b][:, live].mean(1, keepdim=True).expand(2, 7, 4))
        torch.testing.assert_close(caps["entropy"][b], torch.full((2, 7), math.log(int(live.sum()))))
        torch.testing.assert_close(caps["key_mass"][b], (7 * live / live.sum()).float().expand(2, 7))


def test_segment_knockout():
    q, k, v = _qkv()
    bias = torch.tensor([0.0, -math.inf, 0.0], dtype=torch.float64)
    out, caps = probed_attention(q, k, v, segments=[0, 2, 5, 7], segment_bias=bias, capture=("segment_mass",),
                                 backend="reference")
    assert torch.all(caps["segment_mass"][..., 1] == 0)
    torch.testing.assert_close(caps["segment_mass"].sum(-1), torch.ones(2, 2, 7))
    keep = torch.tensor([0, 1, 5, 6])
    expected, _ = probed_attention(q, k[:, :, keep], v[:, :, keep], backend="reference")
    torch.testing.assert_close(out, expected)


def test_query_chunking_equals_no_chunking():
    case = make_case(7, torch.float64, max_n=40, captures=CAPTURE_NAMES)
    plan = build_plan(case.q, case.k, case.v, **case.kwargs)
    full_out, full_caps = reference_attention(plan)
    for chunk in (1, 3, 16):
        out, caps = reference_attention(plan, query_chunk=chunk)
        torch.testing.assert_close(out, full_out, rtol=1e-12, atol=1e-12)
        for name in full_caps:
            torch.testing.assert_close(caps[name], full_caps[name], rtol=1e-12, atol=1e-12)
