"""Random probed-attention cases shared by every backend's differential tests.

`make_case(seed, ...)` draws a shape, a mask pattern and a set of interventions/captures from a seeded
generator; `check_against_reference` runs a backend and the float64 reference on the same plan and
compares every output two ways (`assert_matches_reference`):
  * the contract's tolerance on the relative 2-norm error over the whole tensor, and
  * a per-row max-abs check, which sees a local error the norm averages away (one wrong output row in
    32,768, an lse off by 1 nat): every row's max |actual - expected| must stay within
    ROW_TOLERANCE = atol + rtol * max |expected| of that row (atol, rtol from the dtype). A row is the
    last dim of out [B,H,Nq,Dv] and segment_mass [B,H,Nq,G]; each entry of lse/max/entropy/key_mass is
    its own row.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch

from latentflow_fast.ops import CAPTURE_NAMES, build_plan, probed_attention
from latentflow_fast.ops.reference import reference_attention

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}
# Per-row max-abs tolerance (atol, rtol): bf16 keeps 8 significant bits (out rounding alone is up to
# 2^-9 relative), fp16 11, float32 24 (with float32 accumulation over thousands of keys).
ROW_TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (1e-2, 1e-2)}
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
    query_masks: bool = False,
) -> Case:
    """A seeded random case. `interventions`/`captures` None = a random subset of each. `query_masks`: also
    draw causal and/or an attn_mask (drawn last, so the other draws of a seed do not change)."""
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
    if query_masks:
        desc.append(_draw_query_masks(rng, gen, kwargs, B, H, Nq, Nk, device))
    return Case(q, k, v, kwargs, " ".join(desc))


def _draw_query_masks(rng: random.Random, gen: torch.Generator, kwargs: dict, B: int, H: int, Nq: int, Nk: int,
                      device: str) -> str:
    """Add causal and/or attn_mask to kwargs: at least one of them, every broadcast shape, bool or additive
    float masks with -inf entries, and sometimes fully masked query rows or key tiles."""
    kind = rng.choice(["causal", "bottom_right", "bool", "float", "causal+bool", "causal+float"])
    desc = [kind]
    if kind.startswith("causal"):
        kwargs["causal"] = True
    elif kind == "bottom_right":
        kwargs["causal"] = "bottom_right"
    if "bool" in kind or "float" in kind:
        bm = B if rng.random() < 0.6 else 1
        hm = H if rng.random() < 0.5 else 1
        shape = [bm, hm, Nq, Nk]
        if rng.random() < 0.25:  # a [B, 1, 1, Nk] padding-style mask (query dim broadcast)
            shape[2] = 1
        if "bool" in kind:
            mask = torch.rand(*shape, generator=gen) < rng.choice([0.3, 0.7, 0.95])
        else:
            mask = torch.randn(*shape, generator=gen) * 2.0
            mask[torch.rand(*shape, generator=gen) < rng.choice([0.0, 0.3])] = -math.inf
        if shape[2] > 1 and rng.random() < 0.4:  # a query row that sees no key
            mask[..., rng.randrange(shape[2]), :] = False if mask.dtype == torch.bool else -math.inf
        if rng.random() < 0.3 and shape[0] == 1 and shape[1] == 1 and shape[2] == Nq:
            mask = mask[0, 0]  # 2-D [Nq, Nk], broadcast like torch SDPA
        kwargs["attn_mask"] = mask.to(device)
        desc.append(f"attn_mask{tuple(mask.shape)}")
    return " ".join(desc)


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


def row_error(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> tuple[float, tuple]:
    """The worst row's max-abs error over its tolerance (<= 1 passes) and that row's index.

    Rows are the last dim of 4-D tensors (out, segment_mass); entries of 3-D ones are rows of one.
    Infinite expected entries must match exactly and NaN never passes (error inf).
    """
    actual = actual.double().cpu()
    expected = expected.double().cpu()
    if actual.shape != expected.shape:
        return math.inf, ()
    if expected.dim() < 4:
        actual, expected = actual.unsqueeze(-1), expected.unsqueeze(-1)
    atol, rtol = ROW_TOLERANCE[dtype]
    inf_expected = torch.isinf(expected)
    bad = torch.isnan(actual) | (inf_expected & (actual != expected)) | (~inf_expected & torch.isinf(actual))
    finite_expected = torch.where(inf_expected, torch.zeros_like(expected), expected)
    diff = torch.where(inf_expected | bad, torch.zeros_like(actual), actual - finite_expected).abs().amax(dim=-1)
    bound = atol + rtol * finite_expected.abs().amax(dim=-1)
    ratio = torch.where(bad.any(dim=-1), torch.full_like(diff, math.inf), diff / bound)
    if ratio.numel() == 0:
        return 0.0, ()
    worst = int(torch.argmax(torch.nan_to_num(ratio, posinf=1e300)))
    return float(ratio.flatten()[worst]), tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ratio.shape))


def reference_errors(name: str, actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> list[str]:
    """Failures of one output against the reference (empty when it passes both checks)."""
    failures = []
    err = rel_error(actual, expected)
    if not err <= TOLERANCE[dtype]:
        failures.append(f"{name}: rel err {err:.3g} > {TOLERANCE[dtype]}")
    ratio, row = row_error(actual, expected, dtype)
    if not ratio <= 1.0:
        atol, rtol = ROW_TOLERANCE[dtype]
        failures.append(f"{name}: row {row} max-abs error {ratio:.3g}x its tolerance ({atol} + {rtol} * row max)")
    return failures


def assert_matches_reference(outputs: dict, reference: dict, dtype: torch.dtype, context: str = "") -> None:
    """Assert every named output passes the norm and per-row checks against its float64 reference."""
    assert set(outputs) == set(reference), (sorted(outputs), sorted(reference), context)
    failures = [f for name in reference for f in reference_errors(name, outputs[name], reference[name], dtype)]
    assert not failures, "; ".join(failures) + (f" for {context}" if context else "")


def check_against_reference(case: Case, backend: str) -> None:
    """Assert that `backend` matches the float64 reference on `case` within the contract's tolerance."""
    out, captures = probed_attention(case.q, case.k, case.v, backend=backend, **case.kwargs)
    plan = build_plan(case.q, case.k, case.v, **case.kwargs)
    ref_out, ref_captures = reference_attention(plan, torch.float64)
    assert out.dtype == case.q.dtype, case.description
    assert out.shape == ref_out.shape, case.description
    assert set(captures) == set(ref_captures), case.description
    for name, ref in ref_captures.items():
        got = captures[name]
        assert got.dtype == torch.float32, f"{name} dtype {got.dtype}"
        assert got.shape == ref.shape, f"{name} shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert_matches_reference({"out": out, **captures}, {"out": ref_out, **ref_captures}, case.q.dtype,
                             case.description)
