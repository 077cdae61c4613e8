"""Compile the Triton kernels for a GPU target without a GPU, and report their resources.

    python -m latentflow_fast.kernels.triton_codegen            # table for sm_80 / sm_90, D 64/128/256
    python -m latentflow_fast.kernels.triton_codegen --markdown # the static-evidence table of BENCHMARKS.md

Triton can lower a kernel to PTX and cubin for any NVIDIA target on a machine without one (ptxas ships
with Triton). This catches compile-only errors that the CPU interpreter cannot see, and `ptxas -v` tells
registers, spills and shared memory per block configuration, the first thing to check when tuning.
From the cubin's SASS (nvdisasm, also shipped with Triton) it counts the instructions of the hot key
loop's body (a static count: the loop that issues the tensor-core MMAs, branches included) and whether
the kernel uses wgmma (HGMMA) and TMA (UTMALDG / cp.async.bulk.tensor).
The launch arguments come from the real launcher (`backend_triton.build_launches`) applied to a plan of
meta tensors, mimicking the JIT's specialisation (ints equal to 1 become constants, multiples of 16 and
tensor pointers get 16-divisibility hints), so what compiles here is what the JIT compiles on a GPU.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch

from latentflow_fast.ops import backend_triton
from latentflow_fast.ops.plan import AttentionPlan

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "u8",
          torch.int64: "i64", torch.bool: "i1"}


# Largest dynamic shared memory a block may opt into (CUDA programming guide, per compute capability);
# Triton raises OutOfResources at load time above it, so compile_plan raises it here already.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@dataclass
class KernelReport:
    kernel: str
    target: str
    num_warps: int
    num_stages: int
    blocks: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    mma: str
    tma: bool = False
    loop_instructions: int = 0  # SASS instructions in the hot loop's body (static count)
    loop_mmas: int = 0          # of which tensor-core MMA instructions


def meta_plan(B=1, H=4, Hkv=4, Nq=4096, Nk=4096, D=128, Dv=None, dtype=torch.bfloat16, G=3,
              interventions=True, capture=("lse", "entropy", "segment_mass"), query_masks=()) -> AttentionPlan:
    """A plan of meta tensors (no data), contiguous like a typical call. query_masks: any of "causal",
    "bool", "float" (an attn_mask [B, H, Nq, Nk] of that kind)."""
    meta = dict(device="meta")
    Dv = Dv or D
    row = lambda *shape: torch.empty(*shape, dtype=torch.float32, **meta) if interventions else None
    seg_needed = interventions or "segment_mass" in capture
    return AttentionPlan(
        q=torch.empty(B, H, Nq, D, dtype=dtype, **meta), k=torch.empty(B, Hkv, Nk, D, dtype=dtype, **meta),
        v=torch.empty(B, Hkv, Nk, Dv, dtype=dtype, **meta), scale=D ** -0.5,
        key_padding_mask=torch.empty(B, Nk, dtype=torch.bool, **meta) if interventions else None,
        segments=torch.empty(G + 1, dtype=torch.int64, **meta) if seg_needed else None,
        logit_scale=row(B, H), segment_bias=row(B, H, G), head_gate=row(B, H), out_bias=row(B, H, Dv),
        out_patch=torch.empty(B, H, Nq, Dv, dtype=dtype, **meta) if interventions else None,
        patch_mask=torch.empty(B, H, dtype=torch.bool, **meta) if interventions else None,
        capture=tuple(capture),
        causal_offset=0 if "causal" in query_masks else None,
        attn_mask=(torch.empty(B, H, Nq, Nk, dtype=torch.float32 if "float" in query_masks else torch.bool, **meta)
                   if {"bool", "float"} & set(query_masks) else None),
    )


def _ptxas() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "ptxas")


def _nvdisasm() -> str:
    import triton.backends.nvidia as nvidia

    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "nvdisasm")


_MMA = re.compile(r"\b(HGMMA|HMMA|QGMMA|IMMA)\b")


def sass_loop_stats(cubin: bytes) -> tuple[int, int, bool]:
    """(instructions, MMA instructions) of the hot loop -- the first backward-branch loop whose body holds
    tensor-core MMAs -- and whether the SASS uses TMA loads (UTMALDG)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        sass = subprocess.run([_nvdisasm(), "-c", path], capture_output=True, text=True, check=True).stdout
    return loop_stats_from_sass(sass)


