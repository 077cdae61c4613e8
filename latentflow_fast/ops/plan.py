"""Argument validation and normalisation for probed attention.

Every backend consumes the same `AttentionPlan`: the user's arguments checked once here, with every
per-row parameter expanded to a contiguous float32 tensor of its full shape ([B, H], [B, H, G],
[B, H, Dv]). Backends therefore never broadcast, never guess defaults and never validate again, and
"what a row gets" is decided in exactly one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

CAPTURE_NAMES = ("lse", "max", "entropy", "segment_mass", "key_mass")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)

RowParam = Union[None, float, int, torch.Tensor]
# Additive attn_mask values at or below this count as -inf (masked); see _attn_mask.
MASK_FLOOR = -1e30


@dataclass
class AttentionPlan:
    """Validated, normalised arguments of one probed-attention call.

    Shapes: q [B,H,Nq,D], k [B,Hkv,Nk,D], v [B,Hkv,Nk,Dv] (any strides). Optional tensors are either
    None (intervention inactive) or contiguous, on q's device, of the exact shapes below.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    key_padding_mask: Optional[torch.Tensor]  # bool [B, Nk]
    segments: Optional[torch.Tensor]          # int64 [G+1]
    logit_scale: Optional[torch.Tensor]       # f32 [B, H]
    segment_bias: Optional[torch.Tensor]      # f32 [B, H, G]
    head_gate: Optional[torch.Tensor]         # f32 [B, H]
    out_bias: Optional[torch.Tensor]          # f32 [B, H, Dv]
    out_patch: Optional[torch.Tensor]         # q.dtype [B, H, Nq, Dv] (any strides)
    patch_mask: Optional[torch.Tensor]        # bool [B, H]
    capture: tuple                            # subset of CAPTURE_NAMES, in canonical order
    # Query-dependent masks (defaults keep older constructors valid):
    causal_offset: Optional[int] = None       # None = not causal; else query i sees keys j <= i + offset
    attn_mask: Optional[torch.Tensor] = None  # bool (True = attend) or additive f32 (f64 for f64 q; values
                                              # <= MASK_FLOOR already -inf), [Bm, Hm, Nq, Nk],
                                              # Bm in {1, B}, Hm in {1, H}, contiguous

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def num_queries(self) -> int:
        return self.q.shape[2]

    @property
    def num_keys(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def value_dim(self) -> int:
        return self.v.shape[3]

    @property
    def num_segments(self) -> int:
        return 0 if self.segments is None else self.segments.shape[0] - 1

    def wants(self, name: str) -> bool:
        return name in self.capture


def _is_tracing() -> bool:
    """True while torch.compile traces or a CUDA graph captures: data-dependent checks must be skipped."""
    if torch.compiler.is_compiling():
        return True
    # is_initialized, not is_available: no capture can run before CUDA starts, and it costs no driver call
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def _check_tensor(name: str, t, rank: int, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have {rank} dimensions, got shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")
    return t


def _row_param(name: str, value: RowParam, shape: tuple, device: torch.device) -> Optional[torch.Tensor]:
    """Broadcast a float or tensor parameter to a contiguous float32 tensor of `shape`."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a float or a tensor, got bool")
    if isinstance(value, (int, float)):
        value = float(value)
        if math.isnan(value):
            raise ValueError(f"{name} is NaN")
        if math.isinf(value) and not (name == "segment_bias" and value < 0):
            raise ValueError(f"{name} must be finite{_ALLOWED_INF.get(name, '')}, got {value}")
        return torch.full(shape, value, dtype=torch.float32, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}")
    try:
        expanded = torch.broadcast_to(value, shape)
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(value.shape)} is not broadcastable to {shape}") from None
    return expanded.to(torch.float32).contiguous()


# -inf is meaningful only as a segment bias (knock the segment out); +inf would make every other key's
# weight 0/0, and a non-finite scale, gate or bias makes the output NaN or silently zero.
_ALLOWED_INF = {"segment_bias": " or -inf", "attn_mask": " or -inf"}


def _sum(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` (float32, float64 for float64): finite exactly when every element is, unless finite
    values overflow it.

    One summation pass instead of isfinite's four (abs, two compares, all), which on the strided q / k / v
    views the model passes cost about as much as the attention itself at batch 1. A NaN or an Inf anywhere
    makes the sum NaN or Inf (IEEE: NaN propagates, Inf + finite = Inf, Inf - Inf = NaN). A non-finite sum
    can also come from overflow of finite values, so it only means "run the exact check".
    """
    return t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)


def _check_values(plan: "AttentionPlan") -> None:
    """Data checks: q, k, v finite; row parameters finite (segment_bias may be -inf). One host sync for all
    on GPUs; on the CPU, where reading a value costs nothing, q, k and v are read as Python floats (cheaper
    than stacking tensors). Skipped while tracing (torch.compile, CUDA graphs) and for meta tensors, which
    hold no data."""
    if _is_tracing() or plan.q.device.type == "meta":
        return
    checks = []  # (name, 0-dim bool tensor: passed), read back together
    suspects = []  # of q, k, v: those whose sum is not finite
    if plan.q.device.type == "cpu":
        suspects = [n for n in ("q", "k", "v") if not math.isfinite(float(_sum(getattr(plan, n))))]
    else:
        checks = [(n, torch.isfinite(_sum(getattr(plan, n)))) for n in ("q", "k", "v")]
    for name in ("logit_scale", "head_gate", "out_bias"):
        t = getattr(plan, name)
        if t is not None:
            checks.append((name, torch.isfinite(t).all()))
    if plan.segment_bias is not None:
        sb = plan.segment_bias
        checks.append(("segment_bias", ~(torch.isnan(sb) | (sb == float("inf"))).any()))
    if plan.attn_mask is not None and plan.attn_mask.is_floating_point():
        am = plan.attn_mask
        checks.append(("attn_mask", ~(torch.isnan(am) | (am == float("inf"))).any()))
    ok = torch.stack([c for _, c in checks]).cpu().tolist() if checks else []
    failed = suspects + [name for (name, _), good in zip(checks, ok) if not good]  # q, k, v first
    for name in failed:
        if name in ("q", "k", "v"):
            from ..numerics import NonFiniteError

            t = getattr(plan, name)
            if bool(torch.isfinite(t).all()):  # the sum overflowed; the values are finite
                continue
            raise NonFiniteError(f"{name} holds {int((~torch.isfinite(t)).sum())} non-finite value(s) "
                                 f"(NaN/Inf activations reach the attention; check the model weights and inputs)")
        t = getattr(plan, name)
        nan = int(torch.isnan(t).sum())
        raise ValueError(f"{name} must be finite{_ALLOWED_INF.get(name, '')}; it holds "
                         + (f"{nan} NaN value(s)" if nan else "+inf" if name in _ALLOWED_INF else "inf"))


def _bool_param(name: str, value, shape: tuple, device: torch.device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if isinstance(value, bool):
        return torch.full(shape, value, dtype=torch.bool, device=device)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool, got {value.dtype}")
    if value.device != device:
        raise ValueError(f"{name} is on {value.device} but q is on {device}")
    try:
        return torch.broadcast_to(value, shape).contiguous()
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(value.shape)} is not broadcastable to {shape}") from None


def _causal_offset(value, num_queries: int, num_keys: int) -> Optional[int]:
    """causal -> the diagonal offset: query i sees keys j <= i + offset (None = not causal).

    True / "top_left" is torch SDPA's `is_causal` (offset 0: the mask is aligned at the top-left corner,
    also when Nq != Nk); "bottom_right" aligns the last query with the last key (offset Nk - Nq, the
    convention of FlashAttention and of decoding with a KV cache)."""
    if value is None or value is False:
        return None
    if value is True or (isinstance(value, str) and value == "top_left"):
        return 0
    if isinstance(value, str) and value == "bottom_right":
        return num_keys - num_queries
    raise TypeError(f"causal must be a bool, 'top_left' or 'bottom_right', got {value!r}")


def _attn_mask(value, B: int, H: int, Nq: int, Nk: int, device: torch.device,
               float_dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
    """attn_mask -> bool or float32 [Bm, Hm, Nq, Nk] (Bm in {1, B}, Hm in {1, H}), contiguous.

    Broadcasting follows torch SDPA: 2 or 3 dims are padded on the left; size-1 batch and head dims stay
    size 1 (the kernels index them with stride 0), size-1 query or key dims are expanded."""
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"attn_mask must be a bool or floating-point tensor, got {type(value).__name__}")
    if value.dtype != torch.bool and not value.is_floating_point():
        raise TypeError(f"attn_mask must be bool (True = attend) or floating point (additive), got {value.dtype}")
    if value.device != device:
        raise ValueError(f"attn_mask is on {value.device} but q is on {device}")
    if not 2 <= value.dim() <= 4:  # as torch SDPA: at least [Nq, Nk]
        raise ValueError(f"attn_mask must have 2 to 4 dims broadcastable to [B, H, Nq, Nk], got shape "
                         f"{tuple(value.shape)}")
    m = value.reshape((1,) * (4 - value.dim()) + tuple(value.shape))
    shape = (B if m.shape[0] != 1 else 1, H if m.shape[1] != 1 else 1, Nq, Nk)
    try:
        m = torch.broadcast_to(m, shape)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(value.shape)} is not broadcastable to {(B, H, Nq, Nk)}") from None
    if m.is_floating_point():
        m = m.to(float_dtype)  # float32 for the kernels; float64 kept for float64 inputs (the reference)
        # Models mask with torch.finfo(dtype).min rather than -inf (HF); such values would overflow the
        # kernels' base-2 logits. Everything at or below MASK_FLOOR is masking: it becomes -inf.
        m = m.masked_fill(m <= MASK_FLOOR, float("-inf"))
    return m.contiguous()


