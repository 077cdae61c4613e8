"""Operator value contract: non-finite parameters and inputs are refused; rows that attend to nothing
give lse = -inf and entropy +0 on every backend; meta tensors under "auto" give meta results; and
property tests (hypothesis) of the fused CPU kernel against the float64 reference."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import latentflow_fast as lf
from latentflow_fast.numerics import NonFiniteError
from op_cases import check_against_reference, make_case

BACKENDS = [b for b in ("reference", "cpu") if b in lf.available_backends("cpu")]


def _qkv(B=2, H=2, N=6, D=8):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, N, D, generator=g), torch.randn(B, H, N, D, generator=g),
            torch.randn(B, H, N, D, generator=g))


@pytest.mark.parametrize("kwargs, match", [
    ({"logit_scale": torch.tensor([[1.0, float("nan")]])}, r"logit_scale must be finite; it holds \d+ NaN"),
    ({"logit_scale": math.inf}, "logit_scale must be finite"),
    ({"logit_scale": torch.tensor([math.inf])}, "logit_scale must be finite"),
    ({"segments": [0, 3, 6], "segment_bias": torch.tensor([0.0, math.inf])}, r"segment_bias must be finite or -inf; it holds \+inf"),
    ({"segments": [0, 3, 6], "segment_bias": math.inf}, "segment_bias must be finite or -inf"),
    ({"segments": [0, 3, 6], "segment_bias": torch.tensor([float("nan"), 0.0])}, "segment_bias .* NaN"),
    ({"head_gate": torch.tensor([[1.0, math.inf]])}, "head_gate must be finite"),
    ({"out_bias": torch.full((8,), float("nan"))}, "out_bias must be finite"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_finite_parameters_are_refused(kwargs, match, backend):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=match):
        lf.probed_attention(q, k, v, backend=backend, **kwargs)


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_finite_inputs_are_refused(name):
    q, k, v = _qkv()
    tensors = {"q": q, "k": k, "v": v}
    tensors[name][1, 0, 2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=rf"^{name} holds 1 non-finite"):
        lf.probed_attention(tensors["q"], tensors["k"], tensors["v"])
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [math.inf, -math.inf])
def test_infinite_inputs_are_refused_even_when_opposite_infinities_cancel(name, bad):
    # the check sums each input first (plan._sum_finite): +inf and -inf together must still be caught
    q, k, v = _qkv()
    tensors = {"q": q, "k": k, "v": v}
    tensors[name][0, 1, 1, 1] = bad
    tensors[name][1, 0, 0, 0] = -bad
    with pytest.raises(NonFiniteError, match=rf"^{name} holds 2 non-finite"):
        lf.probed_attention(tensors["q"], tensors["k"], tensors["v"])


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_finite_inputs_whose_sum_overflows_are_accepted(name):
    # huge finite values overflow the float32 sum of the quick check; the exact check then lets them pass
    q, k, v = _qkv()
    tensors = {"q": q, "k": k, "v": v}
    tensors[name][:, :, :2] = 3e38
    assert not math.isfinite(float(tensors[name].sum()))
    out, _ = lf.probed_attention(tensors["q"], tensors["k"], tensors["v"], backend="reference")
    assert out.shape == q.shape


def test_minus_inf_segment_bias_still_knocks_out():
    q, k, v = _qkv()
    out, cap = lf.probed_attention(q, k, v, segments=[0, 3, 6], segment_bias=torch.tensor([-math.inf, 0.0]),
                                   capture=("segment_mass",))
    assert torch.all(cap["segment_mass"][..., 0] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_attending_to_nothing_give_minus_inf_lse_and_plus_zero_entropy(backend):
    q, k, v = _qkv(B=3)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # row 1: every key padded
    bias = torch.zeros(3, 2, 2)
    bias[2, 1] = -math.inf  # row 2, head 1: every segment knocked out
    out, cap = lf.probed_attention(q, k, v, backend=backend, key_padding_mask=mask, segments=[0, 3, 6],
                                   segment_bias=bias, logit_scale=torch.tensor([1.0, 1.0, 0.0])[:, None],
                                   capture=("lse", "entropy", "segment_mass", "key_mass"))
    for b, h in ((1, 0), (1, 1), (2, 1)):
        assert torch.all(cap["lse"][b, h] == -math.inf), (backend, b, h, cap["lse"][b, h])
        assert torch.all(cap["entropy"][b, h] == 0) and not torch.signbit(cap["entropy"][b, h]).any()
        assert torch.all(out[b, h] == 0) and torch.all(cap["segment_mass"][b, h] == 0)
    assert torch.isfinite(cap["lse"][0]).all() and torch.isfinite(cap["lse"][2, 0]).all()


def test_backends_agree_bitwise_on_dead_rows():
    if "cpu" not in BACKENDS:
        pytest.skip("the fused CPU kernel is not built")
    q, k, v = _qkv()
    mask = torch.zeros(2, 6, dtype=torch.bool)
    results = [lf.probed_attention(q, k, v, backend=b, key_padding_mask=mask, capture=("lse", "entropy"))[1]
               for b in ("reference", "cpu")]
    for name in ("lse", "entropy"):
        assert torch.equal(results[0][name], results[1][name])
        assert torch.equal(torch.signbit(results[0][name]), torch.signbit(results[1][name]))


def test_auto_on_meta_tensors_gives_meta_results():
    q = torch.empty(2, 4, 5, 8, device="meta")
    k = torch.empty(2, 2, 7, 8, device="meta")
    v = torch.empty(2, 2, 7, 3, device="meta")
    out, cap = lf.probed_attention(q, k, v, segments=[0, 3, 7], logit_scale=torch.ones(2, 4, device="meta"),
                                   capture=("lse", "segment_mass", "key_mass"))
    assert out.device.type == "meta" and out.shape == (2, 4, 5, 3)
    assert cap["segment_mass"].shape == (2, 4, 5, 2) and cap["key_mass"].shape == (2, 4, 7)
    with pytest.raises(ValueError, match="backend 'cpu' runs on cpu tensors, not meta"):
        lf.probed_attention(q, k, v, backend="cpu")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(min_value=0, max_value=2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_property_cpu_matches_reference(seed, dtype):
    if "cpu" not in BACKENDS:
        pytest.skip("the fused CPU kernel is not built")
    check_against_reference(make_case(seed, dtype=dtype, max_n=40), "cpu")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_property_probabilities_are_distributions(seed):
    """For every live row: segment masses sum to 1, key masses sum to Nq, 0 <= entropy <= log(Nk)."""
    case = make_case(seed, captures=("lse", "entropy", "segment_mass", "key_mass"), interventions=("segment_bias",))
    if "segments" not in case.kwargs:
        return
    _, cap = lf.probed_attention(case.q, case.k, case.v, backend="reference", **case.kwargs)
    live = torch.isfinite(cap["lse"])  # [B, H, Nq]
    mass = cap["segment_mass"].sum(-1)
    assert torch.allclose(mass[live], torch.ones_like(mass[live]), atol=1e-5)
    assert torch.all(mass[~live] == 0)
    nk = case.k.shape[2]
    assert torch.all(cap["entropy"] >= 0) and torch.all(cap["entropy"] <= math.log(nk) + 1e-5)
    q_live = live.sum(-1).to(torch.float32)  # live queries per (row, head)
    assert torch.allclose(cap["key_mass"].sum(-1), q_live, atol=1e-4)