def loop_stats_from_sass(sass: str) -> tuple[int, int, bool]:
    """sass_loop_stats on disassembled text (nvdisasm or cuobjdump --dump-sass of one function)."""
    lines = sass.splitlines()
    labels, instructions, at = {}, [], {}  # label -> next instruction's index; texts; address -> index
    for line in lines:
        label = re.match(r"^\s*(\.L_x_\d+):", line)
        address = re.search(r"/\*([0-9a-f]{4,})\*/", line)
        if label:
            labels[label.group(1)] = len(instructions)
        elif address:
            at[int(address.group(1), 16)] = len(instructions)
            instructions.append(line)
    loops = []  # (body length, MMAs, FFMAs) of each backward-branch loop, in program order
    for index, text in enumerate(instructions):
        target = re.search(r"\bBRA\b[^;]*?(\.L_x_\d+|0x[0-9a-f]+)", text)  # nvdisasm: labels; cuobjdump: addresses
        if not target:
            continue
        start = labels.get(target.group(1)) if target.group(1).startswith(".L") else at.get(int(target.group(1), 16))
        if start is not None and start <= index:
            body = instructions[start:index + 1]
            loops.append((len(body), sum(bool(_MMA.search(t)) for t in body), sum("FFMA" in t for t in body)))
    with_mma = [loop for loop in loops if loop[1]]
    if with_mma:  # tensor-core kernels: the first loop that issues MMAs (the full key blocks)
        hot = with_mma[0]
    else:  # float32 products on CUDA cores: the loop with the most FMAs
        hot = max(loops, key=lambda loop: loop[2], default=(0, 0, 0))
    return hot[0], hot[1], "UTMALDG" in sass


