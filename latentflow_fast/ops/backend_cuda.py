"""Backend "cuda": the hand-written CUDA kernels (kernels/probed_attention*.cu).

Coverage (`supports`): CUDA tensors of compute capability >= 8.0, float16 or bfloat16, D == Dv in {64, 128}.
q, k and v may have any strides whose last dim is contiguous, whose other strides are multiples of 8
elements and whose data is 16-byte aligned; anything else is copied to a contiguous tensor first.

Auto rule (`prefer`, used by `backend="auto"` when the Triton kernel is also available): the table
`latentflow_fast.ops.backends.GPU_DISPATCH`. Until measurements say otherwise: Triton on sm_90 and newer
(its forward issues wgmma there; this kernel uses mma.sync), this kernel on sm_80/86/89 for every plan it
supports (float16/bfloat16, D == Dv in {64, 128}), Triton for everything else. A measurement run
(benchmarks/attention_gpu.py prints the winner per shape) changes the table, not this code.

Tiling: the forward gives each warp 32 query rows (rows_per_warp=32: every K/V fragment read from shared
memory feeds two MMAs; 128-row CTAs, 64-key tiles at D=64 and 32-key tiles at D=128) or 16 rows
(rows_per_warp=16: 64-row CTAs, 64-key tiles). Default: 32 on compute capability >= 9.0 and 16 on 8.x
(the choices that compile without register spills there, per ptxas); the environment variable
LATENTFLOW_CUDA_ROWS_PER_WARP=16|32 overrides (for benchmarking; results agree within rounding). Calls
with causal / attn_mask run a separate instance of each kernel (template flag kMasks: the unmasked one
keeps its registers) and default to 16 rows per warp, where that instance compiles spill-free.

Launch: two kernels on torch's current stream (latentflow_probed_attn_fwd_cuda, then
latentflow_probed_attn_key_mass_cuda when key_mass is captured); every output is allocated here before
the launch and nothing synchronises, so a call is capturable in a CUDA graph.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .plan import AttentionPlan, capture_shapes

SUPPORTED_DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
SUPPORTED_HEAD_DIMS = (64, 128)
ROWS_PER_WARP_ENV = "LATENTFLOW_CUDA_ROWS_PER_WARP"
ROWS_PER_WARP_CHOICES = (16, 32)
MAX_GRID_YZ = 65535  # heads and batch are grid dimensions y and z
_INT32_MAX = 2**31 - 1


def _native():
    try:
        from latentflow_fast import _C
    except ImportError:
        return None
    return _C


def unavailable_reason() -> Optional[str]:
    native = _native()
    if native is None:
        return "the native extension latentflow_fast._C is not built"
    if not getattr(native, "has_cuda", False):
        return "latentflow_fast was built without CUDA kernels (nvcc was not found at build time)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def unsupported_reason(plan: AttentionPlan) -> Optional[str]:
    """Why the CUDA kernels cannot run `plan` (None when they can), naming the argument."""
    q = plan.q
    if q.device.type != "cuda":
        return f"q: the CUDA kernels need CUDA tensors, got device {q.device}"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"q: the CUDA kernels support float16 and bfloat16, got {q.dtype}"
    if plan.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"q: the CUDA kernels support head dim D in {SUPPORTED_HEAD_DIMS}, got {plan.head_dim}"
    if plan.value_dim != plan.head_dim:
        return f"v: the CUDA kernels need Dv == D, got Dv={plan.value_dim}, D={plan.head_dim}"
    if plan.batch > MAX_GRID_YZ or plan.heads > MAX_GRID_YZ:
        return f"q: the CUDA kernels support B, H <= {MAX_GRID_YZ}, got B={plan.batch}, H={plan.heads}"
    if plan.num_queries > _INT32_MAX or plan.num_keys > _INT32_MAX:
        return "q/k: sequence lengths must fit in int32"
    if plan.causal_offset is not None and abs(plan.causal_offset) > _INT32_MAX:
        return "causal: the diagonal offset must fit in int32"
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return f"q: the CUDA kernels need compute capability >= 8.0 (mma.sync bf16, cp.async), device {q.device} has less"
    return None


def supports(plan: AttentionPlan) -> bool:
    return unsupported_reason(plan) is None


def prefer(plan: AttentionPlan) -> str:
    """The auto rule between the two GPU kernels: the dispatch table backends.GPU_DISPATCH."""
    from .backends import preferred_gpu_backend

    capability = torch.cuda.get_device_capability(plan.q.device) if plan.q.device.type == "cuda" else (0, 0)
    return preferred_gpu_backend(capability, plan.q.dtype, plan.head_dim, supports(plan))


def rows_per_warp(device: Optional[torch.device] = None, query_masks: bool = False) -> int:
    """The forward's query rows per warp: LATENTFLOW_CUDA_ROWS_PER_WARP (16 or 32) if set, else 32 on
    compute capability >= 9.0 (and for non-CUDA devices, i.e. the emulator) and 16 below. Calls with
    causal / attn_mask (`query_masks`) take 16 everywhere: their kernel instance spills registers at 32
    (ptxas, benchmarks/cuda_kernel_resources.py) and compiles spill-free at 16."""
    value = os.environ.get(ROWS_PER_WARP_ENV, "").strip()
    if not value:
        if query_masks:
            return 16
        if device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
            return 16
        return 32
    if value not in ("16", "32"):
        raise ValueError(f"{ROWS_PER_WARP_ENV} must be 16 or 32, got {value!r}")
    return int(value)


def _kernel_layout(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when the kernel can read it in place (cp.async 16-byte rows), else a contiguous copy."""
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0
    ok = ok and all(stride % 8 == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]) if size > 1)
    return t if ok else t.clone(memory_format=torch.contiguous_format)


