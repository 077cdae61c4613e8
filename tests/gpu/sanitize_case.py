"""A small probed-attention case for compute-sanitizer: `python tests/gpu/sanitize_case.py triton|cuda`.

Runs every capture and intervention once (ragged key/query blocks, a padded head dim, GQA, a key mask
with a fully masked row, non-contiguous q) so memcheck/racecheck see every code path of the kernels.
Exits 0 with "SKIP ..." when the backend is not available here.
"""

import sys

import torch

from latentflow_fast.ops import CAPTURE_NAMES, probed_attention, unavailable_reason


def main(backend: str) -> int:
    reason = unavailable_reason(backend, "cuda")
    if reason is not None or not torch.cuda.is_available():
        print(f"SKIP {backend}: {reason or 'no CUDA device'}")
        return 0
    torch.manual_seed(0)
    device, dtype = "cuda", torch.bfloat16
    B, H, Hkv, Nq, Nk = 2, 4, 2, 100, 130
    for D in (64, 128, 80):
        q = torch.randn(B, Nq, H, D, device=device, dtype=dtype).transpose(1, 2)  # non-contiguous
        k = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype)
        v = torch.randn(B, Hkv, Nk, D, device=device, dtype=dtype)
        mask = torch.rand(B, Nk, device=device) < 0.8
        mask[1] = False
        segments = torch.tensor([0, 7, 70, Nk], device=device)
        bias = torch.randn(B, H, 3, device=device)
        bias[0, 1] = float("-inf")
        out, caps = probed_attention(
            q, k, v, key_padding_mask=mask, segments=segments,
            logit_scale=torch.rand(B, H, device=device) * 2, segment_bias=bias,
            head_gate=torch.rand(B, H, device=device), out_bias=torch.randn(B, H, D, device=device),
            out_patch=torch.randn(B, H, Nq, D, device=device, dtype=dtype),
            patch_mask=torch.rand(B, H, device=device) < 0.5, capture=CAPTURE_NAMES, backend=backend,
        )
        # The patched-head fast path (no captures) too.
        probed_attention(q, k, v, out_patch=torch.zeros(B, H, Nq, D, device=device, dtype=dtype),
                         patch_mask=torch.rand(B, H, device=device) < 0.5, backend=backend)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), "non-finite output"
    print(f"OK {backend}: {', '.join(sorted(caps))}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python tests/gpu/sanitize_case.py triton|cuda")
    sys.exit(main(sys.argv[1]))
