"""Static evidence for the hand-written CUDA kernels, without a GPU: registers, spills, shared memory
and the hot loop's SASS per template instance and target, from `nvcc --resource-usage` and cuobjdump.

    python benchmarks/cuda_kernel_resources.py            # markdown table, sm_80 and sm_90 (about 2 min)

Shared memory is dynamic (the launcher's forward_smem_bytes / key_mass_smem_bytes), so ptxas reports
none; the table gives the launch's value computed from the same formula. "loop instr" counts the SASS
instructions of the first backward-branch loop that issues tensor-core MMAs (a static count: branches
for rare paths, such as tiles where a segment ends, are included). "masks" = the instance for causal /
attn_mask calls (the unmasked instance is the one every other call runs).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARPS, PAD, QUERY_TILE = 4, 8, 64  # kernels/probed_attention_device.cuh


def smem_bytes(kernel: str, D: int, kM: int, keys: int) -> int:
    if kernel == "fwd":
        return (16 * WARPS * kM + 4 * keys) * (D + PAD) * 2 + keys * 8
    return (16 * WARPS * kM + 2 * QUERY_TILE) * (D + PAD) * 2 + 2 * QUERY_TILE * 4 + 16 * WARPS * kM * 4


def main() -> int:
    import triton.backends.nvidia as nvidia

    from latentflow_fast.kernels.triton_codegen import loop_stats_from_sass

    cuobjdump = Path(nvidia.__file__).parent / "bin" / "cuobjdump"
    print("| target | kernel | dtype | D | rows/warp | key tile | masks | regs | spill B | smem KiB | loop instr | loop MMAs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in (90, 80):
            for source in ("probed_attention.cu", "probed_attention_key_mass.cu"):
                cubin = Path(tmp) / f"{source}.{arch}.cubin"
                proc = subprocess.run(
                    ["nvcc", "-cubin", "-O3", "--use_fast_math", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                     "--resource-usage", str(ROOT / "kernels" / source), "-o", str(cubin)],
                    capture_output=True, text=True, check=True)
                log = proc.stdout + proc.stderr
                for chunk in log.split("Compiling entry function '")[1:]:
                    name = chunk.split("'", 1)[0]
                    spill = int(re.search(r"(\d+) bytes spill stores", chunk).group(1))
                    regs = int(re.search(r"Used (\d+) registers", chunk).group(1))
                    targs = re.search(r"cuda(?:I|E)(6__half|13__nv_bfloat16)Li(\d+)ELi(\d+)E(?:Li(\d+)E)?", name)
                    dtype = "fp16" if targs.group(1) == "6__half" else "bf16"
                    D, kM = int(targs.group(2)), int(targs.group(3))
                    kernel = "fwd" if "fwd" in name else "key_mass"
                    masks = "yes" if "Lb1E" in name else "no"  # the kMasks template argument
                    keys = int(targs.group(4)) if targs.group(4) else 16 * WARPS * kM
                    sass = subprocess.run([str(cuobjdump), "--dump-sass", "--function", name, str(cubin)],
                                          capture_output=True, text=True, check=True).stdout
                    loop, mmas, _ = loop_stats_from_sass(sass)
                    print(f"| sm_{arch} | {kernel} | {dtype} | {D} | {16 * kM if kernel == 'fwd' else '-'} | "
                          f"{keys if kernel == 'fwd' else QUERY_TILE} | {masks} | {regs} | {spill} | "
                          f"{smem_bytes(kernel, D, kM, keys) / 1024:.1f} | {loop} | {mmas} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
