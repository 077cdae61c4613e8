"""Backend "cpu": the fused C++ kernel (csrc/probed_attention_cpu.cpp) on CPU tensors.

Outputs are allocated here with torch (out contiguous [B, H, Nq, Dv] in q's dtype, captures float32);
the kernel gets raw pointers, shapes and strides and runs with the GIL released on
`torch.get_num_threads()` threads, fewer for small calls (`kernel_threads`; results do not depend on it).

`LATENTFLOW_CPU_ISA` = "auto" (default) | "avx512" | "avx2" | "generic" picks the micro-kernels, read at
every call. "auto" takes the best path this CPU has (AVX-512, else AVX2 + FMA, else the portable one);
naming a path the CPU lacks raises ValueError. Forcing "avx2" or "generic" on a bigger CPU is how those
paths are tested. Results are bitwise reproducible within one path; across paths they agree to rounding.
`cpu_info()` says which path runs.
"""

from __future__ import annotations

import os
import platform
from typing import Optional

import torch

from .plan import AttentionPlan, capture_shapes

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_ISA_CODES = {"auto": 0, "avx512": 1, "avx2": 3, "generic": 2}  # codes of csrc/probed_attention_cpu.h
ISA_NAMES = ("avx512", "avx2", "generic")  # the paths, best first
ISA_ENV = "LATENTFLOW_CPU_ISA"


def _native():
    from latentflow_fast import _C  # noqa: PLC0415 (imported lazily: a missing build is "unavailable")

    return _C


def unavailable_reason() -> Optional[str]:
    try:
        native = _native()
    except ImportError as exc:
        return f"the native extension latentflow_fast._C is not built ({exc})"
    if not hasattr(native, "probed_attention_cpu"):
        return "latentflow_fast._C was built without the CPU kernel"
    return None


def has_avx512() -> bool:
    """True when this CPU runs the AVX-512 micro-kernels."""
    return bool(_native().cpu_has_avx512())


def has_avx2() -> bool:
    """True when this CPU runs the AVX2 + FMA micro-kernels."""
    return bool(_native().cpu_has_avx2())


def supported_isas() -> list[str]:
    """The micro-kernel paths this CPU can run, best first ("generic" always)."""
    return [name for name, ok in (("avx512", has_avx512()), ("avx2", has_avx2()), ("generic", True)) if ok]


def _isa_request() -> str:
    name = os.environ.get(ISA_ENV, "auto").strip().lower() or "auto"
    if name not in _ISA_CODES:
        raise ValueError(f"{ISA_ENV}={name!r}; expected one of {', '.join(_ISA_CODES)}")
    return name


def _isa() -> int:
    name = _isa_request()
    if name == "avx512" and not has_avx512():
        raise ValueError(f"{ISA_ENV}=avx512 but this CPU has no AVX-512 (supported here: {', '.join(supported_isas())})")
    if name == "avx2" and not has_avx2():
        raise ValueError(f"{ISA_ENV}=avx2 but this CPU has no AVX2 + FMA (supported here: {', '.join(supported_isas())})")
    return _ISA_CODES[name]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_info() -> dict:
    """Which micro-kernel path the "cpu" backend runs here, and why.

    Keys: "isa" (the path a call runs now: "avx512", "avx2" or "generic"), "requested" (the value of
    LATENTFLOW_CPU_ISA, "auto" when unset), "supported" (paths this CPU can run, best first), "cpu"
    (the CPU model) and "machine". Raises ValueError, like a call would, when the requested path is not
    available here; raises RuntimeError when the native extension is not built.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    return {
        "isa": str(_native().cpu_resolve_isa(_isa())),
        "requested": _isa_request(),
        "supported": supported_isas(),
        "cpu": _cpu_model(),
        "machine": platform.machine(),
    }


def describe_path() -> str:
    """One line for benchmark headers: the path the "cpu" backend runs here, or why it cannot run."""
    try:
        info = cpu_info()
    except (RuntimeError, ValueError) as exc:
        return f"cpu kernel unavailable: {exc}"
    return f"cpu kernel path {info['isa']} (this CPU runs {', '.join(info['supported'])}; {info['cpu']})"


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _dense(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The plan already holds these contiguous in `dtype`; this only guards direct calls of the custom op."""
    return None if t is None else t.to(dtype).contiguous()


