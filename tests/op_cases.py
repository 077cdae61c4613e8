"""Random probed-attention cases shared by every backend's differential tests.

`make_case(seed, ...)` draws a shape, a mask pattern and a set of interventions/captures from a seeded
generator; `check_against_reference` runs a backend and the float64 reference on the same plan and
compares every output with the contract's tolerance (relative 2-norm error).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from latentflow_fast.ops import CAPTURE_NAMES, build_plan, probed_attention
from latentflow_fast.ops.reference import reference_attention

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
INTERVENTIONS = ("logit_scale", "segment_bias", "head_gate", "out_bias", "out_patch")


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    description: str = ""


def _maybe_noncontiguous(t: torch.Tensor, rng: random.Random) -> torch.Tensor:
    """Return the same values with a non-contiguous layout (transposed storage or a strided slice)."""
    choice = rng.random()
    if choice < 0.33:
        return t
    if choice < 0.66:  # storage in [B, N, H, D] order, viewed as [B, H, N, D]
        return t.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2, dtype=t.dtype, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


def make_case(
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    max_n: int = 96,
    head_dims: tuple = (1, 3, 8, 16, 33, 64),
    interventions: tuple | None = None,
    captures: tuple | None = None,
) -> Case:
    """A seeded random case. `interventions`/`captures` None = a random subset of each."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B = rng.choice([1, 2, 3])
    Hkv = rng.choice([1, 2])
    H = Hkv * rng.choice([1, 2, 3])
    Nq = rng.choice([1, 2, rng.randint(1, max_n)])
    Nk = rng.choice([1, 3, rng.randint(1, max_n)])
    D = rng.choice(head_dims)
    Dv = D if rng.random() < 0.7 else rng.choice(head_dims)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    # Logits of order a few units so the softmax is neither flat nor one-hot.
    q = _maybe_noncontiguous(randn(B, H, Nq, D, scale=1.5), rng)
    k = _maybe_noncontiguous(randn(B, Hkv, Nk, D, scale=1.5), rng)
    v = _maybe_noncontiguous(randn(B, Hkv, Nk, Dv), rng)

    kwargs: dict = {}
    desc = [f"B={B} H={H} Hkv={Hkv} Nq={Nq} Nk={Nk} D={D} Dv={Dv} {dtype}"]
    if rng.random() < 0.6:
        mask = torch.rand(B, Nk, generator=gen) < rng.choice([0.5, 0.8, 1.0])
        if B > 1 and rng.random() < 0.5:
            mask[rng.randrange(B)] = False  # a fully masked row
        kwargs["key_padding_mask"] = mask.to(device)
        desc.append("mask")
    G = rng.randint(1, min(Nk, 6))
    cuts = sorted(rng.sample(range(1, Nk), G - 1)) if G > 1 else []
    segments = [0] + cuts + [Nk]
    use_segments = rng.random() < 0.8
    if use_segments:
        kwargs["segments"] = torch.tensor(segments, device=device) if rng.random() < 0.5 else segments

    chosen = interventions if interventions is not None else tuple(i for i in INTERVENTIONS if rng.random() < 0.4)
    for name in chosen:
        if name == "logit_scale":
            values = torch.tensor([0.0, 0.5, 1.0, 2.0])[torch.randint(0, 4, (B, H), generator=gen)]
            kwargs["logit_scale"] = values.to(device) if rng.random() < 0.7 else rng.choice([0.0, 0.7, 1.0])
        elif name == "segment_bias" and use_segments:
            bias = torch.randn(B, H, G, generator=gen)
            bias[torch.rand(B, H, G, generator=gen) < 0.25] = -math.inf
            kwargs["segment_bias"] = bias.to(device) if rng.random() < 0.7 else bias[:1, :1].to(device)
        elif name == "head_gate":
            kwargs["head_gate"] = (torch.rand(B, H, generator=gen) < 0.5).float().to(device)
        elif name == "out_bias":
            kwargs["out_bias"] = torch.randn(B, H, Dv, generator=gen).to(device)
        elif name == "out_patch":
            kwargs["out_patch"] = randn(B, H, Nq, Dv)
            kwargs["patch_mask"] = (torch.rand(B, H, generator=gen) < 0.5).to(device)
        else:
            continue
        desc.append(name)

    wanted = captures if captures is not None else tuple(c for c in CAPTURE_NAMES if rng.random() < 0.6)
    if not use_segments:
        wanted = tuple(c for c in wanted if c != "segment_mass")
    kwargs["capture"] = wanted
    desc.append("capture=" + ",".join(wanted))
    return Case(q, k, v, kwargs, " ".join(desc))


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative 2-norm error over the finite entries; infinities must match exactly."""
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    inf_expected = torch.isinf(expected)
    if not torch.equal(torch.isinf(actual), inf_expected) or not torch.equal(actual[inf_expected], expected[inf_expected]):
        return math.inf
    if torch.isnan(actual).any():
        return math.inf
    finite = ~inf_expected
    diff = (actual[finite] - expected[finite]).norm()
    scale = expected[finite].norm()
    if scale == 0:
        return float(diff)
    return float(diff / scale)


def check_against_reference(case: Case, backend: str) -> None:
    """Assert that `backend` matches the float64 reference on `case` within the contract's tolerance."""
    out, captures = probed_attention(case.q, case.k, case.v, backend=backend, **case.kwargs)
    plan = build_plan(case.q, case.k, case.v, **case.kwargs)
    ref_out, ref_captures = reference_attention(plan, torch.float64)
    tol = TOLERANCE[case.q.dtype]
    assert out.dtype == case.q.dtype, case.description
    assert out.shape == ref_out.shape, case.description
    err = rel_error(out, ref_out)
    assert err <= tol, f"out: rel err {err:.3g} > {tol} for {case.description}"
    assert set(captures) == set(ref_captures), case.description
    for name, ref in ref_captures.items():
        got = captures[name]
        assert got.dtype == torch.float32, f"{name} dtype {got.dtype}"
        assert got.shape == ref.shape, f"{name} shape {tuple(got.shape)} vs {tuple(ref.shape)}"
        err = rel_error(got, ref)
        assert err <= tol, f"{name}: rel err {err:.3g} > {tol} for {case.description}"
