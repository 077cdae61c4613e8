"""Layer-Selective Attention Caching as a sampler option: exactness, call counts, real skipping."""

import copy
import math

import pytest
import torch

from latentflow_fast.lsac import LSACConfig, expected_saved_fraction
from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model

N_LAYERS = 3


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=32, n_heads=2, n_layers=N_LAYERS)
    return build_tiny_model(cfg).eval()


@pytest.fixture(scope="module")
def audio():
    g = torch.Generator().manual_seed(1)
    return 0.1 * torch.randn(1600, generator=g)  # 0.1 s at 16 kHz -> 25 latent frames


def test_refresh_one_is_bitwise_the_plain_sampler(model, audio):
    plain = model.separate(audio, 16000, "sine tone", steps=3)
    cached = model.separate(audio, 16000, "sine tone", steps=3, lsac=LSACConfig(layers=(0, 1, 2), refresh=1))
    assert torch.equal(plain.latent, cached.latent)
    assert torch.equal(plain.target, cached.target)
    assert cached.lsac.total_skipped == 0 and cached.lsac.total_computed == N_LAYERS * 6
    assert plain.lsac is None


@pytest.mark.parametrize("layers,refresh,steps", [((1,), 2, 3), ((0, 2), 3, 3), ((0, 1, 2), 4, 2), ((2,), 5, 3)])
def test_counted_savings_match_the_formula(model, audio, layers, refresh, steps):
    config = LSACConfig(layers=layers, refresh=refresh)
    result = model.separate(audio, 16000, "chirp", steps=steps, lsac=config)
    E = 2 * steps
    stats = result.lsac
    expected = expected_saved_fraction(N_LAYERS, E, config)
    assert stats.total_computed + stats.total_skipped == N_LAYERS * E
    assert stats.saved_fraction == pytest.approx(expected["exact"], abs=1e-15)
    assert stats.total_computed == expected["self_attention_calls"]
    for layer in range(N_LAYERS):
        computed = math.ceil(E / refresh) if layer in layers else E  # first-evaluation rule: 0, N, 2N, ...
        assert stats.computed[layer] == computed
    if E % refresh == 0:  # the paper's |S|/L (1 - 1/N) holds exactly when N divides E
        assert stats.saved_fraction == pytest.approx(len(layers) / N_LAYERS * (1 - 1 / refresh))


def test_cached_layers_really_skip_attention_and_projections(model, audio):
    router = model.attention_router
    calls = {}

    def counting(site, q, k, v, mask):
        calls[site] = calls.get(site, 0) + 1
        from latentflow_fast.models.attention import sdpa

        return sdpa(q, k, v, mask)

    projections = {}
    hooks = [model.transformer.layers[l].attention.wq.register_forward_hook(
        lambda m, i, o, l=l: projections.__setitem__(l, projections.get(l, 0) + 1)) for l in range(N_LAYERS)]
    for site in [f"layers.{l}.{kind}" for l in range(N_LAYERS) for kind in ("self_attn", "cross_attn")]:
        router.handlers[site] = counting
    try:
        model.separate(audio, 16000, "chirp", steps=4, lsac=LSACConfig(layers=(1,), refresh=4))
    finally:
        router.handlers.clear()
        for h in hooks:
            h.remove()
    E = 8
    assert calls["layers.1.self_attn"] == 2  # evaluations 0 and 4
    assert calls["layers.0.self_attn"] == calls["layers.2.self_attn"] == E
    assert all(calls[f"layers.{l}.cross_attn"] == E for l in range(N_LAYERS))
    assert projections == {0: E, 1: 2, 2: E}  # q/k/v projections are skipped too


def test_caching_changes_output_deterministically(model, audio):
    config = LSACConfig(layers=(0, 2), refresh=2)
    plain = model.separate(audio, 16000, "sine tone", steps=3)
    a = model.separate(audio, 16000, "sine tone", steps=3, lsac=config)
    b = model.separate(audio, 16000, "sine tone", steps=3, lsac=config)
    assert torch.equal(a.latent, b.latent)
    assert not torch.equal(a.latent, plain.latent)
    # the context manager leaves the model untouched afterwards
    again = model.separate(audio, 16000, "sine tone", steps=3)
    assert torch.equal(again.latent, plain.latent)


def test_bad_arguments(model, audio):
    with pytest.raises(ValueError, match="refresh"):
        LSACConfig(layers=(0,), refresh=0)
    with pytest.raises(ValueError, match="layers"):
        LSACConfig(layers=(0, 0), refresh=2)
    with pytest.raises(TypeError, match="layers"):
        LSACConfig(layers="01", refresh=2)
    with pytest.raises(ValueError, match="out of range"):
        model.separate(audio, 16000, "chirp", steps=2, lsac=LSACConfig(layers=(N_LAYERS,), refresh=2))
    with pytest.raises(TypeError, match="lsac"):
        model.separate(audio, 16000, "chirp", steps=2, lsac={"layers": (0,)})

