"""The DiT's fused CPU passes (ops/dit_cpu.py) against a float64 reference and against the torch ops."""

from __future__ import annotations

import pytest
import torch

import latentflow_fast.models.dit as dit
from latentflow_fast.ops import dit_cpu

pytestmark = pytest.mark.skipif(not dit_cpu._native(), reason="native extension not built")


def reference_heads(x, n_heads, weight, eps, cos, sin):
    """float64: strided head split, RMSNorm over hd times weight, RoPE over adjacent pairs."""
    B, T, D = x.shape
    h = x.double().reshape(B, T, D // n_heads, n_heads).permute(0, 3, 1, 2)
    if weight is not None:
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    if cos is not None:
        x1, x2 = h[..., 0::2], h[..., 1::2]
        c, s = cos.double(), sin.double()
        h = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return h


def reference_norm_modulate(x, weight, eps, shift, scale):
    xd = x.double()
    n = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps) * weight.double()
    return n * (1 + scale.double()) + shift.double()


@pytest.mark.parametrize("B,T,H,hd", [(1, 1, 1, 2), (2, 7, 4, 64), (3, 33, 2, 10), (1, 200, 4, 64), (2, 5, 3, 18)])
@pytest.mark.parametrize("norm,rope", [(True, True), (True, False), (False, True), (False, False)])
def test_head_norm_rope_matches_float64_and_torch(B, T, H, hd, norm, rope):
    gen = torch.Generator().manual_seed(B * 1000 + T * 10 + H)
    x = torch.randn(B, T, H * hd, generator=gen) * 3
    weight = torch.randn(hd, generator=gen) if norm else None
    rotary = dit.RotaryEmbedding(hd, 20000.0, 4096) if rope else None
    cos, sin = rotary.tables(T, x.device) if rope else (None, None)
    got = dit_cpu.head_norm_rope(x, H, weight, 1e-5, cos, sin)
    assert got.shape == (B, H, T, hd) and got.is_contiguous()
    ref = reference_heads(x, H, weight, 1e-5, cos, sin)
    torch.testing.assert_close(got.double(), ref, rtol=2e-6, atol=2e-6)
    # the torch ops of models/dit.py (what runs without the native pass)
    heads = dit.split_heads(x, H)
    if norm:
        rms = dit.RMSNorm(hd)
        rms.weight.data.copy_(weight)
        heads = rms(heads)
    if rope:
        heads = rotary(heads)
    torch.testing.assert_close(got, heads, rtol=1e-6, atol=1e-6)


def test_head_norm_rope_takes_a_frame_strided_input():
    x = torch.randn(2, 9, 3 * 128)[..., :128]  # frame stride 384, channel stride 1
    w = torch.randn(32)
    got = dit_cpu.head_norm_rope(x, 4, w, 1e-5)
    assert torch.equal(got, dit_cpu.head_norm_rope(x.contiguous(), 4, w, 1e-5))


@pytest.mark.parametrize("B,T,D,mod_batch", [(1, 1, 8, 1), (3, 17, 256, 3), (4, 5, 100, 1), (2, 200, 128, 2)])
def test_norm_modulate_matches_float64_and_torch(B, T, D, mod_batch):
    gen = torch.Generator().manual_seed(B + T + D)
    x = torch.randn(B, T, D, generator=gen) * 2
    weight = torch.randn(D, generator=gen)
    mods = torch.randn(mod_batch, 6, D, generator=gen)  # chunks of adaLN's table: [b, 1, D] views
    shift, scale = mods[:, 3:4], mods[:, 4:5]
    got = dit_cpu.norm_modulate(x, weight, 1e-5, shift, scale)
    torch.testing.assert_close(got.double(), reference_norm_modulate(x, weight, 1e-5, shift, scale),
                               rtol=2e-6, atol=2e-6)
    norm = dit.RMSNorm(D)
    norm.weight.data.copy_(weight)
    torch.testing.assert_close(got, dit.modulate(norm(x), shift, scale), rtol=1e-6, atol=1e-6)


def test_norm_modulate_declines_layouts_it_does_not_handle():
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    assert dit_cpu.norm_modulate(x, w, 1e-5, torch.randn(2, 8), torch.randn(2, 8)) is None  # not [b, 1, D]
    assert dit_cpu.norm_modulate(x, w, 1e-5, torch.randn(3, 1, 8), torch.randn(3, 1, 8)) is None  # batch 3 vs 2
    # the module-level helper then runs the torch ops
    norm = dit.RMSNorm(8)
    shift, scale = torch.randn(8), torch.randn(8)  # broadcast over [B, T, D], not the [b, 1, D] layout
    with torch.no_grad():
        assert torch.equal(dit.norm_modulate(norm, x, shift, scale), dit.modulate(norm(x), shift, scale))


def test_rows_are_batch_and_thread_invariant_bitwise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, 256, generator=gen)
    w, w_d = torch.randn(64, generator=gen), torch.randn(256, generator=gen)
    cos, sin = dit.RotaryEmbedding(64, 20000.0, 4096).tables(50, x.device)
    mods = torch.randn(6, 6, 256, generator=gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        full = dit_cpu.head_norm_rope(x, 4, w, 1e-5, cos, sin)
        full_nm = dit_cpu.norm_modulate(x, w_d, 1e-5, mods[:, :1], mods[:, 1:2])
        torch.set_num_threads(1)
        for r in (0, 3, 5):
            assert torch.equal(dit_cpu.head_norm_rope(x[r:r + 1], 4, w, 1e-5, cos, sin), full[r:r + 1])
            assert torch.equal(dit_cpu.norm_modulate(x[r:r + 1], w_d, 1e-5, mods[r:r + 1, :1], mods[r:r + 1, 1:2]),
                               full_nm[r:r + 1])
    finally:
        torch.set_num_threads(threads)


def test_the_torch_ops_run_when_the_fused_pass_does_not_apply(monkeypatch):
    x = torch.randn(1, 4, 16)
    w = torch.ones(4)
    assert dit_cpu.applies(x, w)
    assert not dit_cpu.applies(x.double(), w)
    assert not dit_cpu.applies(x.to(torch.bfloat16), w)
    assert not dit_cpu.applies(torch.randn(1, 4, 16, device="meta"), w)
    with torch.enable_grad():
        assert not dit_cpu.applies(x.requires_grad_(), w)
    assert dit_cpu.applies(x.detach(), w)
    monkeypatch.setenv(dit_cpu.FUSED_ENV, "0")
    assert not dit_cpu.applies(x.detach(), w)


def test_model_outputs_and_gradients_with_and_without_the_fused_passes(monkeypatch):
    from latentflow_fast import load_model

    model = load_model("tiny")
    gen = torch.Generator().manual_seed(1)
    T, C = 40, model.config.latent_dim
    text, mask = model.text_encoder(["sine tone"])
    args = (torch.randn(2, T, 2 * C, generator=gen), torch.tensor([0.3, 0.8]), torch.randn(2, T, C, generator=gen),
            text.expand(2, -1, -1), mask.expand(2, -1))
    with torch.no_grad():
        fused = model(*args)
        monkeypatch.setenv(dit_cpu.FUSED_ENV, "0")
        plain = model(*args)
    # float32 rounding of the norms, carried through 3 layers (outputs are O(1))
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    # training / attribution: with autograd through the weights the torch ops run and gradients flow
    monkeypatch.delenv(dit_cpu.FUSED_ENV)
    out = model(*args)
    out.square().mean().backward()
    grads = [p.grad for p in model.transformer.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.transformer.layers[0].attention.q_norm.weight.grad.abs().sum() > 0