def _strides3(t: torch.Tensor) -> tuple:
    # A dim of size 1 is only ever indexed at 0: report stride 0 so the kernel's alignment check holds.
    return tuple(stride if size > 1 else 0 for size, stride in zip(t.shape[:3], t.stride()[:3]))


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _side(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A plan side tensor as the kernel reads it: contiguous, of `dtype` (a no-op for plans from build_plan)."""
    return None if t is None else t.to(dtype).contiguous()


def run(plan: AttentionPlan):
    reason = unavailable_reason() or unsupported_reason(plan)
    if reason is not None:
        raise ValueError(f"backend 'cuda': {reason}")
    from latentflow_fast import _C

    device = plan.q.device.index if plan.q.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(plan.q.device).cuda_stream
    return launch(plan, _C, stream, device)


def launch(plan: AttentionPlan, native, stream: int, device: int, rows: Optional[int] = None):
    """Allocate the outputs and launch the kernels through `native` (latentflow_fast._C, or the host
    emulation of tests/cuda_emulator, which runs this same path on CPU tensors). `rows`: query rows per
    warp of the forward (default: `rows_per_warp(device, query_masks)`)."""
    q, k, v = (_kernel_layout(t) for t in (plan.q, plan.k, plan.v))
    B, H, Nq, Dv = plan.batch, plan.heads, plan.num_queries, plan.value_dim
    out = torch.empty((B, H, Nq, Dv), dtype=q.dtype, device=q.device)
    shapes = capture_shapes(plan)
    captures = {name: torch.empty(shape, dtype=torch.float32, device=q.device) for name, shape in shapes.items()}
    if out.numel() == 0 and all(t.numel() == 0 for t in captures.values()):  # e.g. H = 0: nothing to launch
        return out, captures
    lse = captures.get("lse")
    if lse is None and "key_mass" in captures:  # the second pass needs the forward's lse
        lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)

    # Side tensors stay referenced here until both launches are enqueued.
    mask = _side(plan.key_padding_mask, torch.bool)
    segments = _side(plan.segments, torch.int64)
    logit_scale = _side(plan.logit_scale, torch.float32)
    segment_bias = _side(plan.segment_bias, torch.float32)
    head_gate = _side(plan.head_gate, torch.float32)
    out_bias = _side(plan.out_bias, torch.float32)
    patch = plan.out_patch
    patch_mask = _side(plan.patch_mask, torch.bool) if patch is not None else None
    # attn_mask [Bm, Hm, Nq, Nk]: a size-1 batch / head dim gets stride 0 (broadcast).
    qmask = plan.attn_mask
    if qmask is not None:
        qmask = qmask.contiguous() if qmask.dtype == torch.bool else qmask.to(torch.float32).contiguous()
    qmask_strides = ((0, 0) if qmask is None else
                     tuple(st if n > 1 else 0 for n, st in zip(qmask.shape[:2], qmask.stride()[:2])))
    query_masks = qmask is not None or plan.causal_offset is not None
    args = {
        "dtype": SUPPORTED_DTYPES[q.dtype],
        "device": device,
        "batch": B,
        "heads": H,
        "kv_heads": plan.kv_heads,
        "num_queries": Nq,
        "num_keys": plan.num_keys,
        "head_dim": plan.head_dim,
        "value_dim": Dv,
        "num_segments": plan.num_segments,
        "scale": plan.scale,
        "rows_per_warp": rows if rows is not None else rows_per_warp(q.device, query_masks),
        "q": q.data_ptr(),
        "q_stride": _strides3(q),
        "k": k.data_ptr(),
        "k_stride": _strides3(k),
        "v": v.data_ptr(),
        "v_stride": _strides3(v),
        "out": out.data_ptr(),
        "key_padding_mask": _ptr(mask),
        "segments": _ptr(segments),
        "logit_scale": _ptr(logit_scale),
        "segment_bias": _ptr(segment_bias),
        "head_gate": _ptr(head_gate),
        "out_bias": _ptr(out_bias),
        "out_patch": _ptr(patch),
        "out_patch_stride": tuple(patch.stride()) if patch is not None else (0, 0, 0, 0),
        "patch_mask": _ptr(patch_mask),
        "causal": plan.causal_offset is not None,
        "causal_offset": plan.causal_offset or 0,
        "attn_mask_bool": _ptr(qmask) if qmask is not None and qmask.dtype == torch.bool else 0,
        "attn_mask_float": _ptr(qmask) if qmask is not None and qmask.dtype != torch.bool else 0,
        "attn_mask_stride_b": qmask_strides[0],
        "attn_mask_stride_h": qmask_strides[1],
        "lse": _ptr(lse),
        "max": _ptr(captures.get("max")),
        "entropy": _ptr(captures.get("entropy")),
        "segment_mass": _ptr(captures.get("segment_mass")),
        "key_mass": _ptr(captures.get("key_mass")),
    }
    native.cuda_probed_attention_forward(args, stream)
    if "key_mass" in captures:
        native.cuda_probed_attention_key_mass(args, stream)
    return out, captures