_SEGMENTS_CACHE: dict = {}  # (boundaries, num_keys, device) -> checked int64 CPU tensor, for list inputs


def _segments(value, num_keys: int, device: torch.device) -> Optional[torch.Tensor]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype in (torch.bool,) or value.is_floating_point() or value.is_complex():
            raise TypeError(f"segments must be an integer tensor, got {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"segments must be 1-D [G+1], got shape {tuple(value.shape)}")
        if value.device.type == "meta" and device.type != "meta":  # boundaries without data cannot be copied
            raise ValueError(f"segments is on {value.device} but q is on {device}")
        bounds = value.to(device=device, dtype=torch.int64).contiguous()
        host = None if _is_tracing() else bounds.tolist()
    else:
        try:
            items = tuple(value)
            cache_key = (items, num_keys, device)
            cached = _SEGMENTS_CACHE.get(cache_key)
        except TypeError:  # not iterable, or an unhashable element: the checks below say what is wrong
            items, cache_key, cached = value, None, None
        if cached is not None:
            return cached
        try:
            host = [int(x) for x in items]
        except (TypeError, ValueError):
            raise TypeError("segments must be an integer tensor or a sequence of ints") from None
        if any(isinstance(x, float) and not float(x).is_integer() for x in items):
            raise TypeError("segments must hold integers")
        bounds = torch.tensor(host, dtype=torch.int64, device=device)
    if bounds.shape[0] < 2:
        raise ValueError(f"segments must hold G+1 >= 2 boundaries (G >= 1 segments), got {bounds.shape[0]}")
    if host is not None:
        if host[0] != 0:
            raise ValueError(f"segments must start at 0, got {host[0]}")
        if host[-1] != num_keys:
            raise ValueError(f"segments must end at Nk={num_keys}, got {host[-1]}")
        if any(b <= a for a, b in zip(host, host[1:])):
            raise ValueError(f"segments must be strictly increasing, got {host}")
    if not isinstance(value, torch.Tensor) and cache_key is not None and device.type == "cpu":
        # A probe run passes the same few boundary lists at every call; the backends only read them.
        if len(_SEGMENTS_CACHE) >= 256:
            _SEGMENTS_CACHE.clear()
        _SEGMENTS_CACHE[cache_key] = bounds
    return bounds


def _capture(value) -> tuple:
    if isinstance(value, str):
        value = (value,)
    try:
        names = list(value)
    except TypeError:
        raise TypeError(f"capture must be a sequence of names from {CAPTURE_NAMES}") from None
    for name in names:
        if not isinstance(name, str) or name not in CAPTURE_NAMES:
            raise ValueError(f"capture: unknown capture {name!r}; known: {', '.join(CAPTURE_NAMES)}")
    return tuple(n for n in CAPTURE_NAMES if n in names)


def build_plan(
    q,
    k,
    v,
    *,
    key_padding_mask=None,
    causal=False,
    attn_mask=None,
    scale: Optional[float] = None,
    segments=None,
    logit_scale: RowParam = None,
    segment_bias: RowParam = None,
    head_gate: RowParam = None,
    out_bias: RowParam = None,
    out_patch=None,
    patch_mask=None,
    capture: Sequence[str] = (),
    allowed_dtypes: tuple = REFERENCE_DTYPES,
) -> AttentionPlan:
    """Check every argument of `probed_attention` and return the normalised plan."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor, got {type(q).__name__}")
    device = q.device
    _check_tensor("q", q, 4, device)
    _check_tensor("k", k, 4, device)
    _check_tensor("v", v, 4, device)
    if q.dtype not in allowed_dtypes:
        raise TypeError(f"q has dtype {q.dtype}; supported: {', '.join(str(d) for d in allowed_dtypes)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; all of q, k, v must share one dtype")

    B, H, Nq, D = q.shape
    Bk, Hkv, Nk, Dk = k.shape
    Bv, Hv, Nv, Dv = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"batch size mismatch: q has B={B}, k has {Bk}, v has {Bv}")
    if Hv != Hkv:
        raise ValueError(f"k and v must have the same number of heads, got {Hkv} and {Hv}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q heads H={H} must be a multiple of k/v heads Hkv={Hkv}")
    if Dk != D:
        raise ValueError(f"head dim mismatch: q has D={D}, k has {Dk}")
    if Nv != Nk:
        raise ValueError(f"k has Nk={Nk} keys but v has {Nv}")
    if Nk == 0:
        raise ValueError("k must hold at least one key (Nk >= 1)")
    if D == 0 or Dv == 0:
        raise ValueError(f"head dims must be positive, got D={D}, Dv={Dv}")

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")

    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, 2, device)
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must have dtype torch.bool (True = attend), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape [B, Nk] = {(B, Nk)}, got {tuple(key_padding_mask.shape)}")
        key_padding_mask = key_padding_mask.contiguous()

    seg = _segments(segments, Nk, device)
    G = 0 if seg is None else seg.shape[0] - 1
    names = _capture(capture)
    if "segment_mass" in names and seg is None:
        raise ValueError("capture: 'segment_mass' needs segments")
    if segment_bias is not None and seg is None:
        raise ValueError("segment_bias needs segments")

    if out_patch is not None:
        _check_tensor("out_patch", out_patch, 4, device)
        if tuple(out_patch.shape) != (B, H, Nq, Dv):
            raise ValueError(f"out_patch must have shape [B, H, Nq, Dv] = {(B, H, Nq, Dv)}, got {tuple(out_patch.shape)}")
        if out_patch.dtype != q.dtype:
            raise TypeError(f"out_patch has dtype {out_patch.dtype} but q has {q.dtype}")
        if patch_mask is None:
            patch_mask = True
    elif patch_mask is not None:
        raise ValueError("patch_mask given without out_patch")

    plan = AttentionPlan(
        q=q,
        k=k,
        v=v,
        scale=scale,
        key_padding_mask=key_padding_mask,
        segments=seg,
        logit_scale=_row_param("logit_scale", logit_scale, (B, H), device),
        segment_bias=_row_param("segment_bias", segment_bias, (B, H, G), device) if seg is not None else None,
        head_gate=_row_param("head_gate", head_gate, (B, H), device),
        out_bias=_row_param("out_bias", out_bias, (B, H, Dv), device),
        out_patch=out_patch,
        patch_mask=_bool_param("patch_mask", patch_mask, (B, H), device),
        capture=names,
        causal_offset=_causal_offset(causal, Nq, Nk),
        attn_mask=_attn_mask(attn_mask, B, H, Nq, Nk, device,
                             torch.float64 if q.dtype == torch.float64 else torch.float32),
    )
    _check_values(plan)
    return plan


def capture_shapes(plan: AttentionPlan) -> dict:
    """Shapes of the requested captures (all float32)."""
    B, H, Nq, Nk, G = plan.batch, plan.heads, plan.num_queries, plan.num_keys, plan.num_segments
    shapes = {
        "lse": (B, H, Nq),
        "max": (B, H, Nq),
        "entropy": (B, H, Nq),
        "segment_mass": (B, H, Nq, G),
        "key_mass": (B, H, Nk),
    }
    return {name: shapes[name] for name in plan.capture}
