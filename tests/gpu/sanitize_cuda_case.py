"""One small case of each CUDA kernel, for compute-sanitizer:

    compute-sanitizer --tool memcheck  python tests/gpu/sanitize_cuda_case.py
    compute-sanitizer --tool racecheck python tests/gpu/sanitize_cuda_case.py
    (also --tool initcheck / synccheck; add --kernel-name regex:latentflow_probed to skip torch's kernels)

Runs latentflow_probed_attn_fwd_cuda with every capture and intervention (ragged query/key tiles, GQA,
a key mask with a fully masked batch row, a knocked-out segment, per-row patches, strided q and
out_patch) and latentflow_probed_attn_key_mass_cuda, for bf16 and fp16 at D = 64 and 128 and both
forward tilings (16 and 32 query rows per warp), and checks the result against the float64 reference. Prints "SKIP ..." and exits 0 when the CUDA backend is not
available; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    parser.add_argument("--rows-per-warp", type=int, nargs="+", default=[16, 32], choices=[16, 32])
    args = parser.parse_args(argv)

    from latentflow_fast.ops import CAPTURE_NAMES, build_plan, probed_attention, unavailable_reason
    from latentflow_fast.ops.backend_cuda import ROWS_PER_WARP_ENV
    from latentflow_fast.ops.reference import reference_attention

    reason = unavailable_reason("cuda", "cuda")
    if reason is not None or not torch.cuda.is_available():
        print(f"SKIP cuda: {reason or 'no CUDA device'}")
        return 0
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from op_cases import reference_errors, rel_error

    device = "cuda"
    B, H, Hkv, Nq, Nk = 2, 4, 2, 100, 130  # neither a multiple of the 64-row tiles
    failures = 0
    for rows, dtype_name, D in [(r, t, d) for r in args.rows_per_warp for t in args.dtypes for d in args.head_dims]:
        os.environ[ROWS_PER_WARP_ENV] = str(rows)
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator(device=device).manual_seed(D)
        q = torch.randn(B, Nq, H, D, device=device, generator=gen).to(dtype).transpose(1, 2)  # strided
        k = torch.randn(B, Hkv, Nk, D, device=device, generator=gen).to(dtype)
        v = torch.randn(B, Hkv, Nk, D, device=device, generator=gen).to(dtype)
        mask = torch.rand(B, Nk, device=device, generator=gen) < 0.8
        mask[1] = False
        bias = torch.randn(B, H, 3, device=device, generator=gen)
        bias[0, 1] = float("-inf")
        kwargs = dict(
            key_padding_mask=mask, segments=torch.tensor([0, 7, 70, Nk], device=device),
            logit_scale=torch.rand(B, H, device=device, generator=gen) * 2, segment_bias=bias,
            head_gate=torch.rand(B, H, device=device, generator=gen),
            out_bias=torch.randn(B, H, D, device=device, generator=gen),
            out_patch=torch.randn(B, H, D, Nq, device=device, generator=gen).to(dtype).transpose(2, 3),
            patch_mask=torch.rand(B, H, device=device, generator=gen) < 0.5,
            capture=CAPTURE_NAMES,
        )
        out, caps = probed_attention(q, k, v, backend="cuda", **kwargs)
        torch.cuda.synchronize()
        ref_out, ref_caps = reference_attention(build_plan(q, k, v, **kwargs), torch.float64)
        outputs, refs = {"out": out, **caps}, {"out": ref_out, **ref_caps}
        errors = {n: rel_error(outputs[n], refs[n]) for n in refs}
        bad = [f for n in refs for f in reference_errors(n, outputs[n], refs[n], dtype)]  # norm and per-row
        status = "ok" if not bad else f"MISMATCH {bad}"
        print(f"cuda rows/warp={rows} {dtype_name} D={D}: worst rel err {max(errors.values()):.3g} {status}")
        failures += bool(bad)
    print("OK cuda" if failures == 0 else f"FAILED cuda: {failures} case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
