"""AddressSanitizer over the CUDA kernels' source (host emulation): a CPU stand-in for
compute-sanitizer memcheck. Every q/k/v/side tensor is an exact-size heap block, so any read or write
outside it by the kernels (forward and key_mass) is reported with the kernel's stack.

    .venv/bin/python tests/cuda_emulator/asan_check.py        (re-executes itself with libasan preloaded)

Exit status 0 when every case ran clean.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parent))

SHAPES = [  # B, H, Hkv, Nq, Nk, D: ragged tiles, GQA, single tokens, exact tile multiples
    (2, 2, 1, 130, 150, 64), (1, 2, 2, 65, 129, 128), (2, 1, 1, 64, 64, 128), (3, 4, 2, 1, 1, 64), (1, 2, 1, 7, 200, 64),
]


def _run_cases() -> None:
    import torch

    from cuda_emulator.build import build
    from latentflow_fast.ops import CAPTURE_NAMES, backend_cuda, build_plan

    torch.set_num_threads(1)
    emu = build(sanitize=True)
    for i, (B, H, Hkv, Nq, Nk, D) in enumerate(SHAPES):
        dtype = (torch.bfloat16, torch.float16)[i % 2]
        g = torch.Generator().manual_seed(i)
        q, k, v = (torch.randn(B, h, n, D, generator=g).to(dtype) for h, n in ((H, Nq), (Hkv, Nk), (Hkv, Nk)))
        segments = sorted({0, min(1, Nk), Nk // 3, Nk - 1, Nk})
        bias = torch.randn(B, H, len(segments) - 1, generator=g)
        bias[0, 0, 0] = -math.inf
        plan = build_plan(
            q, k, v, key_padding_mask=torch.rand(B, Nk, generator=g) < 0.8, segments=segments, segment_bias=bias,
            logit_scale=torch.rand(B, H, generator=g), head_gate=torch.rand(B, H, generator=g),
            out_bias=torch.randn(B, H, D, generator=g), out_patch=torch.randn(B, H, Nq, D, generator=g).to(dtype),
            patch_mask=torch.rand(B, H, generator=g) < 0.5, capture=CAPTURE_NAMES,
        )
        backend_cuda.launch(plan, emu, stream=0, device=0)
        # Query-dependent masks: the causal loop bounds (both alignments) and per-element attn_mask reads
        # (bool [B, 1, Nq, Nk] and float [1, H, Nq, Nk], exact-size blocks: broadcast dims use stride 0).
        bool_mask = torch.rand(B, 1, Nq, Nk, generator=g) < 0.7
        float_mask = torch.randn(1, H, Nq, Nk, generator=g)
        for masks in ({"causal": True, "attn_mask": bool_mask}, {"causal": "bottom_right", "attn_mask": float_mask}):
            plan = build_plan(q, k, v, segments=segments, capture=CAPTURE_NAMES, **masks)
            backend_cuda.launch(plan, emu, stream=0, device=0)
        print(f"clean: B={B} H={H} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} {dtype} (with causal / attn_mask)", flush=True)
    print("ASAN OK")


def main() -> int:
    if os.environ.get("LATENTFLOW_ASAN_CHILD") == "1":
        _run_cases()
        return 0
    libasan = subprocess.run(["g++", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    env = dict(os.environ, LATENTFLOW_ASAN_CHILD="1", LD_PRELOAD=libasan,
               ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:halt_on_error=1")
    return subprocess.run([sys.executable, __file__], env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
