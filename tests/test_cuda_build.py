"""The CUDA backend as CI sees it (CPU only): the build reports CUDA when nvcc was present, the launch
functions exist and reject bad arguments with ValueError before touching a GPU, and a CPU-only machine
imports cleanly and does not offer the "cuda" backend."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import latentflow_fast
from latentflow_fast.ops import available_backends, build_plan, probed_attention, unavailable_reason
from latentflow_fast.ops import backend_cuda

_C = pytest.importorskip("latentflow_fast._C")

CUDA_DISABLED = os.environ.get("LATENTFLOW_WITH_CUDA", "ON").upper() in ("OFF", "0", "FALSE", "NO")
NVCC = shutil.which("nvcc") or next(
    (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc",) if p.exists()), None
)
needs_cuda_build = pytest.mark.skipif(not getattr(_C, "has_cuda", False), reason="built without CUDA kernels")


@pytest.mark.skipif(NVCC is None or CUDA_DISABLED, reason="no nvcc at build time (or LATENTFLOW_WITH_CUDA=OFF)")
def test_build_with_nvcc_has_cuda():
    assert _C.has_cuda is True


@needs_cuda_build
def test_launch_functions_and_build_info():
    assert callable(_C.cuda_probed_attention_forward)
    assert callable(_C.cuda_probed_attention_key_mass)
    assert tuple(_C.cuda_kernel_names) == ("latentflow_probed_attn_fwd_cuda", "latentflow_probed_attn_key_mass_cuda")
    info = _C.cuda_build_info()
    assert int(info["nvcc"].split(".")[0]) >= 12
    assert 800 in info["archs"] and 900 in info["archs"], info


def _args(**overrides):
    args = dict(
        dtype="bfloat16", device=0, batch=1, heads=2, kv_heads=1, num_queries=16, num_keys=16, head_dim=64,
        value_dim=64, num_segments=0, scale=0.125, q=4096, q_stride=(2048, 1024, 64), k=8192,
        k_stride=(1024, 1024, 64), v=12288, v_stride=(1024, 1024, 64), out=16384, key_padding_mask=0, segments=0,
        logit_scale=0, segment_bias=0, head_gate=0, out_bias=0, out_patch=0, out_patch_stride=(0, 0, 0, 0),
        patch_mask=0, lse=0, max=0, entropy=0, segment_mass=0, key_mass=0,
    )
    args.update(overrides)
    return args


@needs_cuda_build
@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(dtype="float32"), "dtype"),
        (dict(head_dim=32, value_dim=32), "head_dim"),
        (dict(value_dim=128), "value_dim"),
        (dict(kv_heads=3), "kv_heads"),
        (dict(q=4100), "16-byte"),
        (dict(q_stride=(2048, 1024, 60)), "stride"),
        (dict(num_segments=2), "segments"),
        (dict(out_patch=20480), "patch_mask"),
    ],
)
def test_forward_launcher_rejects_bad_arguments(overrides, match):
    # Validation happens before any CUDA call, so this runs (and must not crash) without a GPU.
    with pytest.raises(ValueError, match=match):
        _C.cuda_probed_attention_forward(_args(**overrides), 0)


@needs_cuda_build
def test_key_mass_launcher_needs_lse_and_missing_keys_raise():
    with pytest.raises(ValueError, match="lse"):
        _C.cuda_probed_attention_key_mass(_args(key_mass=20480), 0)
    args = _args()
    del args["scale"]
    with pytest.raises(ValueError, match="scale"):
        _C.cuda_probed_attention_forward(args, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_only_machine_does_not_offer_cuda():
    assert "cuda" not in available_backends()
    assert "cuda" not in available_backends("cuda")
    reason = unavailable_reason("cuda")
    assert reason is not None and ("no CUDA device" in reason or "without CUDA" in reason or "not built" in reason)
    assert backend_cuda.unavailable_reason() == reason


def test_backend_cuda_with_cpu_tensors_raises_value_error():
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="backend"):
        probed_attention(q, q, q, backend="cuda")


def test_supports_and_prefer_on_cpu_plans():
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    plan = build_plan(q, q, q)
    assert not backend_cuda.supports(plan)
    assert "CUDA tensors" in backend_cuda.unsupported_reason(plan)
    assert backend_cuda.prefer(plan) == "triton"


def test_import_without_gpu_is_clean():
    assert hasattr(latentflow_fast, "__version__") or latentflow_fast.__name__ == "latentflow_fast"
    import latentflow_fast.ops.backend_cuda as module  # importing never touches CUDA

    assert module.SUPPORTED_HEAD_DIMS == (64, 128)


def test_rows_per_warp_setting(monkeypatch):
    monkeypatch.delenv(backend_cuda.ROWS_PER_WARP_ENV, raising=False)
    assert backend_cuda.rows_per_warp(torch.device("cpu")) == 32
    assert backend_cuda.rows_per_warp(torch.device("cpu"), query_masks=True) == 16  # the spill-free choice
    monkeypatch.setenv(backend_cuda.ROWS_PER_WARP_ENV, "32")
    assert backend_cuda.rows_per_warp(torch.device("cpu"), query_masks=True) == 32  # the variable wins
    monkeypatch.setenv(backend_cuda.ROWS_PER_WARP_ENV, "16")
    assert backend_cuda.rows_per_warp() == 16
    monkeypatch.setenv(backend_cuda.ROWS_PER_WARP_ENV, "48")
    with pytest.raises(ValueError, match=backend_cuda.ROWS_PER_WARP_ENV):
        backend_cuda.rows_per_warp()


@needs_cuda_build
def test_launcher_rejects_bad_rows_per_warp():
    with pytest.raises(ValueError, match="rows_per_warp"):
        _C.cuda_probed_attention_forward(_args(rows_per_warp=8), 0)
