"""Fused CPU passes of the DiT block (csrc/dit_fused_cpu.cpp), used by `models/dit.py` in float32 inference.

At the stand-in models' sizes a DiT block's element-wise work (q/k RMSNorm, RoPE, the strided head split,
adaLN's norm + modulate) is ~80 small torch ops whose dispatch and thread fork/join cost more than their
arithmetic. Two native passes do the same work in one loop each:

- `head_norm_rope(x, n_heads, weight, eps, cos, sin)`: [B, T, H*hd] -> contiguous [B, H, T, hd], strided heads
  split, RMSNorm over hd times weight, then RoPE (adjacent pairs) when cos / sin are given;
- `norm_modulate(x, weight, eps, shift, scale)`: RMSNorm over D times weight, then x * (1 + scale) + shift.

They agree with the torch ops to float32 rounding (the mean of squares is summed in double; tested against
a float64 reference and the torch path), and each row's result is independent of the batch size and the
thread count, as the probe engine's exact mode needs. The torch ops run instead whenever the fused pass
does not apply: other devices or dtypes, autograd through the inputs, torch.compile tracing, tensor
subclasses, a missing native build, or `LATENTFLOW_FUSED_DIT=0` (read at every call) for debugging.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

FUSED_ENV = "LATENTFLOW_FUSED_DIT"

_native_module = None
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)  # not FakeTensor, functional or other subclasses


def _native():
    """The native module when it has the DiT passes, else False (looked up once)."""
    global _native_module
    if _native_module is None:
        try:
            from latentflow_fast import _C  # noqa: PLC0415
        except ImportError:
            _native_module = False
        else:
            _native_module = _C if hasattr(_C, "norm_modulate_cpu") else False
    return _native_module


def applies(*tensors: Optional[torch.Tensor]) -> bool:
    """True when the fused passes can stand in for the torch ops on these tensors (None entries ignored)."""
    if os.environ.get(FUSED_ENV, "1") == "0" or not _native():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSOR_TYPES or t.device.type != "cpu" or t.dtype != torch.float32 or (grad and t.requires_grad):
            return False
    return not torch.compiler.is_compiling()


def head_norm_rope(x: torch.Tensor, n_heads: int, weight: Optional[torch.Tensor], eps: float,
                   cos: Optional[torch.Tensor] = None, sin: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, T, H*hd] (channel stride 1) -> contiguous [B, H, T, hd]; see the module docstring."""
    B, T, D = x.shape
    hd = D // n_heads
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight is not None:
        weight = weight.contiguous()
    if cos is not None:
        cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(B, n_heads, T, hd, dtype=x.dtype)
    _native().head_norm_rope_cpu(
        x.data_ptr(), x.stride(0), x.stride(1), B, T, n_heads, hd,
        0 if weight is None else weight.data_ptr(), float(eps),
        0 if cos is None else cos.data_ptr(), 0 if sin is None else sin.data_ptr(),
        out.data_ptr(), torch.get_num_threads())
    return out


def norm_modulate(x: torch.Tensor, weight: torch.Tensor, eps: float, shift: torch.Tensor,
                  scale: torch.Tensor) -> Optional[torch.Tensor]:
    """(RMSNorm(x) * weight) * (1 + scale) + shift for x [B, T, D] and shift / scale [B or 1, 1, D].

    Returns None when the modulation's layout does not fit the pass (the caller then runs the torch ops)."""
    B, T, D = x.shape
    if (shift.dim() != 3 or shift.shape[1:] != (1, D) or scale.shape != shift.shape or shift.shape[0] not in (1, B)
            or shift.stride(-1) != 1 or scale.stride(-1) != 1 or shift.stride(0) != scale.stride(0)):
        return None
    x = x.contiguous()
    weight = weight.contiguous()
    out = torch.empty_like(x)
    _native().norm_modulate_cpu(
        x.data_ptr(), B, T, D, weight.data_ptr(), float(eps), shift.data_ptr(), scale.data_ptr(),
        shift.stride(0) if shift.shape[0] > 1 else 0, out.data_ptr(), torch.get_num_threads())
    return out
