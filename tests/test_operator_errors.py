"""Every malformed argument of probed_attention raises ValueError/TypeError naming the argument."""

from __future__ import annotations

import math

import pytest
import torch

from latentflow_fast.ops import probed_attention

B, H, HKV, N, D = 2, 4, 2, 6, 8


def _good():
    q = torch.randn(B, H, N, D)
    k = torch.randn(B, HKV, N, D)
    v = torch.randn(B, HKV, N, D)
    return q, k, v


def _call(overrides: dict):
    overrides = dict(overrides)
    backend = overrides.pop("backend", "cpu")
    q, k, v = _good()
    args = {"q": q, "k": k, "v": v}
    kwargs = {"segments": [0, 2, N]}
    for name, value in overrides.items():
        (args if name in args else kwargs)[name] = value
    if kwargs.get("segments", 0) is None:
        kwargs.pop("segments")
    return probed_attention(args["q"], args["k"], args["v"], backend=backend, **kwargs)


CASES = [
    # (overrides, exception, word the message must contain)
    ({"q": torch.randn(B, H, N)}, ValueError, "q"),
    ({"k": torch.randn(B, HKV, N, D, 1)}, ValueError, "k"),
    ({"v": torch.randn(HKV, N, D)}, ValueError, "v"),
    ({"q": [[1.0]]}, TypeError, "q"),
    ({"k": torch.randn(B + 1, HKV, N, D)}, ValueError, "batch"),
    ({"v": torch.randn(B, HKV + 1, N, D)}, ValueError, "heads"),
    ({"k": torch.randn(B, 3, N, D), "v": torch.randn(B, 3, N, D)}, ValueError, "Hkv"),
    ({"k": torch.randn(B, HKV, N, D + 1)}, ValueError, "head dim"),
    ({"v": torch.randn(B, HKV, N + 1, D)}, ValueError, "v"),
    ({"k": torch.randn(B, HKV, N, D, device="meta")}, ValueError, "k"),
    ({"v": torch.randn(B, HKV, N, D, dtype=torch.float64)}, TypeError, "v"),
    ({"q": torch.randint(0, 3, (B, H, N, D))}, TypeError, "q"),
    ({"scale": math.nan}, ValueError, "scale"),
    ({"scale": math.inf}, ValueError, "scale"),
    ({"scale": "big"}, TypeError, "scale"),
    ({"segments": [0, 3, 2, N]}, ValueError, "segments"),
    ({"segments": [1, 3, N]}, ValueError, "segments"),
    ({"segments": [0, 3, N - 1]}, ValueError, "segments"),
    ({"segments": [0, 3, N + 1]}, ValueError, "segments"),
    ({"segments": [0, 3, 3, N]}, ValueError, "segments"),
    ({"segments": [0]}, ValueError, "segments"),
    ({"segments": torch.tensor([N])}, ValueError, "segments"),
    ({"segments": torch.tensor([0.0, 6.0])}, TypeError, "segments"),
    ({"segments": torch.tensor([[0, N]])}, ValueError, "segments"),
    ({"segments": "0,6"}, TypeError, "segments"),
    ({"segments": torch.tensor([0, N], device="meta")}, ValueError, "segments"),
    ({"segments": [0, 2.5, N]}, TypeError, "segments"),
    ({"segments": None, "capture": ("segment_mass",)}, ValueError, "segment"),
    ({"segments": None, "segment_bias": 1.0}, ValueError, "segment_bias"),
    ({"capture": ("lse", "attention_map")}, ValueError, "capture"),
    ({"capture": 5}, TypeError, "capture"),
    ({"backend": "fastest"}, ValueError, "backend"),
    ({"backend": 3}, TypeError, "backend"),
    ({"backend": "triton"}, ValueError, "backend"),
    ({"backend": "cuda"}, ValueError, "backend"),
    ({"key_padding_mask": torch.ones(B, N)}, TypeError, "key_padding_mask"),
    ({"key_padding_mask": torch.ones(B, N + 1, dtype=torch.bool)}, ValueError, "key_padding_mask"),
    ({"key_padding_mask": torch.ones(N, dtype=torch.bool)}, ValueError, "key_padding_mask"),
    ({"key_padding_mask": torch.ones(B, N, dtype=torch.bool, device="meta")}, ValueError, "key_padding_mask"),
    ({"logit_scale": torch.ones(3)}, ValueError, "logit_scale"),
    ({"logit_scale": math.nan}, ValueError, "logit_scale"),
    ({"logit_scale": torch.ones(B, H, dtype=torch.int64)}, TypeError, "logit_scale"),
    ({"logit_scale": True}, TypeError, "logit_scale"),
    ({"logit_scale": "x"}, TypeError, "logit_scale"),
    ({"segment_bias": torch.ones(B, H, 3)}, ValueError, "segment_bias"),
    ({"head_gate": torch.ones(B, H, 2)}, ValueError, "head_gate"),
    ({"head_gate": torch.ones(B, H, device="meta")}, ValueError, "head_gate"),
    ({"out_bias": torch.ones(D + 1)}, ValueError, "out_bias"),
    ({"out_patch": torch.ones(B, H, N, D + 1)}, ValueError, "out_patch"),
    ({"out_patch": torch.ones(B, H, N)}, ValueError, "out_patch"),
    ({"out_patch": torch.ones(B, H, N, D, dtype=torch.bfloat16)}, TypeError, "out_patch"),
    ({"out_patch": torch.ones(B, H, N, D), "patch_mask": torch.ones(B, H)}, TypeError, "patch_mask"),
    ({"out_patch": torch.ones(B, H, N, D), "patch_mask": torch.ones(3, dtype=torch.bool)}, ValueError, "patch_mask"),
    ({"patch_mask": torch.ones(B, H, dtype=torch.bool)}, ValueError, "patch_mask"),
]


