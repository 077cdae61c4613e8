"""The CUDA kernels' own source, run on the CPU by the host emulation in tests/cuda_emulator/, against
the float64 reference: fragment index math, boundary tiles, masks, segments, GQA, strides, every capture
and intervention, fully masked rows, batch invariance. Goes through backend_cuda.launch, i.e. the same
argument marshalling and the same pybind bindings as on a GPU.

What it cannot check (see cuda_emulation.h): the hardware's real MMA fragment layout (it encodes the
PTX ISA's), cp.async/timing races, speed. tests/gpu/test_cuda_gpu.py does that on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from op_cases import INTERVENTIONS, assert_matches_reference, make_case, reference_errors

from latentflow_fast.ops import CAPTURE_NAMES, build_plan
from latentflow_fast.ops import backend_cuda
from latentflow_fast.ops.reference import reference_attention

build_module = pytest.importorskip("cuda_emulator.build", reason="tests/cuda_emulator not importable")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def emu():
    if build_module.compiler() is None:
        pytest.skip("no host C++ compiler for the CUDA emulator")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_module.build()
    torch.set_num_threads(threads)  # no process-wide side effect left behind


@pytest.fixture(params=backend_cuda.ROWS_PER_WARP_CHOICES, ids=lambda r: f"rows{r}")
def rows(request):
    """Both forward tilings: 16 query rows per warp, and 32 (kM = 2 sub-tiles, 32-key tiles at D=128)."""
    return request.param


def _run_and_check(emu, plan, rows):
    out, caps = backend_cuda.launch(plan, emu, stream=0, device=0, rows=rows)
    ref_out, ref_caps = reference_attention(plan, torch.float64)
    assert out.dtype == plan.q.dtype and out.shape == ref_out.shape
    assert set(caps) == set(ref_caps)
    for name, ref in ref_caps.items():
        assert caps[name].dtype == torch.float32 and caps[name].shape == ref.shape, name
    assert_matches_reference({"out": out, **caps}, {"out": ref_out, **ref_caps}, plan.q.dtype)
    return out, caps


# Seeds alternate dtype and head dim; every 4th seed takes every intervention and capture.
@pytest.mark.parametrize("seed", range(4))
def test_random_cases_match_reference(emu, seed, rows):
    dtype = (torch.bfloat16, torch.float16)[seed % 2]
    head_dims = (128,) if seed % 3 == 0 else (64,)
    everything = seed % 4 == 0
    case = make_case(seed, dtype, max_n=150, head_dims=head_dims,
                     interventions=INTERVENTIONS if everything else None,
                     captures=CAPTURE_NAMES if everything else None)
    _run_and_check(emu, build_plan(case.q, case.k, case.v, **case.kwargs), rows)


def _inputs(B, H, Hkv, Nq, Nk, D, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, Nq, D, generator=gen) * 1.5).to(dtype)
    k = (torch.randn(B, Hkv, Nk, D, generator=gen) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, Nk, D, generator=gen).to(dtype)
    return q, k, v, gen


@pytest.mark.parametrize("D", [64, 128])
def test_tile_boundaries_segments_and_knockouts(emu, rows, D):
    # Nq one past a 64-row tile (and past 128 at D=128 below), Nk past a 64-key tile; segments that end exactly on, just before and just after tile edges;
    # one segment knocked out everywhere, one (b, h) with every segment knocked out; a fully masked batch row.
    q, k, v, gen = _inputs(2, 2, 1, 65 if D == 64 else 129, 129, D, torch.bfloat16)
    segments = [0, 1, 31, 32, 63, 64, 65, 128, 129]
    G = len(segments) - 1
    bias = torch.randn(2, 2, G, generator=gen)
    bias[:, :, 3] = -math.inf
    bias[0, 1, :] = -math.inf
    mask = torch.rand(2, 129, generator=gen) < 0.85
    mask[1] = False
    plan = build_plan(q, k, v, key_padding_mask=mask, segments=segments, segment_bias=bias,
                      logit_scale=torch.tensor([[1.0, 0.0], [2.0, 0.5]]), capture=CAPTURE_NAMES)
    out, caps = _run_and_check(emu, plan, rows)
    # Contract for rows with every logit -inf: p = 0, lse = max = -inf, entropy 0.
    for dead in (caps["lse"][1], caps["lse"][0, 1]):
        assert torch.isneginf(dead).all()
    assert (caps["entropy"][1] == 0).all() and (caps["segment_mass"][1] == 0).all()
    assert (out[1] == 0).all() and (caps["key_mass"][1] == 0).all()


def test_gqa_patch_gate_bias_and_strided_inputs(emu, rows):
    B, H, Hkv, Nq, Nk, D = 2, 4, 2, 70, 90, 128
    q, k, v, gen = _inputs(B, H, Hkv, Nq, Nk, D, torch.float16)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] storage: read in place
    wide = torch.zeros(B, Hkv, Nk, 2 * D, dtype=v.dtype)
    wide[..., ::2] = v
    v = wide[..., ::2]  # last dim strided: the backend copies
    patch = torch.randn(B, H, D, Nq, generator=gen).to(q.dtype).transpose(2, 3)  # strided out_patch
    plan = build_plan(q, k, v, segments=[0, 30, 90], head_gate=torch.tensor([[1.0, 0.0, -0.5, 2.0]] * 2),
                      out_bias=torch.randn(B, H, D, generator=gen), out_patch=patch,
                      patch_mask=torch.tensor([[True, False, False, True], [False, True, False, False]]),
                      capture=("entropy", "key_mass", "segment_mass"))
    _run_and_check(emu, plan, rows)


def test_batch_invariance_bitwise(emu, rows):
    B = 3
    q, k, v, gen = _inputs(B, 2, 2, 40, 100, 64, torch.bfloat16, seed=3)
    mask = torch.rand(B, 100, generator=gen) < 0.7
    extra = dict(logit_scale=torch.rand(B, 2, generator=gen) * 2, segment_bias=torch.randn(B, 2, 2, generator=gen),
                 head_gate=torch.rand(B, 2, generator=gen), out_bias=torch.randn(B, 2, 64, generator=gen))
    plan = build_plan(q, k, v, key_padding_mask=mask, segments=[0, 50, 100], capture=CAPTURE_NAMES, **extra)
    out, caps = backend_cuda.launch(plan, emu, stream=0, device=0, rows=rows)
    for b in range(B):
        row = slice(b, b + 1)
        single = build_plan(q[row], k[row], v[row], key_padding_mask=mask[row], segments=[0, 50, 100],
                            capture=CAPTURE_NAMES, **{n: t[row] for n, t in extra.items()})
        out_b, caps_b = backend_cuda.launch(single, emu, stream=0, device=0, rows=rows)
        assert torch.equal(out[row].view(torch.int16), out_b.view(torch.int16))
        for name in caps:
            assert torch.equal(caps[name][row].view(torch.int32), caps_b[name].view(torch.int32)), name


# Planted bugs the strict emulator must catch (tests/cuda_emulator/cuda_emulation.h): each is a real
# hazard on the GPU that a lenient emulation (synchronous cp.async, zeroed shared memory, no race
# shadow) passes.
MUTANTS = {
    # Retiring too few copy groups: the current K/V tile may still be in flight when it is read.
    "wait_group_2": ({"probed_attention.cu": [("      cp_async_wait<1>();", "      cp_async_wait<2>();")]},
                     "wrong"),
    # No barrier between the last reads of a buffer (and of bias_s) and the next tile's writes into it.
    "missing_trailing_syncthreads": (
        {"probed_attention.cu": [("    __syncthreads();  // all warps are done with this buffer and bias_s before "
                                  "they are overwritten\n", "")]},
        "race"),
    # Same in the key_mass pass (its Q double buffer and lse tiles).
    "key_mass_missing_trailing_syncthreads": (
        {"probed_attention_key_mass.cu": [("    __syncthreads();  // all warps are done with this buffer before it "
                                           "is overwritten\n", "")]},
        "race"),
}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_emulator_catches_planted_bug(name):
    if build_module.compiler() is None:
        pytest.skip("no host C++ compiler for the CUDA emulator")
    mutations, expected = MUTANTS[name]
    mutant = build_module.build(mutations=mutations, module_name=f"latentflow_cuda_emu_{name}")
    # Several key and query tiles, so that the double buffers are reused.
    q, k, v, gen = _inputs(1, 1, 1, 130, 200, 64, torch.bfloat16, seed=5)
    plan = build_plan(q, k, v, segments=[0, 70, 200], capture=("lse", "segment_mass", "key_mass"))
    try:
        out, caps = backend_cuda.launch(plan, mutant, stream=0, device=0, rows=16)
    except RuntimeError as exc:
        assert expected == "race" and "shared-memory race" in str(exc), str(exc)
        return
    assert expected == "wrong", f"mutant {name} ran without the race being reported"
    ref_out, ref_caps = reference_attention(plan, torch.float64)
    outputs, refs = {"out": out, **caps}, {"out": ref_out, **ref_caps}
    failures = [f for n in refs for f in reference_errors(n, outputs[n], refs[n], torch.bfloat16)]
    assert failures, f"mutant {name} matched the reference"


def test_launch_puts_back_the_callers_current_device(emu):
    """The launcher makes the tensors' device current for the launch and restores the caller's (a
    device guard), in the emulated runtime's per-thread current device."""
    q, k, v, _ = _inputs(1, 2, 2, 20, 20, 64, torch.float16)
    plan = build_plan(q, k, v, capture=("entropy", "key_mass"))
    try:
        emu._emu_set_current_device(1)
        calls = emu._emu_set_device_calls()
        backend_cuda.launch(plan, emu, stream=0, device=0)
        assert emu._emu_current_device() == 1  # put back
        switches = emu._emu_set_device_calls() - calls
        assert switches >= 2 and switches % 2 == 0  # to device 0 and back, per launch
        emu._emu_set_current_device(0)
        calls = emu._emu_set_device_calls()
        backend_cuda.launch(plan, emu, stream=0, device=0)
        assert emu._emu_set_device_calls() == calls and emu._emu_current_device() == 0  # nothing to switch
    finally:
        emu._emu_set_current_device(0)


