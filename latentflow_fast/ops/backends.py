"""Backend registry: which implementations of probed attention exist, and which one "auto" picks.

Each backend module exposes `unavailable_reason() -> Optional[str]` (None when usable here) and
`run(plan) -> (out, captures)`. Modules are imported lazily so a CPU-only install never imports
Triton or CUDA code paths it cannot use.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .plan import AttentionPlan

BACKEND_NAMES = ("reference", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "latentflow_fast.ops.backend_reference",
    "cpu": "latentflow_fast.ops.backend_cpu",
    "triton": "latentflow_fast.ops.backend_triton",
    "cuda": "latentflow_fast.ops.backend_cuda",
}
# Devices each backend computes on.
_DEVICES = {"reference": ("cpu", "cuda"), "cpu": ("cpu",), "triton": ("cuda",), "cuda": ("cuda",)}


@dataclass(frozen=True)
class GpuRule:
    """One row of the GPU dispatch table: plans on devices of compute capability in [min_cc, max_cc]
    (and, when given, of these dtypes / head dims) prefer `backend`."""

    min_cc: tuple
    max_cc: tuple
    backend: str  # "cuda" or "triton"
    dtypes: Optional[tuple] = None     # e.g. (torch.bfloat16,); None = any
    head_dims: Optional[tuple] = None  # None = any
    evidence: str = ""


# The GPU dispatch table for backend="auto" when both GPU kernels can run a plan. First matching row
# wins; no row, or "cuda" for a plan the CUDA kernel does not support (backend_cuda.supports), gives
# Triton. Rows come from evidence: a measurement run (benchmarks/attention_gpu.py prints the winner per
# shape) replaces or refines them.
GPU_DISPATCH = (
    GpuRule((9, 0), (99, 99), "triton",
            evidence="static, not measured: Triton's forward issues wgmma on sm_90+ (kernels/triton_codegen.py); "
                     "the CUDA kernel uses the older mma.sync"),
    GpuRule((8, 0), (8, 9), "cuda",
            evidence="static, not measured: both use mma.sync on sm_8x; the CUDA kernel is hand-tiled for it"),
)


def preferred_gpu_backend(capability: tuple, dtype: torch.dtype, head_dim: int, cuda_supported: bool,
                          table: tuple = GPU_DISPATCH) -> str:
    """The GPU dispatch rule as a pure function of the device and the plan (see GPU_DISPATCH)."""
    for rule in table:
        if not rule.min_cc <= tuple(capability) <= rule.max_cc:
            continue
        if rule.dtypes is not None and dtype not in rule.dtypes:
            continue
        if rule.head_dims is not None and head_dim not in rule.head_dims:
            continue
        return "cuda" if rule.backend == "cuda" and cuda_supported else "triton"
    return "triton"


def _devices(name: str) -> tuple:
    # Triton's interpreter (TRITON_INTERPRET=1) runs its kernels on CPU tensors: tests without a GPU.
    if name == "triton" and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return _DEVICES[name] + ("cpu",)
    return _DEVICES[name]


def _module(name: str):
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError as exc:  # a backend whose module or dependencies are missing is just unavailable
        return exc


def unavailable_reason(name: str, device_type: Optional[str] = None) -> Optional[str]:
    """Why backend `name` cannot run (on `device_type`, if given), or None when it can."""
    if name not in BACKEND_NAMES:
        return f"unknown backend {name!r}; known: {', '.join(BACKEND_NAMES)}"
    if device_type is not None and device_type not in _devices(name):
        return f"backend {name!r} runs on {'/'.join(_devices(name))} tensors, not {device_type}"
    module = _module(name)
    if isinstance(module, ImportError):
        return f"backend {name!r} is not available: {module}"
    return module.unavailable_reason()


def available_backends(device_type: Optional[str] = None) -> list[str]:
    """Names of the backends usable in this installation (optionally for one device type)."""
    return [n for n in BACKEND_NAMES if unavailable_reason(n, device_type) is None]


def choose_backend(plan: AttentionPlan) -> str:
    """The "auto" rule: the fastest available kernel for the tensors' device.

    CPU tensors use the fused C++ kernel; CUDA tensors use the GPU dispatch table (GPU_DISPATCH, through
    `backend_cuda.prefer`) when both GPU kernels exist; float64 and anything no kernel supports fall back
    to the reference.
    """
    device_type = plan.q.device.type
    if plan.q.dtype == torch.float64:
        return "reference"
    if device_type == "cpu":
        return "cpu" if unavailable_reason("cpu") is None else "reference"
    if device_type == "cuda":
        triton_ok = unavailable_reason("triton") is None
        cuda_ok = unavailable_reason("cuda") is None and _module("cuda").supports(plan)
        if triton_ok and cuda_ok:
            return _module("cuda").prefer(plan)
        if cuda_ok:
            return "cuda"
        if triton_ok:
            return "triton"
    return "reference"


def resolve(backend: str, plan: AttentionPlan) -> str:
    """The backend that runs `plan`: "auto" applies `choose_backend`; a named backend must be usable."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        return choose_backend(plan)
    reason = unavailable_reason(backend, plan.q.device.type)
    if reason is None and backend == "cuda":
        reason = _module("cuda").unsupported_reason(plan)
    if reason is not None:
        raise ValueError(f"backend: {reason}")
    return backend


def runner(name: str) -> Callable:
    return _module(name).run
