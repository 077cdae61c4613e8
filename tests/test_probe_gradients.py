"""Gradients of probed attention (ops/autograd.py): gradcheck in float64, the float32 backends against
eager autograd of a float64 oracle, block boundaries of the recompute, and backward through traced runs
(plain .backward(), bwd_hooks, attribution patching)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentflow_fast.ops import autograd as op_autograd
from latentflow_fast.ops import probed_attention
from latentflow_fast.probe.hooks import run_with_hooks, trace

B, H, HKV, NQ, NK, D = 2, 4, 2, 5, 7, 3
SEGMENTS = [0, 3, 7]
CAPS = ("lse", "max", "entropy", "segment_mass", "key_mass")


def _inputs(dtype, seed=0, masked=True):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dt=dtype, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dt).requires_grad_()

    params = dict(q=r(B, H, NQ, D, s=1.5), k=r(B, HKV, NK, D, s=1.5), v=r(B, HKV, NK, D),
                  logit_scale=r(B, H, dt=torch.float32), segment_bias=r(H, 2, dt=torch.float32),
                  head_gate=r(B, H, dt=torch.float32), out_bias=r(H, D, dt=torch.float32),
                  out_patch=r(B, H, NQ, D))
    kpm = torch.ones(B, NK, dtype=torch.bool)
    if masked:
        kpm[1, 5:] = False
    fixed = dict(key_padding_mask=kpm, segments=SEGMENTS, patch_mask=torch.tensor([[1, 0, 0, 0], [0, 0, 1, 0]]).bool())
    return params, fixed


def _oracle(p, fixed):
    """Eager float64 attention following the contract, written so that its autograd is NaN-free at masked
    keys (the entropy uses p * log p only where p > 0)."""
    q, k, v = (p[n].double() for n in ("q", "k", "v"))
    k, v = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
    seg = torch.bucketize(torch.arange(NK), torch.tensor(SEGMENTS[1:]), right=True)
    s = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(D) * p["logit_scale"].double()[:, :, None, None]
    s = s + p["segment_bias"].double().expand(B, H, 2)[:, :, seg][:, :, None, :]
    s = s.masked_fill(~fixed["key_padding_mask"][:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, -1)
    logp = s - lse[..., None]
    prob = logp.exp()
    out = prob @ v
    out = torch.where(fixed["patch_mask"][:, :, None, None], p["out_patch"].double(), out)
    out = out * p["head_gate"].double()[:, :, None, None] + p["out_bias"].double()[None, :, None, :]
    safe_logp = torch.where(prob > 0, logp, torch.zeros_like(logp))
    caps = {"lse": lse, "max": s.amax(-1), "entropy": -(prob * safe_logp).sum(-1),
            "segment_mass": torch.stack([prob[..., a:b].sum(-1) for a, b in zip(SEGMENTS, SEGMENTS[1:])], -1),
            "key_mass": prob.sum(2)}
    return out, caps


def _weighted_loss(out, caps, weights):
    return sum((t.double() * w).sum() for t, w in zip([out] + [caps[n] for n in CAPS], weights))


def test_gradcheck_float64_reference_out_and_inputs():
    """torch.autograd.gradcheck of out w.r.t. q, k, v (GQA, masked keys, segments, logit scale, segment bias,
    gate, patch). Row parameters are float32 by contract (plan.py), so their gradients are checked against
    the float64 oracle below instead; captures are float32 outputs, likewise."""
    params, fixed = _inputs(torch.float64)
    q, k, v = params["q"], params["k"], params["v"]
    rest = {n: params[n].detach() for n in ("logit_scale", "segment_bias", "head_gate", "out_bias", "out_patch")}

    def f(q, k, v):
        return probed_attention(q, k, v, backend="reference", capture=CAPS, **fixed, **rest)[0]

    assert torch.autograd.gradcheck(f, (q, k, v), atol=1e-6, rtol=1e-5)


def test_gradcheck_float64_plain_attention():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, n, 4, generator=g, dtype=torch.float64).requires_grad_() for n in (6, 9, 9))
    assert torch.autograd.gradcheck(lambda q, k, v: probed_attention(q, k, v, backend="reference")[0], (q, k, v))


@pytest.mark.parametrize("backend,dtype,tol", [("reference", torch.float64, 1e-6), ("reference", torch.float32, 5e-6),
                                               ("cpu", torch.float32, 5e-6)])
@pytest.mark.parametrize("masked", [False, True])
def test_all_gradients_match_eager_float64_autograd(backend, dtype, tol, masked):
    """Every differentiable input, through out and all five captures, against the oracle's autograd."""
    params, fixed = _inputs(dtype, seed=1, masked=masked)
    out, caps = probed_attention(params["q"], params["k"], params["v"], backend=backend, capture=CAPS, **fixed,
                                 **{n: t for n, t in params.items() if n not in "qkv"})
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in [out] + [caps[n] for n in CAPS]]
    grads = torch.autograd.grad(_weighted_loss(out, caps, weights), list(params.values()))
    ref_params = {n: t.detach().double().requires_grad_() for n, t in params.items()}
    ref_grads = torch.autograd.grad(_weighted_loss(*_oracle(ref_params, fixed), weights), list(ref_params.values()))
    for name, got, want in zip(params, grads, ref_grads):
        assert got.shape == want.shape and torch.isfinite(got).all(), name
        err = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        assert err < tol, (name, err)


