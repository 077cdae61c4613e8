"""The Triton kernels under Triton's CPU interpreter, against the float64 reference.

Triton decides at decoration time whether a kernel is interpreted (TRITON_INTERPRET=1), so the checks
run in ONE subprocess started with that variable set: this file is also the worker script
(`python tests/test_triton_interpreter.py --worker results.json`). The pytest process never imports
Triton with the interpreter on, so other test files that import Triton normally are unaffected.
Each check becomes its own pytest test that reports the worker's verdict.

Interpreter limits: tl.dot on bfloat16 is wrong there, so kernels are checked in
float32 (tolerance 1e-5) and float16 (2e-2); bfloat16 is covered by tests/gpu.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHECKS: dict = {}  # name -> function (worker side)


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------------------------- worker


def _torch():
    import torch

    return torch


def _base(seed=0, B=2, H=4, Hkv=2, Nq=45, Nk=77, D=16, Dv=None, dtype=None, masked_row=True):
    """GQA, several query and key blocks (interpreter tiles are 32), a key mask with one all-False row."""
    torch = _torch()
    dtype = dtype or torch.float32
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = (torch.randn(B, H, Nq, D, generator=gen) * 1.5).to(dtype)
    k = (torch.randn(B, Hkv, Nk, D, generator=gen) * 1.5).to(dtype)
    v = torch.randn(B, Hkv, Nk, Dv, generator=gen).to(dtype)
    mask = torch.rand(B, Nk, generator=gen) < 0.8
    if masked_row:
        mask[B - 1] = False
    # Boundaries inside key blocks 0 and 1 (both segment-mass paths); block 2 lies in one segment.
    kwargs = dict(key_padding_mask=mask, segments=[0, 5, 40, Nk])
    return q, k, v, kwargs, gen


def _interventions(B, H, Nq, Dv, gen, dtype):
    torch = _torch()
    bias = torch.randn(B, H, 3, generator=gen)
    bias[0, 0, 1] = -math.inf            # knock one segment out
    bias[0, 1, :] = -math.inf            # knock every segment out: an all -inf row
    return {
        "logit_scale": torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.arange(B * H) % 4].reshape(B, H),
        "segment_bias": bias,
        "head_gate": torch.tensor([1.0, 0.0, 0.5, -2.0])[torch.arange(B * H) % 4].reshape(B, H),
        "out_bias": torch.randn(B, H, Dv, generator=gen),
        "out_patch": torch.randn(B, H, Nq, Dv, generator=gen).to(dtype),
        "patch_mask": (torch.arange(B * H) % 3 == 0).reshape(B, H),
    }


def _compare(q, k, v, fwd_config=None, km_config=None, **kwargs):
    """Run the triton backend and the float64 reference; assert every output passes the norm and per-row
    max-abs checks (op_cases.assert_matches_reference)."""
    torch = _torch()
    from op_cases import assert_matches_reference

    from latentflow_fast.ops import build_plan
    from latentflow_fast.ops import backend_triton
    from latentflow_fast.ops.reference import reference_attention

    plan = build_plan(q, k, v, **kwargs)
    if fwd_config or km_config:
        out, caps = backend_triton.run(plan, fwd_config, km_config)
    else:
        from latentflow_fast.ops import probed_attention

        out, caps = probed_attention(q, k, v, backend="triton", **kwargs)
    ref_out, ref_caps = reference_attention(plan, torch.float64)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert set(caps) == set(ref_caps), (sorted(caps), sorted(ref_caps))
    for name, ref in ref_caps.items():
        assert caps[name].dtype == torch.float32 and caps[name].shape == ref.shape, name
    assert_matches_reference({"out": out, **caps}, {"out": ref_out, **ref_caps}, q.dtype)
    return out, caps


ALL = ("lse", "max", "entropy", "segment_mass", "key_mass")


def _make_capture_check(name):
    def fn():
        q, k, v, kwargs, _ = _base(seed=1)
        _compare(q, k, v, capture=(name,), **kwargs)

    fn.__name__ = f"capture_{name}"
    return check(fn)


def _make_intervention_check(name):
    def fn():
        q, k, v, kwargs, gen = _base(seed=2)
        extra = _interventions(q.shape[0], q.shape[1], q.shape[2], v.shape[3], gen, q.dtype)
        chosen = {name: extra[name]}
        if name == "out_patch":
            chosen["patch_mask"] = extra["patch_mask"]
        _compare(q, k, v, capture=ALL, **kwargs, **chosen)

    fn.__name__ = f"intervention_{name}"
    return check(fn)


for _name in ALL:
    _make_capture_check(_name)
for _name in ("logit_scale", "segment_bias", "head_gate", "out_bias", "out_patch"):
    _make_intervention_check(_name)


@check
def everything_combined():
    q, k, v, kwargs, gen = _base(seed=3, B=3, H=4, Hkv=1)
    extra = _interventions(3, 4, q.shape[2], v.shape[3], gen, q.dtype)
    _compare(q, k, v, capture=ALL, **kwargs, **extra)


@check
def everything_combined_float16():
    torch = _torch()
    q, k, v, kwargs, gen = _base(seed=4, dtype=torch.float16)
    extra = _interventions(2, 4, q.shape[2], v.shape[3], gen, q.dtype)
    _compare(q, k, v, capture=ALL, **kwargs, **extra)


@check
def no_capture_no_intervention():
    q, k, v, _, _ = _base(seed=5)
    _compare(q, k, v)


@check
def random_cases_float32():
    """The shared differential harness: random shapes, masks, layouts, interventions, captures."""
    from op_cases import check_against_reference, make_case

    for seed in range(40):
        check_against_reference(make_case(seed), "triton")


@check
def random_cases_float16():
    torch = _torch()
    from op_cases import check_against_reference, make_case

    for seed in range(100, 110):
        check_against_reference(make_case(seed, dtype=torch.float16), "triton")


@check
def odd_head_dims():
    for D, Dv in ((33, 33), (33, 20), (1, 5), (100, 48), (24, 64)):
        q, k, v, kwargs, gen = _base(seed=6, B=1, H=2, Hkv=1, Nq=20, Nk=50, D=D, Dv=Dv)
        kwargs["segments"] = [0, 5, 40, 50]
        extra = _interventions(1, 2, 20, Dv, gen, q.dtype)
        _compare(q, k, v, capture=ALL, **kwargs, **extra)


@check
def single_tokens():
    for Nq, Nk in ((1, 1), (1, 70), (70, 1), (33, 32), (32, 33)):
        q, k, v, _, _ = _base(seed=7, Nq=Nq, Nk=Nk, masked_row=False)
        segments = [0, Nk] if Nk < 3 else [0, 1, Nk]
        _compare(q, k, v, segments=segments, capture=ALL)


@check
def noncontiguous_inputs():
    torch = _torch()
    q, k, v, kwargs, gen = _base(seed=8)
    extra = _interventions(2, 4, q.shape[2], v.shape[3], gen, q.dtype)
    q = q.transpose(1, 2).contiguous().transpose(1, 2)           # [B, N, H, D] storage
    k_wide = torch.zeros(*k.shape[:-1], k.shape[-1] * 2)
    k_wide[..., ::2] = k
    k = k_wide[..., ::2]                                           # stride 2 along D
    v = v.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)   # [N, B, H, D] storage
    extra["out_patch"] = extra["out_patch"].transpose(2, 3).contiguous().transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous() or extra["out_patch"].is_contiguous())
    _compare(q, k, v, capture=ALL, **kwargs, **extra)


@check
def fully_masked_rows():
    """p = 0: out = gate * 0 + bias exactly, lse = max = -inf, entropy = 0, segment/key mass 0."""
    torch = _torch()
    q, k, v, kwargs, gen = _base(seed=9)
    gate = torch.tensor([[1.0, 2.0, 0.5, 0.0], [3.0, 1.0, -1.0, 0.25]])
    bias = torch.randn(2, 4, v.shape[3], generator=gen)
    out, caps = _compare(q, k, v, capture=ALL, head_gate=gate, out_bias=bias, **kwargs)
    assert torch.equal(out[1], bias[1][:, None, :].expand_as(out[1]))
    assert torch.equal(caps["lse"][1], torch.full_like(caps["lse"][1], -math.inf))
    assert torch.equal(caps["max"][1], torch.full_like(caps["max"][1], -math.inf))
    assert torch.equal(caps["entropy"][1], torch.zeros_like(caps["entropy"][1]))
    assert torch.equal(caps["segment_mass"][1], torch.zeros_like(caps["segment_mass"][1]))
    assert torch.equal(caps["key_mass"][1], torch.zeros_like(caps["key_mass"][1]))
    masked_keys = ~kwargs["key_padding_mask"][0]
    assert torch.equal(caps["key_mass"][0][:, masked_keys], torch.zeros_like(caps["key_mass"][0][:, masked_keys]))


@check
def uniform_attention_at_zero_logit_scale():
    """logit_scale 0 = uniform over unmasked keys: entropy log(n), key_mass Nq/n per live key."""
    torch = _torch()
    q, k, v, kwargs, _ = _base(seed=10, masked_row=False)
    out, caps = _compare(q, k, v, capture=ALL, logit_scale=0.0, **kwargs)
    live = kwargs["key_padding_mask"].sum(1).double()
    expected = torch.log(live)[:, None, None].expand(caps["entropy"].shape)
    assert torch.allclose(caps["entropy"].double(), expected, rtol=1e-6, atol=0)


@check
def block_sizes_all_match_reference():
    from latentflow_fast.ops.backend_triton import BlockConfig

    q, k, v, kwargs, gen = _base(seed=11)
    extra = _interventions(2, 4, q.shape[2], v.shape[3], gen, q.dtype)
    for fwd, km in ((BlockConfig(16, 16, 1, 1), BlockConfig(16, 16, 1, 1)),
                    (BlockConfig(64, 16, 1, 1), BlockConfig(16, 64, 1, 1)),
                    (BlockConfig(16, 128, 1, 1), BlockConfig(64, 32, 1, 1))):
        _compare(q, k, v, fwd_config=fwd, km_config=km, capture=ALL, **kwargs, **extra)


@check
def tma_variant_matches_reference():
    """The Hopper variant (K/V tiles through tensor descriptors, USE_TMA) computes the same function:
    ragged key blocks and a padded head dim arrive zero-filled from the descriptor."""
    from latentflow_fast.ops import build_plan
    from latentflow_fast.ops.backend_triton import BlockConfig, build_launches, _outputs

    for D, Dv in ((16, 16), (20, 24)):
        q, k, v, kwargs, gen = _base(seed=17, D=D, Dv=Dv)
        extra = _interventions(2, 4, q.shape[2], v.shape[3], gen, q.dtype)
        tma = BlockConfig(32, 32, 1, 1, tma=True)
        plan = build_plan(q, k, v, capture=ALL, **kwargs, **extra)
        assert build_launches(plan, _outputs(plan), tma)[0].meta["USE_TMA"]
        _compare(q, k, v, fwd_config=tma, km_config=BlockConfig(32, 32, 1, 1), capture=ALL, **kwargs, **extra)


@check
def patched_heads_skip_attention():
    """A patched head with no capture requested skips the key loop and returns gate * patch + bias."""
    torch = _torch()
    from latentflow_fast.ops import probed_attention

    q, k, v, kwargs, gen = _base(seed=12)
    extra = _interventions(2, 4, q.shape[2], v.shape[3], gen, q.dtype)
    out, _ = probed_attention(q, k, v, backend="triton", **kwargs, **extra)
    _compare(q, k, v, **kwargs, **extra)
    pm = extra["patch_mask"]
    expected = extra["out_patch"] * extra["head_gate"][:, :, None, None] + extra["out_bias"][:, :, None, :]
    assert torch.allclose(out[pm], expected[pm], rtol=1e-6, atol=1e-6)


def _run_all(q, k, v, **kwargs):
    from latentflow_fast.ops import probed_attention

    out, caps = probed_attention(q, k, v, backend="triton", **kwargs)
    return [out] + [caps[n] for n in sorted(caps)]


def _bitwise_equal(a, b):
    torch = _torch()
    return len(a) == len(b) and all(x.shape == y.shape and torch.equal(
        x.view(torch.int32) if x.dtype == torch.float32 else x, y.view(torch.int32) if y.dtype == torch.float32 else y)
        for x, y in zip(a, b))


@check
def bitwise_determinism():
    q, k, v, kwargs, gen = _base(seed=13)
    extra = _interventions(2, 4, q.shape[2], v.shape[3], gen, q.dtype)
    first = _run_all(q, k, v, capture=ALL, **kwargs, **extra)
    second = _run_all(q.clone(), k.clone(), v.clone(), capture=ALL, **kwargs, **extra)
    assert _bitwise_equal(first, second)


@check
def output_bits_do_not_depend_on_captures():
    """Asking for statistics never perturbs the output: same tiles, same order, same bits."""
    torch = _torch()
    from latentflow_fast.ops import probed_attention

    q, k, v, kwargs, gen = _base(seed=15)
    extra = _interventions(2, 4, q.shape[2], v.shape[3], gen, q.dtype)
    extra.pop("out_patch"), extra.pop("patch_mask")
    plain, _ = probed_attention(q, k, v, backend="triton", **kwargs, **extra)
    for capture in (("lse",), ("entropy", "segment_mass"), ALL):
        out, _ = probed_attention(q, k, v, backend="triton", capture=capture, **kwargs, **extra)
        assert torch.equal(out.view(torch.int32), plain.view(torch.int32)), capture


@check
def batch_invariance():
    """Row b of a heterogeneous batch is bitwise the result of running row b alone."""
    q, k, v, kwargs, gen = _base(seed=14, B=3)
    extra = _interventions(3, 4, q.shape[2], v.shape[3], gen, q.dtype)
    batch = _run_all(q, k, v, capture=ALL, **kwargs, **extra)
    for b in range(3):
        row = slice(b, b + 1)
        single_kwargs = dict(kwargs, key_padding_mask=kwargs["key_padding_mask"][row])
        single_extra = {n: t[row] for n, t in extra.items()}
        single = _run_all(q[row], k[row], v[row], capture=ALL, **single_kwargs, **single_extra)
        assert _bitwise_equal([t[row] for t in batch], single), f"row {b} differs"


@check
def many_segments_one_per_key():
    """G = Nk (one segment per key: every key block straddles BLOCK_N boundaries) and G between, with
    segment bias: the segment masses live in the output, so any G works."""
    torch = _torch()
    q, k, v, kwargs, gen = _base(seed=16, B=2, H=2, Hkv=1, Nq=20, Nk=70)
    for segments in (list(range(71)), [0, 1, 2, 3, 31, 32, 33, 64, 65, 70]):
        G = len(segments) - 1
        bias = torch.randn(2, 2, G, generator=gen)
        bias[0, 0, ::3] = -math.inf
        _compare(q, k, v, key_padding_mask=kwargs["key_padding_mask"], segments=segments, segment_bias=bias,
                 capture=ALL)


@check
def row_offsets_are_64_bit():
    """Tile bases are start * stride in 64-bit when the launcher says WIDE: packed QKV rows (stride
    3 * 16 * 128) at N = 350k pass 2^31; the launcher says WIDE for such a tensor."""
    torch = _torch()
    import triton
    import triton.language as tl

    from latentflow_fast.ops.backend_triton import _kernels

    global _row_offset  # the kernel below resolves it as a module global
    _row_offset = _kernels()._row_offset

    @triton.jit
    def offsets(Out, start, stride, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(Out + i, _row_offset(start, stride, True) + i)

    out = torch.zeros(4, dtype=torch.int64)
    start, stride = 350_000, 3 * 16 * 128
    offsets[(1,)](out, start, stride, BLOCK=4)
    expected = torch.arange(4, dtype=torch.int64) + start * stride
    assert start * stride > 2**31 and torch.equal(out, expected), (out, expected)

    from latentflow_fast.ops.backend_triton import _max_offset

    packed = torch.empty_strided((1, 16, 350_000, 128), (0, 128, stride, 1), device="meta")  # q of packed QKV
    short = torch.empty_strided((1, 16, 1000, 128), (0, 128, stride, 1), device="meta")
    assert _max_offset(packed) >= 2**31 > _max_offset(short)


@check
def registry_accepts_cpu_under_interpreter():
    from latentflow_fast.ops import backends

    assert backends.unavailable_reason("triton", "cpu") is None
    assert "triton" in backends.available_backends("cpu")


def _backward_case(triton_backward_expected, masked_row, gate_and_patch):
    """Gradients of out and the captures lse / entropy / segment_mass / key_mass through the Triton forward +
    Triton backward, against the torch backward of the float64 reference (itself gradchecked in
    tests/test_probe_gradients.py). Several query and key blocks (interpreter tiles are 16), GQA, a padded
    head dim (D = 12), a knocked-out segment, an all -inf row and an all-masked batch row."""
    torch = _torch()
    from latentflow_fast.ops import autograd as op_autograd
    from latentflow_fast.ops import probed_attention

    q, k, v, kwargs, gen = _base(seed=5, Nq=37, Nk=41, D=12, masked_row=masked_row)
    B, H = q.shape[:2]
    extra = _interventions(B, H, q.shape[2], v.shape[3], gen, q.dtype)
    params = {"q": q, "k": k, "v": v, "logit_scale": extra["logit_scale"] + 0.25, "segment_bias": extra["segment_bias"]}
    if gate_and_patch:
        params.update(head_gate=extra["head_gate"], out_bias=extra["out_bias"], out_patch=extra["out_patch"])
        kwargs = dict(kwargs, patch_mask=extra["patch_mask"])
    caps = ("lse", "entropy", "segment_mass", "key_mass")
    used = []
    original = op_autograd._use_triton
    op_autograd._use_triton = lambda *a: used.append(original(*a)) or used[-1]
    try:
        results = {}
        for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
            leaves = {n: t.detach().to(dtype if n in ("q", "k", "v", "out_patch") else torch.float32).requires_grad_()
                      for n, t in params.items()}
            args = {n: t for n, t in leaves.items() if n not in ("q", "k", "v")}
            out, got = probed_attention(leaves["q"], leaves["k"], leaves["v"], backend=backend, capture=caps,
                                        **kwargs, **args)
            g = torch.Generator().manual_seed(9)
            loss = sum((t.double() * torch.randn(t.shape, generator=g, dtype=torch.float64)).sum()
                       for t in [out] + [got[n] for n in caps])
            results[backend] = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    finally:
        op_autograd._use_triton = original
    assert used == [triton_backward_expected, False], used
    for name, want in results["reference"].items():
        have = results["triton"][name].double()
        assert torch.isfinite(have).all(), name
        err = ((have - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-12)).item()
        assert err < 2e-5, (name, err)


@check
def backward_with_captures_and_interventions():
    _backward_case(True, masked_row=True, gate_and_patch=False)


@check
def backward_with_gate_bias_and_patch():
    _backward_case(True, masked_row=False, gate_and_patch=True)

@check
def query_masks_random_cases():
    """causal / bottom-right / bool / float attn_mask (every broadcast shape, fully masked rows) with random
    interventions, captures and layouts (op_cases.make_case(query_masks=True))."""
    torch = _torch()
    from op_cases import check_against_reference, make_case

    for seed in range(10):
        check_against_reference(make_case(3000 + seed, max_n=80, query_masks=True), "triton")
    for seed in range(4):
        check_against_reference(make_case(3100 + seed, dtype=torch.float16, max_n=80, query_masks=True), "triton")


@check
def query_masks_with_everything():
    """Causal (both alignments) and bool / float masks combined with key padding, segment knock-outs, every
    other intervention and every capture; segments that the causal loop bound never reaches."""
    torch = _torch()
    q, k, v, kwargs, gen = _base()
    B, H, Nq, Dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
    extra = _interventions(B, H, Nq, Dv, gen, q.dtype)
    boolm = torch.rand(B, 1, Nq, 77, generator=gen) < 0.7
    boolm[0, 0, 3] = False
    floatm = torch.randn(1, H, Nq, 77, generator=gen)
    floatm[0, 2, 7] = -math.inf
    for masks in ({"causal": True}, {"causal": "bottom_right"}, {"attn_mask": boolm}, {"attn_mask": floatm},
                  {"causal": True, "attn_mask": boolm}):
        _compare(q, k, v, capture=ALL, **kwargs, **extra, **masks)
        _compare(q, k, v, capture=ALL, **kwargs, **masks)
    # Nq > Nk bottom-right: whole query blocks see no key at all.
    q2, k2, v2, kw2, _ = _base(Nq=70, Nk=33, masked_row=False)
    kw2["segments"] = [0, 5, 20, 33]
    _compare(q2, k2, v2, capture=ALL, causal="bottom_right", **kw2)


@check
def query_masks_bitwise_determinism_and_batch_invariance():
    torch = _torch()
    q, k, v, kwargs, gen = _base(B=3)
    boolm = torch.rand(3, 1, q.shape[2], 77, generator=gen) < 0.7
    for masks in ({"causal": True}, {"attn_mask": boolm}):
        a = _run_all(q, k, v, capture=ALL, **kwargs, **masks)
        assert _bitwise_equal(a, _run_all(q, k, v, capture=ALL, **kwargs, **masks)), masks
        for row in range(3):
            single = {n: (t[row : row + 1] if torch.is_tensor(t) else t) for n, t in {**kwargs, **masks}.items()}
            one = _run_all(q[row : row + 1], k[row : row + 1], v[row : row + 1], capture=ALL, **single)
            assert _bitwise_equal(one, [t[row : row + 1] for t in a]), (masks, row)


@check
def causal_never_loads_keys_past_the_diagonal():
    """The causal loop bound: a NaN planted (after the argument checks) in keys no query of the block can
    see never reaches an output -- those key blocks are not loaded, not just masked."""
    from latentflow_fast.ops import backend_triton, build_plan

    q, k, v, _, _ = _base(B=1, Nq=32, Nk=96, masked_row=False)
    plan = build_plan(q, k, v, causal=True, segments=[0, 20, 50, 96], capture=("lse", "entropy", "segment_mass"))
    k[:, :, 32:] = float("nan")
    v[:, :, 32:] = float("nan")
    out, caps = backend_triton.run(plan)
    assert bool(out.isfinite().all()) and all(bool(t.isfinite().all()) for t in caps.values())


def _worker(out_path: str) -> None:
    import torch

    torch.set_num_threads(1)
    sys.path.insert(0, str(HERE))
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:  # report every failure, keep going
            results[name] = traceback.format_exc(limit=6)
    Path(out_path).write_text(json.dumps(results))


# ----------------------------------------------------------------------------------------------- pytest


@pytest.fixture(scope="module")
def interpreter_results(tmp_path_factory):
    pytest.importorskip("triton")
    out_path = tmp_path_factory.mktemp("triton_interp") / "results.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="error::RuntimeWarning")
    proc = subprocess.run([sys.executable, __file__, "--worker", str(out_path)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not out_path.exists():
        pytest.fail(f"interpreter worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return json.loads(out_path.read_text())


@pytest.mark.parametrize("name", list(CHECKS))
def test_triton_interpreter(name, interpreter_results):
    verdict = interpreter_results.get(name, "check did not run")
    assert verdict == "ok", verdict


def test_triton_backend_reports_why_unavailable_without_gpu(monkeypatch):
    torch = _torch()
    from latentflow_fast.ops import backends, probed_attention

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = backends.unavailable_reason("triton", "cpu")
    assert reason is not None and "cuda" in reason.lower()
    x = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="backend"):
        probed_attention(x, x, x, backend="triton")


BENCHMARK = ROOT / "benchmarks" / "attention_gpu.py"


def test_benchmark_script_without_cuda_exits_cleanly():
    torch = _torch()
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the benchmark would run for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(BENCHMARK)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout and "Traceback" not in proc.stderr


def test_benchmark_script_smoke_runs_end_to_end():
    pytest.importorskip("triton")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCHMARK), "--smoke", "--n", "40", "--d", "16"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| 40 ")]
    variants = {line.split("|")[4].strip() for line in table}
    assert {"triton plain", "triton probe", "triton key_mass"} <= variants, proc.stdout
    assert all(line.split("|")[10].strip() in ("ok", "-") for line in table), proc.stdout


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        _worker(sys.argv[2])
    else:
        sys.exit("usage: TRITON_INTERPRET=1 python tests/test_triton_interpreter.py --worker RESULTS.json")