def _ptxas_resources(ptx: str, arch: str) -> tuple[int, int]:
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run([_ptxas(), "-v", f"--gpu-name={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    log = proc.stdout + proc.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


def compile_plan(plan: AttentionPlan, capability: int = 90, fwd_config=None, km_config=None) -> list[KernelReport]:
    """Compile every launch of `plan` for sm_<capability>; return resources per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from latentflow_fast.kernels import triton_probed_attention as kernels

    if backend_triton.interpreter_enabled():
        raise RuntimeError("codegen needs real Triton kernels: unset TRITON_INTERPRET")
    outputs = backend_triton._outputs(plan)
    reports = []
    for launch in backend_triton.build_launches(plan, outputs, fwd_config, km_config, (capability // 10, capability % 10)):
        fn = getattr(kernels, launch.kernel)
        meta = dict(launch.meta)
        options = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
        signature, constants, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            value = launch.args[i] if i < len(launch.args) else meta[name]
            if name in meta:
                signature[name], constants[name] = "constexpr", value
            elif isinstance(value, torch.Tensor):
                signature[name] = "*" + _TYPES[value.dtype]
                attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[name] = "fp32"
            elif value == 1:
                signature[name], constants[name] = "constexpr", 1
            else:
                signature[name] = "i32"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        target = GPUTarget("cuda", capability, 32)
        compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=target, options=options)
        arch = f"sm_{capability}a" if capability >= 90 else f"sm_{capability}"
        registers, spills = _ptxas_resources(compiled.asm["ptx"], arch)
        ptx = compiled.asm["ptx"]
        mma = "wgmma" if "wgmma.mma_async" in ptx else ("mma.sync" if "mma.sync" in ptx else "fma")
        limit = SHARED_LIMIT.get(capability, SHARED_LIMIT[80])
        if compiled.metadata.shared > limit:  # what the launch would raise on the GPU
            from triton.runtime.errors import OutOfResources

            raise OutOfResources(compiled.metadata.shared, limit, "shared memory")
        loop_instructions, loop_mmas, tma_sass = sass_loop_stats(compiled.asm["cubin"])
        blocks = (f"M{meta['BLOCK_M']} N{meta['BLOCK_N']}")
        reports.append(KernelReport(launch.kernel, arch, options["num_warps"], options["num_stages"], blocks,
                                    registers, spills, compiled.metadata.shared, mma,
                                    tma_sass or "cp.async.bulk.tensor" in ptx, loop_instructions, loop_mmas))
    return reports


VARIANTS = {
    "plain": dict(interventions=False, capture=()),
    "probe": dict(interventions=True, capture=("lse", "entropy", "segment_mass")),
    "probe G=512": dict(interventions=True, capture=("lse", "entropy", "segment_mass"), G=512),
    "key_mass": dict(interventions=False, capture=("key_mass",)),
}


# Candidate tiles of the offline search (`--search`): (BLOCK_M, BLOCK_N, num_warps, num_stages).
SEARCH_CANDIDATES = {
    "16bit": ((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3), (64, 64, 4, 2),
              (64, 32, 4, 3), (64, 32, 8, 2), (32, 32, 4, 2)),
    "fp32": ((64, 32, 4, 2), (32, 32, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2), (16, 16, 4, 2), (16, 16, 4, 1)),
}


def search_tiles(capability: int, dtype: torch.dtype, D: int, variant: str):
    """The deterministic static pick for one (arch, dtype, head dim, feature set): among the candidates
    that compile without spills and within the shared memory of every chip of the family (99 KiB on
    sm_8x, since sm_86/89 have no more), the largest tile (BLOCK_M x BLOCK_N), then the deeper pipeline,
    then fewer registers. Speed is not measured here: a GPU run may refine the pick."""
    from latentflow_fast.ops.backend_triton import BlockConfig

    limit = 101376 if capability < 90 else SHARED_LIMIT[90]
    spec = VARIANTS[variant]
    ranked = []
    for m, n, warps, stages in SEARCH_CANDIDATES["fp32" if dtype == torch.float32 else "16bit"]:
        config = BlockConfig(m, n, warps, stages)
        try:
            r = compile_plan(meta_plan(D=D, dtype=dtype, **spec), capability, fwd_config=config)[0]
        except Exception:  # OutOfResources or a compile error: not a candidate
            continue
        if r.spill_bytes == 0 and r.shared_bytes <= limit:
            ranked.append(((-m * n, -stages, r.registers), config, r))
    return min(ranked, key=lambda x: x[0])[1:] if ranked else (None, None)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="resources of the Triton kernels per target (no GPU needed)")
    parser.add_argument("--capabilities", type=int, nargs="+", default=[90, 80])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--markdown", action="store_true", help="only the columns of BENCHMARKS.md, sm_90 bf16")
    parser.add_argument("--search", action="store_true",
                        help="offline tile search: the static pick per (arch, dtype, head dim, feature set)")
    args = parser.parse_args(argv)
    if args.search:
        for capability in args.capabilities:
            for dtype in (getattr(torch, name) for name in args.dtypes):
                for D in args.head_dims:
                    for variant in ("plain", "probe"):
                        config, r = search_tiles(capability, dtype, D, variant)
                        print(f"sm_{capability} {_TYPES[dtype]} D={D} {variant}: {config}"
                              + (f" regs {r.registers} smem {r.shared_bytes / 1024:.0f} KiB" if r else ""), flush=True)
        return
    if args.markdown:
        args.capabilities, args.dtypes, args.head_dims = [90], ["bfloat16"], [64, 128]
    print("| target | D | dtype | variant | kernel | warps | stages | blocks | regs | spill B | smem KiB | mma | TMA "
          "| loop instr | loop MMAs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for capability in args.capabilities:
        for dtype in (getattr(torch, name) for name in args.dtypes):
            for D in args.head_dims:
                for name, spec in VARIANTS.items():
                    plan = meta_plan(D=D, dtype=dtype, **spec)
                    for r in compile_plan(plan, capability):
                        if name == "key_mass" and r.kernel.endswith("fwd"):
                            continue
                        print(f"| {r.target} | {D} | {_TYPES[dtype]} | {name} | {r.kernel.replace('latentflow_probed_attn_', '')} "
                              f"| {r.num_warps} | {r.num_stages} | {r.blocks} | {r.registers} | {r.spill_bytes} | "
                              f"{r.shared_bytes / 1024:.0f} | {r.mma} | {'yes' if r.tma else 'no'} | "
                              f"{r.loop_instructions} | {r.loop_mmas} |", flush=True)


if __name__ == "__main__":
    main()