def test_fully_masked_row_and_knocked_out_segment_give_finite_zero_gradients():
    params, fixed = _inputs(torch.float32)
    kpm = fixed["key_padding_mask"]
    kpm[0] = False  # row 0 attends to nothing
    out, caps = probed_attention(params["q"], params["k"], params["v"], backend="cpu", capture=("entropy",),
                                 segment_bias=torch.tensor([0.0, -math.inf]), key_padding_mask=kpm,
                                 segments=SEGMENTS)
    (out.sum() + caps["entropy"].sum()).backward()
    for name in "qkv":
        grad = params[name].grad
        assert torch.isfinite(grad).all(), name
    assert params["q"].grad[0].abs().max() == 0  # no key attended: no dependence on q
    assert params["v"].grad[:, :, 3:].abs().max() == 0  # knocked-out segment: no weight on its values


def test_block_boundaries_do_not_change_gradients(monkeypatch):
    params, fixed = _inputs(torch.float64, seed=4)
    args = {n: t for n, t in params.items() if n not in "qkv"}

    def grads():
        out, caps = probed_attention(params["q"], params["k"], params["v"], backend="reference",
                                     capture=("entropy", "key_mass"), **fixed, **args)
        return torch.autograd.grad(out.sum() + caps["entropy"].sum() + caps["key_mass"].square().sum(),
                                   list(params.values()))

    whole = grads()
    monkeypatch.setattr(op_autograd, "BLOCK_ELEMENTS", B * H * NK * 2)  # 2 queries per block: 3 blocks
    for a, b in zip(whole, grads()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_no_grad_runs_do_not_force_the_lse_capture():
    q = torch.randn(1, 2, 4, 8)
    with torch.no_grad():
        _, caps = probed_attention(q.requires_grad_(), q, q, backend="cpu", capture=("entropy",))
    assert set(caps) == {"entropy"}
    _, caps = probed_attention(q, q, q, backend="cpu", capture=("entropy",))
    assert set(caps) == {"entropy"}  # lse is saved for the backward but not returned


# ------------------------------------------------------------------------------------- traced models
class GPTBlock(nn.Module):
    """A small GPT-style pre-norm block calling SDPA (non-causal here: masks are another path)."""

    def __init__(self, d=16, h=4):
        super().__init__()
        self.h = h
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        z = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(z.transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([GPTBlock(), GPTBlock()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    return GPT().eval(), torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))


def _param_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_backward_after_traced_capture_run_matches_plain_backward(gpt):
    model, x = gpt
    model.zero_grad()
    model(x).square().sum().backward()
    plain = _param_grads(model)
    model.zero_grad()
    with trace(model, capture=("entropy", "lse"), backend="cpu") as tr:
        y = model(x)
    y.square().sum().backward()
    assert "blocks.1" in tr.records
    for name, grad in _param_grads(model).items():
        torch.testing.assert_close(grad, plain[name], rtol=2e-5, atol=2e-6, msg=name)


def test_entropy_capture_is_differentiable_through_the_model(gpt):
    model, x = gpt
    xr = x.clone().requires_grad_()
    with trace(model, sites="blocks.0", capture=("entropy",), backend="cpu") as tr:
        model(xr)
    (grad,) = torch.autograd.grad(tr["blocks.0"].entropy.sum(), xr)
    # finite differences through the whole traced model, float32: a loose but failing-on-wrong check
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    eps = 1e-2
    with torch.no_grad():
        vals = []
        for sign in (1, -1):
            with trace(model, sites="blocks.0", capture=("entropy",), backend="cpu") as t2:
                model(x + sign * eps * direction)
            vals.append(t2["blocks.0"].entropy.double().sum())
    numeric = (vals[0] - vals[1]) / (2 * eps)
    assert abs((grad * direction).sum().item() - numeric.item()) < 2e-2 * abs(numeric.item()) + 1e-3


def test_bwd_hooks_receive_gradients_and_attribution_patching(gpt):
    """Attribution patching (linear approximation of activation patching, as with TL's bwd_hooks): the
    effect of patching head h's output z from a corrupted run into the clean run is estimated as
    (z_corrupt - z_clean) . dL/dz. Checked against the gradient of the plain model, computed with a
    hand-written hook at the same place."""
    model, x = gpt
    corrupt = x.flip(1)
    metric = lambda y: y[:, -1].sum()
    _, cache_c = _run_cache(model, corrupt)
    acts, grads = {}, {}

    def save_act(t, hook):
        acts[hook.name] = t.detach()

    def save_grad(g, hook):
        grads[hook.name] = g.detach()

    y = run_with_hooks(model, x, fwd_hooks=[("blocks.*.hook_z", save_act)],
                       bwd_hooks=[("blocks.*.hook_z", save_grad)], backend="cpu")
    metric(y).backward()
    assert set(grads) == {"blocks.0.hook_z", "blocks.1.hook_z"}
    attribution = ((cache_c["blocks.1.hook_z"] - acts["blocks.1.hook_z"]) * grads["blocks.1.hook_z"]).sum((0, 1, 3))
    assert attribution.shape == (4,)

    # the same gradient from an untraced model: a forward hook on proj's input (z flattened "(h d)")
    captured = {}

    def grab(module, inputs, output):
        captured["z"] = inputs[0]

    handle = model.blocks[1].proj.register_forward_hook(grab)
    try:
        y2 = model(x)
        z = captured["z"]
        (gz,) = torch.autograd.grad(metric(y2), z)
    finally:
        handle.remove()
    torch.testing.assert_close(grads["blocks.1.hook_z"].flatten(2), gz, rtol=1e-5, atol=1e-6)


def _run_cache(model, x):
    from latentflow_fast.probe.hooks import run_with_cache

    with torch.no_grad():
        return run_with_cache(model, x, names_filter="*.hook_z", backend="cpu")


def test_bwd_hooks_on_hooks_without_gradient_are_refused(gpt):
    model, x = gpt
    with pytest.raises(ValueError, match="bwd_hooks"):
        run_with_hooks(model, x, bwd_hooks=[("blocks.0.hook_pattern", lambda g, h: None)], backend="cpu")


def test_opcheck_with_gradients():
    """torch.library.opcheck with inputs that require grad: the autograd registration, fake tensors and
    AOT dispatch (which runs the backward) agree with eager."""
    from latentflow_fast.ops import CAPTURE_NAMES, build_plan

    params, fixed = _inputs(torch.float32, seed=6)
    plan = build_plan(params["q"], params["k"], params["v"], capture=("entropy", "lse"), **fixed,
                      **{n: t for n, t in params.items() if n not in "qkv"})
    args = (plan.q, plan.k, plan.v, plan.key_padding_mask, plan.scale, plan.segments, plan.logit_scale,
            plan.segment_bias, plan.head_gate, plan.out_bias, plan.out_patch, plan.patch_mask,
            [n in plan.capture for n in CAPTURE_NAMES], "cpu")
    args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
    torch.library.opcheck(torch.ops.latentflow.probed_attention.default, args)


def test_an_operator_argument_the_backward_does_not_know_is_never_silently_ignored(monkeypatch):
    """If the operator gains an argument (say a new mask) the backward does not handle, an active value makes
    backward() raise instead of returning gradients of a different function."""
    names = [n for n in op_autograd._schema_names() if n not in op_autograd.MASK_ARGS]
    monkeypatch.setattr(op_autograd, "_schema_names", lambda: names[:3] + ["future_mask"] + names[3:])

    class Ctx:
        needs_input_grad = (True,) * (len(names) + 1)

        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    q = torch.randn(1, 1, 2, 4)
    inputs = [q, q, q, torch.ones(1, 1, 2, 2, dtype=torch.bool), None, 0.5] + [None] * 7 + [[False] * 5, "cpu"]
    outputs = (q,) + (torch.empty(0),) * 5
    ctx = Ctx()
    op_autograd.setup_context(ctx, inputs, outputs)
    with pytest.raises(NotImplementedError, match="future_mask"):
        op_autograd.backward(ctx, torch.ones_like(q), *outputs[1:])
    inputs[3] = None  # inactive: gradients as before, None for the new argument
    op_autograd.setup_context(ctx, inputs, outputs)
    grads = op_autograd.backward(ctx, torch.ones_like(q), *outputs[1:])
    assert len(grads) == len(inputs) and grads[3] is None and grads[0].shape == q.shape


def _masked_inputs(mask_kind, dtype=torch.float64, seed=7):
    g = torch.Generator().manual_seed(seed)
    B, H, Nq, Nk, D = 2, 2, 5, 7, 4
    q, k, v = (torch.randn(B, H, n, D, dtype=dtype, generator=g).requires_grad_() for n in (Nq, Nk, Nk))
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, Nq, Nk, generator=g) > 0.3
        mask[0, 0, 1] = False  # a query that sees nothing: p = 0, no gradient
    elif mask_kind == "float":
        mask = torch.randn(B, 1, Nq, Nk, dtype=dtype, generator=g).requires_grad_()
    return q, k, v, mask


@pytest.mark.parametrize("causal,mask_kind", [(c, m) for c in (False, True, "bottom_right")
                                               for m in (None, "bool", "float") if c or m])
def test_gradients_with_causal_and_attention_masks_pass_gradcheck(causal, mask_kind):
    """Masks enter the recompute as in the forward: gradcheck in float64 of out w.r.t. q, k, v and an
    additive mask (broadcast over heads), with a fully masked query row in the bool case."""
    q, k, v, mask = _masked_inputs(mask_kind)

    def f(q, k, v, *mask_arg):
        return probed_attention(q, k, v, causal=causal, attn_mask=mask_arg[0] if mask_arg else mask,
                                backend="reference")[0]

    inputs = (q, k, v) + ((mask,) if mask_kind == "float" else ())
    assert torch.autograd.gradcheck(f, inputs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masked_gradients_of_out_lse_and_entropy_match_a_float64_oracle(mask_kind):
    """cpu backend, float32, causal + mask: gradients through out, lse and entropy against eager float64
    autograd of the definition (docs/design.md, The operator contract)."""
    q, k, v, mask = _masked_inputs(mask_kind, dtype=torch.float32, seed=11)
    out, caps = probed_attention(q, k, v, causal=True, attn_mask=mask, capture=("lse", "entropy"), backend="cpu")
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (out, caps["lse"], caps["entropy"])]
    loss = sum((t.double() * wi).sum() for t, wi in zip((out, caps["lse"], caps["entropy"]), w))
    leaves = [q, k, v] + ([mask] if mask_kind == "float" else [])
    grads = torch.autograd.grad(loss, leaves)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    md = mask.detach().double().requires_grad_() if mask_kind == "float" else mask
    s = qd @ kd.transpose(-1, -2) / 2.0
    s = s.masked_fill(~md, float("-inf")) if mask_kind == "bool" else s + md
    s = s.masked_fill(torch.ones(5, 7, dtype=torch.bool).triu(1), float("-inf"))
    lse = torch.logsumexp(s, -1)
    alive = torch.isfinite(lse)[..., None]
    p = torch.where(alive, torch.exp(s - torch.where(alive, lse[..., None], 0.0)), 0.0)
    entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    lse_w = torch.where(torch.isfinite(lse), lse, 0.0)
    loss_d = (p @ vd * w[0]).sum() + (lse_w * w[1]).sum() + (entropy * w[2]).sum()
    expected = torch.autograd.grad(loss_d, [qd, kd, vd] + ([md] if mask_kind == "float" else []))
    for got, want in zip(grads, expected):
        assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-4), (got - want).abs().max()