def test_one_segment_per_key(emu, rows):
    # G = Nk (one segment per text token at cross-attention sites, one per time bin at self-attention
    # sites): every key tile holds up to 64 segment ends.
    q, k, v, gen = _inputs(1, 2, 1, 40, 70, 64, torch.bfloat16, seed=7)
    bias = torch.randn(1, 2, 70, generator=gen)
    bias[0, 0, ::3] = -math.inf
    plan = build_plan(q, k, v, segments=list(range(71)), segment_bias=bias, capture=CAPTURE_NAMES)
    _run_and_check(emu, plan, rows)


# ---- query-dependent masks: causal (loop cut at the diagonal, key_mass starting at the first query
# tile that sees the keys), bool and additive attn_mask in every broadcast shape, with key padding,
# segments the cut loop never reaches, interventions and every capture.
@pytest.mark.parametrize("seed", range(2))
def test_query_mask_random_cases_match_reference(emu, seed, rows):
    dtype = (torch.bfloat16, torch.float16)[seed % 2]
    case = make_case(4000 + seed, dtype, max_n=150, head_dims=(64,), query_masks=True,
                     interventions=INTERVENTIONS if seed == 0 else None, captures=CAPTURE_NAMES)
    _run_and_check(emu, build_plan(case.q, case.k, case.v, **case.kwargs), rows)