# Multiply-adds one extra kernel thread must get to pay off. With torch's OpenMP pool (the native build
# links the libgomp torch loads, see csrc/cpu_parallel.h) a second thread is worth it from very small calls
# on: measured on the 2-core test machine (2026-11-29), a batch-1 call of the small model ([1, 4, 200, 64]
# self-attention with entropy and segment mass, 20M multiply-adds) went from 0.62 to 0.36 ms and its
# cross-attention over 6 tokens (0.6M) from 0.22 to 0.15 ms. Threads started per call (builds without
# OpenMP, forked children) compete with the pool's spinning workers instead: a second thread then made the
# 20M call 10-20% slower, broke even at 40M and gave 1.75x at 1300M.
MIN_WORK_PER_THREAD = {"openmp": 256 << 10, "threads": 32 << 20}


POOL_ENV = "LATENTFLOW_CPU_POOL"  # "threads": threads started per call instead of torch's OpenMP pool


def parallel_runtime() -> str:
    """Where the kernel's threads come from in this process: "openmp" (torch's pool) or "threads"."""
    request = os.environ.get(POOL_ENV)
    if request not in (None, "", "openmp", "threads"):
        raise ValueError(f"{POOL_ENV}={request!r}; expected 'openmp' (the default: torch's OpenMP pool) or "
                         "'threads' (threads started per call)")
    return str(_native().cpu_parallel_runtime())


def kernel_threads(plan: AttentionPlan) -> int:
    """Threads for one call: torch's intra-op count, fewer for small calls. Results do not depend on it."""
    work = plan.batch * plan.heads * plan.num_queries * plan.num_keys * (plan.head_dim + plan.value_dim)
    return max(1, min(torch.get_num_threads(), work // MIN_WORK_PER_THREAD[parallel_runtime()]))


def run(plan: AttentionPlan):
    q, k, v = plan.q, plan.k, plan.v
    if q.device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, q is on {q.device}")
    if q.dtype not in _DTYPE_CODES:
        raise TypeError(f"backend 'cpu' supports float32, bfloat16 and float16, not {q.dtype}")
    B, H, Nq, Dv = plan.batch, plan.heads, plan.num_queries, plan.value_dim
    out = torch.empty((B, H, Nq, Dv), dtype=q.dtype)
    captures = {name: torch.empty(shape, dtype=torch.float32) for name, shape in capture_shapes(plan).items()}
    if out.numel() == 0:
        return out, {name: t.zero_() for name, t in captures.items()}

    patch = plan.out_patch
    mask, segments = _dense(plan.key_padding_mask, torch.bool), _dense(plan.segments, torch.int64)
    logit_scale, segment_bias = _dense(plan.logit_scale, torch.float32), _dense(plan.segment_bias, torch.float32)
    head_gate, out_bias = _dense(plan.head_gate, torch.float32), _dense(plan.out_bias, torch.float32)
    patch_mask = _dense(plan.patch_mask, torch.bool) if patch is not None else None
    # attn_mask [Bm, Hm, Nq, Nk] (Bm, Hm in {1, B / H}): a size-1 batch or head dim gets stride 0.
    am = plan.attn_mask
    if am is not None:
        am = am.contiguous() if am.dtype == torch.bool else am.to(torch.float32).contiguous()
    am_strides = (0, 0) if am is None else tuple(st if n > 1 else 0 for n, st in zip(am.shape[:2], am.stride()[:2]))
    _native().probed_attention_cpu(
        dtype=_DTYPE_CODES[q.dtype],
        batch=B, heads=H, kv_heads=plan.kv_heads, num_queries=Nq, num_keys=plan.num_keys,
        head_dim=plan.head_dim, value_dim=Dv, num_segments=plan.num_segments,
        q=q.data_ptr(), q_strides=list(q.stride()),
        k=k.data_ptr(), k_strides=list(k.stride()),
        v=v.data_ptr(), v_strides=list(v.stride()),
        scale=plan.scale,
        key_padding_mask=_ptr(mask),
        segments=_ptr(segments),
        logit_scale=_ptr(logit_scale),
        segment_bias=_ptr(segment_bias),
        head_gate=_ptr(head_gate),
        out_bias=_ptr(out_bias),
        out_patch=_ptr(patch),
        out_patch_strides=list(patch.stride()) if patch is not None else [0, 0, 0, 0],
        patch_mask=_ptr(patch_mask),
        causal=plan.causal_offset is not None,
        causal_offset=plan.causal_offset or 0,
        attn_mask_bool=_ptr(am) if am is not None and am.dtype == torch.bool else 0,
        attn_mask_float=_ptr(am) if am is not None and am.dtype != torch.bool else 0,
        attn_mask_batch_stride=am_strides[0],
        attn_mask_head_stride=am_strides[1],
        out=out.data_ptr(),
        **{name: t.data_ptr() for name, t in captures.items()},
        num_threads=kernel_threads(plan),
        isa=_isa(),
    )
    return out, captures
