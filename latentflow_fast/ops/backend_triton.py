"""Backend "triton": launches the Triton kernels of `latentflow_fast.kernels.triton_probed_attention`.

The launcher allocates the outputs, picks pinned block sizes per (padded head dim, dtype, architecture)
and passes strides, so q/k/v/out_patch may have any layout. No host synchronisation and no
data-dependent host logic: a call can be captured in a CUDA graph (outputs come from torch's allocator,
which serves graph pools) and traced by torch.compile through the custom op.

Determinism: block sizes are a fixed function of (head dims, dtype, device architecture, interpreter or
not) -- the tables _TILES / _KM_TILES -- never autotuned at run time, so the reduction order -- hence
every bit of the result -- is the same on every run and for every batch composition.

Constexpr variants chosen here from the plan's shapes: WIDE (64-bit tile offsets, when an input's
element offsets reach 2^31) and USE_TMA (K/V through TMA descriptors on sm_90+, when BlockConfig.tma is
set and the layout meets TMA's alignment rules; no table row sets it until a GPU measurement says so:
the benchmark times it as "triton-tma").

Under TRITON_INTERPRET=1 the kernels run on CPU tensors (numpy; slow, for tests only).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .plan import AttentionPlan

LOG2E = 1.4426950408889634


def interpreter_enabled() -> bool:
    """True when Triton runs kernels in its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def unavailable_reason() -> Optional[str]:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc})"
    if interpreter_enabled():
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run it, slowly, on CPU tensors)"
    return None


@dataclass(frozen=True)
class BlockConfig:
    block_m: int      # queries per tile
    block_n: int      # keys per tile
    num_warps: int
    num_stages: int
    tma: bool = False  # forward: K/V tiles through TMA descriptors (sm_90+, when the layout allows)