@pytest.mark.parametrize("masks", ["causal", "bottom_right", "bool", "float"])
def test_query_masks_tiles_segments_and_dead_rows(emu, rows, masks):
    # Nq = 200 spans several CTAs, Nk = 150 three key tiles; segments end before, on and after the tiles
    # the causal loop visits; bottom-right with Nq > Nk leaves the first 50 queries without a key.
    q, k, v, gen = _inputs(2, 2, 1, 200, 150, 64, torch.bfloat16, seed=11)
    kwargs = {"causal": True} if masks == "causal" else {"causal": "bottom_right"} if masks == "bottom_right" else {}
    if masks == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, 200, 150, generator=gen) < 0.6
        kwargs["attn_mask"][1, 0, 17] = False
    elif masks == "float":
        m = torch.randn(1, 2, 200, 150, generator=gen)
        m[0, 1, 5] = -math.inf
        m[torch.rand(m.shape, generator=gen) < 0.2] = -math.inf
        kwargs["attn_mask"] = m
    mask = torch.rand(2, 150, generator=gen) < 0.9
    plan = build_plan(q, k, v, key_padding_mask=mask, segments=[0, 10, 63, 64, 100, 140, 150], capture=CAPTURE_NAMES,
                      segment_bias=torch.randn(2, 2, 6, generator=gen), **kwargs)
    out, caps = _run_and_check(emu, plan, rows)
    if masks == "bottom_right":
        assert torch.isneginf(caps["lse"][:, :, :50]).all() and (out[:, :, :50] == 0).all()


def test_query_masks_batch_invariance_bitwise(emu, rows):
    B = 3
    q, k, v, gen = _inputs(B, 1, 1, 90, 100, 64, torch.float16, seed=12)
    boolm = torch.rand(B, 1, 90, 100, generator=gen) < 0.7
    for kwargs in ({"causal": True}, {"attn_mask": boolm}):
        plan = build_plan(q, k, v, segments=[0, 50, 100], capture=CAPTURE_NAMES, **kwargs)
        out, caps = backend_cuda.launch(plan, emu, stream=0, device=0, rows=rows)
        for b in range(B):
            row = slice(b, b + 1)
            single = build_plan(q[row], k[row], v[row], segments=[0, 50, 100], capture=CAPTURE_NAMES,
                                **{n: (t[row] if torch.is_tensor(t) else t) for n, t in kwargs.items()})
            out_b, caps_b = backend_cuda.launch(single, emu, stream=0, device=0, rows=rows)
            assert torch.equal(out[row].view(torch.int16), out_b.view(torch.int16)), kwargs
            for name in caps:
                assert torch.equal(caps[name][row].view(torch.int32), caps_b[name].view(torch.int32)), (name, kwargs)