@pytest.mark.parametrize("overrides,exc,word", CASES, ids=[f"{i}-{'+'.join(c[0])}" for i, c in enumerate(CASES)])
def test_bad_argument(overrides, exc, word):
    with pytest.raises(exc) as info:
        _call(overrides)
    assert word.lower() in str(info.value).lower(), str(info.value)


def test_cpu_backend_rejects_other_devices():
    q, k, v = (t.to("meta") for t in _good())
    with pytest.raises(ValueError, match="backend"):
        probed_attention(q, k, v, backend="cpu")


def test_float64_needs_reference_backend():
    q, k, v = (t.double() for t in _good())
    with pytest.raises(TypeError, match="reference"):
        probed_attention(q, k, v, backend="cpu")
    probed_attention(q, k, v, backend="reference")


def test_good_call_passes():
    out, caps = _call({"capture": ("lse", "segment_mass")})
    assert out.shape == (B, H, N, D) and caps["segment_mass"].shape == (B, H, N, 2)


def test_native_core_checks_its_own_arguments():
    """The compiled core rejects what would make it read out of bounds, even when called directly."""
    from latentflow_fast import _C

    q, k, v = _good()
    out = torch.empty(B, H, N, D)
    common = dict(dtype=0, batch=B, heads=H, kv_heads=HKV, num_queries=N, num_keys=N, head_dim=D, value_dim=D,
                  q=q.data_ptr(), q_strides=list(q.stride()), k=k.data_ptr(), k_strides=list(k.stride()),
                  v=v.data_ptr(), v_strides=list(v.stride()), out=out.data_ptr(), scale=1.0)
    _C.probed_attention_cpu(**common)
    bad_segments = torch.tensor([0, 4, 3, N])
    with pytest.raises(ValueError, match="segments"):
        _C.probed_attention_cpu(**common, segments=bad_segments.data_ptr(), num_segments=3)
    with pytest.raises(ValueError, match="kv_heads"):
        _C.probed_attention_cpu(**{**common, "kv_heads": 3})
    with pytest.raises(ValueError, match="null"):
        _C.probed_attention_cpu(**{**common, "q": 0})
    with pytest.raises(ValueError, match="unknown field"):
        _C.probed_attention_cpu(**common, attention_map=1)


def test_segment_lists_are_checked_at_every_call_despite_the_cache():
    """Boundary lists are converted once and cached per (boundaries, Nk, device); a list valid for one key
    count must still be refused for another, and iterators and numpy integers work as lists do."""
    import numpy as np

    q, k, v = _good()
    first, _ = probed_attention(q, k, v, segments=[0, 2, N], capture=("segment_mass",), backend="reference")
    again, caps = probed_attention(q, k, v, segments=iter([0, 2, N]), capture=("segment_mass",),
                                   backend="reference")
    assert torch.equal(first, again) and caps["segment_mass"].shape == (B, H, N, 2)
    _, caps = probed_attention(q, k, v, segments=[np.int64(0), np.int64(2), np.int64(N)],
                               capture=("segment_mass",), backend="reference")
    assert caps["segment_mass"].shape[-1] == 2
    short_k, short_v = k[:, :, :N - 1], v[:, :, :N - 1]
    with pytest.raises(ValueError, match="segments must end"):
        probed_attention(q, short_k, short_v, segments=[0, 2, N])
    with pytest.raises(ValueError, match="strictly increasing"):
        probed_attention(q, k, v, segments=(0, 2, 2, N))