def _pow2(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


# Tile tables: deterministic, chosen offline, one row per (arch family, operand width), each a list of
# (largest padded head dim served, config). Arch family 90 = sm_90 and newer (wgmma), 80 = sm_8x
# (mma.sync; configs fit the 99 KiB of shared memory of sm_86/89). Picked by
# `python -m latentflow_fast.kernels.triton_codegen --search` (and single checks): the largest tile that
# compiles without register spills within the family's shared memory WITH EVERY FEATURE ON. The feature
# set deliberately does not select the tile: asking for a capture must not change the output's bits
# (same tiles, same reduction order), and the in-loop interventions (mask, segment bias) cost fewer
# registers than the captures; causal adds no spill either, while a float or bool attn_mask on top of
# every other feature spills 12-60 bytes, tests/test_triton_codegen.py bounds it). (A plain call could take larger tiles: sm_80 D=128 compiles spill-free
# at 128x64 without captures, sm_90 D=256 at 128x64.) Static evidence only: speed is NOT measured on a
# GPU yet, and a measurement run may change any row. 16-bit operands use tensor cores; float32 operands
# use exact "ieee" products (CUDA-core FMA), hence the small tiles.
_TILES = {
    (90, "16bit"): ((64, BlockConfig(128, 64, 8, 3)), (128, BlockConfig(128, 64, 8, 3)), (256, BlockConfig(64, 32, 8, 2))),
    (80, "16bit"): ((64, BlockConfig(128, 64, 8, 3)), (128, BlockConfig(64, 64, 8, 3)), (256, BlockConfig(32, 32, 4, 2))),
    (90, "fp32"): ((64, BlockConfig(32, 32, 4, 2)), (128, BlockConfig(32, 16, 8, 2)), (256, BlockConfig(16, 16, 4, 1))),
}
_TILES[(80, "fp32")] = _TILES[(90, "fp32")]
# key_mass pass (no per-row softmax state; the same on both families): block_n keys stay resident,
# block_m queries stream.
_KM_TILES = {
    "16bit": ((64, BlockConfig(64, 128, 4, 3)), (128, BlockConfig(64, 128, 8, 3)), (256, BlockConfig(32, 64, 8, 2))),
    "fp32": ((64, BlockConfig(32, 32, 4, 2)), (128, BlockConfig(16, 32, 4, 2)), (256, BlockConfig(16, 16, 4, 1))),
}
_FALLBACK = BlockConfig(16, 16, 4, 1)  # head dims above 256: correct, not tuned
# Under the interpreter (numpy) small tiles keep several blocks per row in the small test shapes.
INTERPRETER_CONFIG = BlockConfig(32, 32, 1, 1)


def _pick(table, d_pad: int) -> BlockConfig:
    for limit, config in table:
        if d_pad <= limit:
            return config
    return _FALLBACK


def _width(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def forward_config(d_pad: int, dv_pad: int, dtype: torch.dtype, capability: tuple = (9, 0)) -> BlockConfig:
    """The forward's tile for a padded head dim, dtype and device capability."""
    if interpreter_enabled():
        return INTERPRETER_CONFIG
    family = 90 if tuple(capability) >= (9, 0) else 80
    return _pick(_TILES[(family, _width(dtype))], max(d_pad, dv_pad))


def key_mass_config(d_pad: int, dtype: torch.dtype) -> BlockConfig:
    if interpreter_enabled():
        return INTERPRETER_CONFIG
    return _pick(_KM_TILES[_width(dtype)], d_pad)


def _capability(device: torch.device) -> tuple:
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)
    return (9, 0)  # meta tensors (offline compiles pass their target explicitly)


def _patch_interpreter_scalars() -> None:
    """Let Triton 3.6's interpreter use runtime scalars as loop bounds under numpy >= 2.3.

    The interpreter stores scalars as 1-element arrays and converts them with int(array), which newer
    numpy rejects ("only 0-dimensional arrays can be converted"). We wrap its tensor patching so that
    __index__ reads the single element. Only ever applied when TRITON_INTERPRET=1.
    """
    from triton.runtime import interpreter

    original = interpreter._patch_lang_tensor
    if getattr(original, "_latentflow_patched", False):
        return

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patch_lang_tensor._latentflow_patched = True
    interpreter._patch_lang_tensor = patch_lang_tensor


def _kernels():
    if interpreter_enabled():
        _patch_interpreter_scalars()
    from latentflow_fast.kernels import triton_probed_attention

    return triton_probed_attention


def _device_scope(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@dataclass
class Launch:
    """One kernel launch: grid, positional arguments, constexpr/meta keyword arguments."""

    kernel: str
    grid: tuple
    args: list
    meta: dict


def _outputs(plan: AttentionPlan, empty=torch.empty) -> dict:
    """Output buffers of the plan (lse is kept whenever key_mass needs it, even if not requested)."""
    B, H, Nq, Nk, G = plan.batch, plan.heads, plan.num_queries, plan.num_keys, plan.num_segments
    f32 = dict(dtype=torch.float32, device=plan.q.device)
    wants = plan.wants
    return {
        "out": empty((B, H, Nq, plan.value_dim), dtype=plan.q.dtype, device=plan.q.device),
        "lse": empty((B, H, Nq), **f32) if (wants("lse") or wants("key_mass")) else None,
        "max": empty((B, H, Nq), **f32) if wants("max") else None,
        "entropy": empty((B, H, Nq), **f32) if wants("entropy") else None,
        "segment_mass": empty((B, H, Nq, G), **f32) if wants("segment_mass") else None,
        "key_mass": empty((B, H, Nk), **f32) if wants("key_mass") else None,
    }


def _tile_safe(t: Optional[torch.Tensor], rows: int) -> Optional[torch.Tensor]:
    """`t`, or a contiguous copy when an offset inside one tile (rows x last dim) could pass int32.

    The kernels advance each tile's base row in 64-bit but index inside a tile in 32-bit (cheaper in the
    hot loop); only a stride above 2^31 / rows (absurd for attention inputs) needs the copy.
    """
    if t is None:
        return None
    span = (rows - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1) * abs(t.stride(-1)) if t.dim() >= 2 else 0
    return t if span < 2**31 else t.contiguous()


def _tma_ok(t: torch.Tensor) -> bool:
    """TMA's layout rules for a [B, H, N, D] operand: last dim contiguous, every other stride and the base
    address 16-byte aligned (then every (b, h) matrix base is too)."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((stride * size) % 16 == 0 for stride in t.stride()[:-1]))


def _ensure_allocator() -> None:
    """In-kernel TMA descriptors need a small global scratch buffer per launch: give Triton torch's
    allocator (graph-capture safe) unless the application set its own."""
    import triton
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))


def _max_offset(t: Optional[torch.Tensor]) -> int:
    """The largest element offset of `t` from its data pointer."""
    return 0 if t is None else sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()) if size > 0)


def build_launches(plan: AttentionPlan, outputs: dict, fwd_config: Optional[BlockConfig] = None,
                   km_config: Optional[BlockConfig] = None, capability: Optional[tuple] = None) -> list[Launch]:
    """The launches that compute `plan` into `outputs` (also used to compile kernels offline for the
    compute `capability`; default: the tensors' device)."""
    B, H, Nq, D = plan.q.shape
    Hkv, Nk, Dv = plan.k.shape[1], plan.k.shape[2], plan.v.shape[3]
    G = plan.num_segments
    d_pad, dv_pad = _pow2(D), _pow2(Dv)
    fwd = fwd_config or forward_config(d_pad, dv_pad, plan.q.dtype, capability or _capability(plan.q.device))
    km = km_config or key_mass_config(d_pad, plan.q.dtype)
    rows = max(fwd.block_m, fwd.block_n, km.block_m, km.block_n)
    q, k, v = (_tile_safe(t, rows) for t in (plan.q, plan.k, plan.v))
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 needs exact products; 16-bit ignores it
    out, lse, key_mass = outputs["out"], outputs["lse"], outputs["key_mass"]

    def ptr(t: Optional[torch.Tensor]) -> torch.Tensor:
        return out if t is None else t  # never dereferenced: its flag is off

    # Bool tensors travel as uint8 views (zero-copy): one byte per flag, no i1 pointer corner cases.
    mask = None if plan.key_padding_mask is None else plan.key_padding_mask.view(torch.uint8)
    patch_mask = None if plan.patch_mask is None else plan.patch_mask.view(torch.uint8)
    segments = plan.segments if plan.segments is not None else ptr(None)
    patch = _tile_safe(plan.out_patch, fwd.block_m)
    patch_strides = patch.stride() if patch is not None else (0, 0, 0, 0)
    qk_scale2 = plan.scale * LOG2E
    group = H // Hkv
    # attn_mask [Bm, Hm, Nq, Nk]: bool as a uint8 view, float32 as is; a size-1 batch / head dim gets
    # stride 0 (broadcast). causal_offset: query i sees keys j <= i + offset.
    qmask = plan.attn_mask
    if qmask is not None:
        qmask = qmask.contiguous().view(torch.uint8) if qmask.dtype == torch.bool else qmask.to(torch.float32).contiguous()
    qmask_strides = ((0, 0) if qmask is None else
                     tuple(st if n > 1 else 0 for n, st in zip(qmask.shape[:2], qmask.stride()[:2])))
    query_masks = [ptr(qmask), *qmask_strides, plan.causal_offset or 0]
    query_mask_flags = dict(IS_CAUSAL=plan.causal_offset is not None, HAS_QMASK=qmask is not None,
                            QMASK_FLOAT=qmask is not None and qmask.dtype == torch.float32)
    common = dict(HAS_MASK=mask is not None, HAS_LOGIT_SCALE=plan.logit_scale is not None,
                  HAS_SEG_BIAS=plan.segment_bias is not None, DOT_PRECISION=precision,
                  WIDE=any(_max_offset(t) >= 2**31 for t in (q, k, v, patch)))
    capability = capability or _capability(q.device)
    use_tma = fwd.tma and (interpreter_enabled() or tuple(capability) >= (9, 0)) and _tma_ok(k) and _tma_ok(v)

    num_m_blocks = triton_cdiv(Nq, fwd.block_m)
    launches = [Launch(
        "latentflow_probed_attn_fwd",
        (B * H * num_m_blocks,),
        [q, k, v, out,
         ptr(mask), segments, ptr(plan.logit_scale), ptr(plan.segment_bias), ptr(plan.head_gate),
         ptr(plan.out_bias), ptr(patch), ptr(patch_mask),
         ptr(lse), ptr(outputs["max"]), ptr(outputs["entropy"]), ptr(outputs["segment_mass"]),
         *q.stride(), *k.stride(), *v.stride(), *patch_strides,
         H, group, Nq, Nk, D, Dv, max(G, 1), num_m_blocks, qk_scale2, *query_masks],
        dict(BLOCK_M=fwd.block_m, BLOCK_N=fwd.block_n, LOG_BLOCK_N=_log2_ceil(fwd.block_n),
             D_PAD=d_pad, DV_PAD=dv_pad, EVEN_D=D == d_pad, EVEN_DV=Dv == dv_pad,
             HAS_GATE=plan.head_gate is not None, HAS_OUT_BIAS=plan.out_bias is not None,
             HAS_PATCH=patch is not None, STORE_LSE=lse is not None, STORE_MAX=outputs["max"] is not None,
             STORE_ENT=outputs["entropy"] is not None, STORE_SEG=outputs["segment_mass"] is not None,
             SKIP_PATCHED=patch is not None and not plan.capture, USE_TMA=use_tma, **common, **query_mask_flags,
             num_warps=fwd.num_warps, num_stages=fwd.num_stages),
    )]
    if key_mass is not None:
        num_n_blocks = triton_cdiv(Nk, km.block_n)
        launches.append(Launch(
            "latentflow_probed_attn_key_mass",
            (B * H * num_n_blocks,),
            [q, k, lse, key_mass, ptr(mask), segments, ptr(plan.logit_scale), ptr(plan.segment_bias),
             *q.stride(), *k.stride(), H, group, Nq, Nk, D, max(G, 1), _log2_ceil(max(G, 1)), num_n_blocks,
             qk_scale2, *query_masks],
            dict(BLOCK_N=km.block_n, BLOCK_M=km.block_m, D_PAD=d_pad, EVEN_D=D == d_pad, **common, **query_mask_flags,
                 num_warps=km.num_warps, num_stages=km.num_stages),
        ))
    return launches


def _log2_ceil(n: int) -> int:
    """Halvings a binary search over n candidates needs."""
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def run(plan: AttentionPlan, fwd_config: Optional[BlockConfig] = None,
        km_config: Optional[BlockConfig] = None) -> tuple[torch.Tensor, dict]:
    """Run the plan; `fwd_config`/`km_config` override the pinned block sizes (tests, tuning)."""
    kernels = _kernels()
    outputs = _outputs(plan)
    with _device_scope(plan.q.device):
        for launch in build_launches(plan, outputs, fwd_config, km_config):
            if launch.meta.get("USE_TMA") and not interpreter_enabled():
                _ensure_allocator()
            getattr(kernels, launch.kernel)[launch.grid](*launch.args, **launch.meta)
    return outputs["out"], {name: outputs[name] for name in plan.capture}


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
