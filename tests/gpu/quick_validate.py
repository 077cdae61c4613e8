"""Correctness stage of tests/gpu/quick_validate.sh: one backend against the float64 reference.

    python tests/gpu/quick_validate.py --backend triton|cuda [triton|cuda] [--dry-run]

On a GPU (bfloat16, the shapes of the issue's validation run):
  * N = 8192 at D = 64 and 128 with every capture and intervention (mask with a fully masked row,
    segment knock-outs, logit scale, gates, out_bias, patches), norm and per-row max-abs checks;
  * ragged Nq x Nk = 1000 x 3001 with GQA (H = 4, Hkv = 2);
  * one segment per key (G = N = 4096) with segment_mass and segment bias;
  * bitwise determinism (three runs) and batch invariance (a batch vs its rows alone);
  * CUDA-graph capture and replay with new inputs, bitwise equal to eager calls;
  * on sm_90+, the Triton forward's TMA variant (BlockConfig.tma) against the reference.
With --dry-run (no GPU): the same code on CPU tensors under Triton's interpreter, float32, tiny shapes,
so that CI checks the script itself; the CUDA backend and graph replay then print SKIP.
Prints one line per check and "PASS" or "FAIL" last; exit status 0 only on PASS.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # op_cases


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["triton", "cuda"], nargs="+", required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny float32 shapes")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported
    import torch

    from op_cases import assert_matches_reference, rel_error, row_error

    from latentflow_fast.ops import CAPTURE_NAMES, build_plan, probed_attention, unavailable_reason
    from latentflow_fast.ops.reference import reference_attention

    if args.dry_run:
        torch.set_num_threads(1)
    status = 0
    for backend in args.backend:
        status |= _validate(backend, args.dry_run, torch, assert_matches_reference, rel_error, row_error,
                            CAPTURE_NAMES, build_plan, probed_attention, unavailable_reason, reference_attention)
    return status


def _validate(be, dry, torch, assert_matches_reference, rel_error, row_error, CAPTURE_NAMES, build_plan,
              probed_attention, unavailable_reason, reference_attention) -> int:
    device = "cpu" if dry else "cuda"
    reason = unavailable_reason(be, device)
    if reason is None and not dry and not torch.cuda.is_available():
        reason = "no CUDA device"
    if reason is not None:
        print(f"SKIP {be}: {reason}")
        print("PASS (nothing to check)" if dry else f"FAIL {be}: backend unavailable on a GPU run")
        return 0 if dry else 1
    dtype = torch.float32 if dry else torch.bfloat16  # the interpreter's bf16 tl.dot is wrong
    N = 40 if dry else 8192
    failures = []

    def inputs(B, H, Hkv, Nq, Nk, D, seed=0, segments=None):
        gen = torch.Generator(device=device).manual_seed(seed)
        randn = lambda *s, scale=1.0: (torch.randn(*s, generator=gen, device=device) * scale).to(dtype)
        q, k, v = randn(B, H, Nq, D, scale=1.5), randn(B, Hkv, Nk, D, scale=1.5), randn(B, Hkv, Nk, D)
        mask = torch.rand(B, Nk, generator=gen, device=device) < 0.9
        if B > 1:
            mask[-1] = False  # a fully masked batch row
        segments = segments if segments is not None else sorted({0, min(77, Nk - 1), Nk // 2, Nk})
        G = len(segments) - 1
        bias = torch.randn(B, H, G, generator=gen, device=device)
        bias[0, 0, 0] = -math.inf  # one segment knocked out
        if H > 1:
            bias[0, 1, :] = -math.inf  # every segment knocked out: a dead (b, h)
        idx = torch.arange(B * H, device=device)
        kwargs = dict(
            key_padding_mask=mask, segments=torch.tensor(segments, device=device), segment_bias=bias,
            logit_scale=torch.tensor([1.0, 0.5, 0.0, 2.0], device=device)[idx % 4].reshape(B, H),
            head_gate=torch.tensor([1.0, 0.0, 0.5, -1.0], device=device)[idx % 4].reshape(B, H),
            out_bias=torch.randn(B, H, D, generator=gen, device=device),
            out_patch=torch.randn(B, H, Nq, D, generator=gen, device=device).to(dtype),
            patch_mask=(idx % 3 == 2).reshape(B, H), capture=CAPTURE_NAMES,
        )
        return q, k, v, kwargs

    def flat(out, caps):
        return [out] + [caps[n] for n in sorted(caps)]

    def bits(t):
        return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)

    def same_bits(a, b):
        return len(a) == len(b) and all(x.shape == y.shape and torch.equal(bits(x), bits(y)) for x, y in zip(a, b))

    def run_check(name, fn):
        start = time.perf_counter()
        try:
            detail = fn() or ""
            print(f"ok   {be} {name} ({time.perf_counter() - start:.1f} s) {detail}", flush=True)
        except Exception as exc:  # report and go on: one summary at the end
            failures.append(name)
            print(f"FAIL {be} {name}: {exc}", flush=True)
            traceback.print_exc(limit=3)

    def against_reference(q, k, v, kwargs):
        out, caps = probed_attention(q, k, v, backend=be, **kwargs)
        plan = build_plan(q, k, v, **kwargs)
        ref_out, ref_caps = reference_attention(plan, torch.float64, query_chunk=512)
        outputs, refs = {"out": out, **caps}, {"out": ref_out, **ref_caps}
        assert_matches_reference(outputs, refs, dtype)
        worst = max(refs, key=lambda n: rel_error(outputs[n], refs[n]))
        ratio = max(row_error(outputs[n], refs[n], dtype)[0] for n in refs)
        return f"worst rel err {rel_error(outputs[worst], refs[worst]):.2e} ({worst}), worst row at {ratio:.3g}x its tolerance"

    for D in ((16, 32) if dry else (64, 128)):
        run_check(f"N={N} D={D} all captures + interventions",
                  lambda D=D: against_reference(*inputs(2, 2, 1, N, N, D)))
    nq, nk = (10, 31) if dry else (1000, 3001)
    run_check(f"ragged {nq}x{nk} GQA H=4 Hkv=2", lambda: against_reference(*inputs(2, 4, 2, nq, nk, 64 if not dry else 16)))
    ng = 24 if dry else 4096
    run_check(f"one segment per key G=N={ng}",
              lambda: against_reference(*inputs(1, 2, 1, ng, ng, 64 if not dry else 16, segments=list(range(ng + 1)))))

    def determinism():
        q, k, v, kwargs = inputs(2, 2, 1, N, N, 128 if not dry else 16, seed=1)
        runs = [flat(*probed_attention(q, k, v, backend=be, **kwargs)) for _ in range(3)]
        assert same_bits(runs[0], runs[1]) and same_bits(runs[0], runs[2]), "two runs differ in their bits"

    def batch_invariance():
        B = 3
        q, k, v, kwargs = inputs(B, 2, 1, N // 4, N // 4, 64 if not dry else 16, seed=2)
        batch = flat(*probed_attention(q, k, v, backend=be, **kwargs))
        per_row = ("key_padding_mask", "segment_bias", "logit_scale", "head_gate", "out_bias", "out_patch", "patch_mask")
        for b in range(B):
            row = slice(b, b + 1)
            single_kwargs = {n: (t[row] if n in per_row else t) for n, t in kwargs.items()}
            single = flat(*probed_attention(q[row], k[row], v[row], backend=be, **single_kwargs))
            assert same_bits([t[row] for t in batch], single), f"batch row {b} differs from its run alone"

    def graph_replay():
        if dry:
            return "SKIP (needs CUDA)"
        q, k, v, kwargs = inputs(2, 4, 2, 1024, 1024, 64, seed=3)
        call = lambda: probed_attention(q, k, v, backend=be, **kwargs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compile and warm the allocator outside the capture
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static = flat(*call())
        for seed in (4, 5):
            gen = torch.Generator(device=device).manual_seed(seed)
            q.copy_(torch.randn(q.shape, generator=gen, device=device))
            kwargs["head_gate"].copy_(torch.rand(kwargs["head_gate"].shape, generator=gen, device=device))
            graph.replay()
            torch.cuda.synchronize()
            assert same_bits(static, flat(*call())), "graph replay differs from an eager call"

    def tma_variant():
        # sm_90+: the Triton forward with K/V tiles through TMA descriptors (not the table's default until
        # measured) must compute the same function.
        if be != "triton" or dry or torch.cuda.get_device_capability() < (9, 0):
            return "SKIP (Triton on sm_90+ only)"
        from dataclasses import replace

        from latentflow_fast.ops import backend_triton

        q, k, v, kwargs = inputs(2, 2, 1, N, N + 37, 128, seed=6)
        plan = build_plan(q, k, v, **kwargs)
        config = replace(backend_triton.forward_config(128, 128, dtype, torch.cuda.get_device_capability()), tma=True)
        assert backend_triton.build_launches(plan, backend_triton._outputs(plan), config)[0].meta["USE_TMA"]
        out, caps = backend_triton.run(plan, config)
        ref_out, ref_caps = reference_attention(plan, torch.float64, query_chunk=512)
        assert_matches_reference({"out": out, **caps}, {"out": ref_out, **ref_caps}, dtype)

    run_check(f"TMA variant N={N} Nk={N}+37 D=128", tma_variant)
    run_check("bitwise determinism (3 runs)", determinism)
    run_check("batch invariance (B=3 vs rows alone)", batch_invariance)
    run_check("CUDA-graph capture + replay", graph_replay)
    print(f"FAIL {be}: {', '.join(failures)}" if failures else f"PASS {be}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
