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



# ---------------------------------------------------------------- the mechanism: module-level router handlers
from latentflow_fast.lsac import SelfAttentionCache, lsac_policy, sample_with_lsac  # noqa: E402
from latentflow_fast.sampler import sample_ode  # noqa: E402


def _hook_loop_lsac(model, inputs, config, steps):
    """Independent LSAC: forward hooks on `layers.l.attention` keep its last output and substitute it (the
    module still runs; only its output is replaced), evaluation counted by the velocity function."""
    state = {"evaluation": 0}
    cache = {}

    def hook(module, args, kwargs, out, layer):
        e = state["evaluation"]
        if layer in config.layers and e % config.refresh != 0:
            return cache[layer]
        cache[layer] = out
        return out

    handles = [model.transformer.layers[l].attention.register_forward_hook(
        lambda m, a, kw, o, l=l: hook(m, a, kw, o, l), with_kwargs=True) for l in range(N_LAYERS)]
    fn = model.velocity_fn(inputs)

    def velocity(x, t, evaluation):
        state["evaluation"] = evaluation
        return fn(x, t, evaluation)

    try:
        return sample_ode(velocity, inputs.noise, steps=steps, method="midpoint").final
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("layers,refresh", [((0, 2), 2), ((1,), 3), ((0, 1, 2), 4)])
def test_lsac_is_bitwise_a_hook_loop_that_caches_module_outputs(model, audio, layers, refresh):
    config = LSACConfig(layers=layers, refresh=refresh)
    inputs = model.prepare(audio, 16000, "sine tone", 0)
    with torch.no_grad():
        expected = _hook_loop_lsac(model, inputs, config, steps=3)
        result, stats = sample_with_lsac(model, inputs, config, steps=3)
    assert torch.equal(result.final, expected)
    assert stats.total_skipped > 0


def test_the_cache_patches_no_forward_and_leaves_no_handler(model):
    router = model.attention_router
    with SelfAttentionCache(model, lsac_policy(LSACConfig(layers=(0,), refresh=2))):
        assert sorted(router.module_handlers) == [f"layers.{l}.self_attn" for l in range(N_LAYERS)]
        assert not any("forward" in m.__dict__ for m in model.modules())
    assert router.module_handlers == {} and router.handlers == {}


def _one_forward(model, inputs, evaluation=0):
    """The velocity of the model at the noise, t = 0 (one network evaluation)."""
    with torch.no_grad():
        return model.velocity_fn(inputs)(inputs.noise, torch.tensor(0.0), evaluation)


def test_another_threads_forward_is_unaffected(model, audio):
    import threading

    inputs = model.prepare(audio, 16000, "chirp", 0)
    other = model.prepare(audio, 16000, "sine tone", 3)  # a different input: reusing would change its output
    plain_other = _one_forward(model, other)
    cache = SelfAttentionCache(model, lambda layer, evaluation: evaluation > 0)  # reuse everything after 0
    seen = {}
    with cache:
        cache.evaluation = 0
        first = _one_forward(model, inputs)
        thread = threading.Thread(target=lambda: seen.__setitem__("v", _one_forward(model, other)))
        cache.evaluation = 1  # from now on this thread's forwards answer from the cache
        thread.start()
        thread.join()
        again = _one_forward(model, inputs)
    assert torch.equal(seen["v"], plain_other)  # the other thread computed everything itself
    assert torch.equal(again, first)  # same input, every self-attention reused: the same velocity
    assert cache.stats.computed == {l: 1 for l in range(N_LAYERS)}
    assert cache.stats.skipped == {l: 1 for l in range(N_LAYERS)}


def test_pre_installed_handlers_are_restored_and_nesting_uses_the_innermost(model, audio):
    router = model.attention_router
    inputs = model.prepare(audio, 16000, "chirp", 0)
    site = "layers.1.self_attn"
    calls = []

    def pre(s, compute):
        calls.append(s)
        return compute()

    router.module_handlers[site] = pre
    try:
        outer = SelfAttentionCache(model, lambda layer, evaluation: False)
        inner = SelfAttentionCache(model, lambda layer, evaluation: False)
        with outer:
            _one_forward(model, inputs)
            with inner:
                _one_forward(model, inputs)
            _one_forward(model, inputs)
            assert router.module_handlers[site] is not pre
        assert router.module_handlers[site] is pre  # put back
        assert calls == []  # while ours were installed, this thread's calls went to them
        assert outer.stats.computed == {l: 2 for l in range(N_LAYERS)}
        assert inner.stats.computed == {l: 1 for l in range(N_LAYERS)}
        _one_forward(model, inputs)
        assert calls == [site]
    finally:
        router.module_handlers.pop(site, None)


def test_out_of_order_exit_keeps_the_later_installation(model, audio):
    router = model.attention_router
    inputs = model.prepare(audio, 16000, "chirp", 0)
    first = SelfAttentionCache(model, lambda layer, evaluation: False)
    second = SelfAttentionCache(model, lambda layer, evaluation: False)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # second still holds the sites; first's handler stays inactive in its chain
    _one_forward(model, inputs)
    assert second.stats.total_computed == N_LAYERS and first.stats.total_computed == 0
    second.__exit__(None, None, None)
    assert router.module_handlers == {}


def test_cache_errors(model, audio):
    inputs = model.prepare(audio, 16000, "chirp", 0)
    with pytest.raises(TypeError, match="policy"):
        SelfAttentionCache(model, policy=3)
    with pytest.raises(TypeError, match="model"):
        SelfAttentionCache(torch.nn.Linear(2, 2), lsac_policy(LSACConfig(layers=(0,))))
    cache = SelfAttentionCache(model, lambda layer, evaluation: layer == 0)
    with cache:
        with pytest.raises(RuntimeError, match="already entered"):
            cache.__enter__()
        with pytest.raises(RuntimeError, match="layer 0: reuse requested at evaluation 0"):
            _one_forward(model, inputs)
    assert model.attention_router.module_handlers == {}
    with pytest.raises(TypeError, match=r"module_handlers\['layers.0.self_attn'\] must be callable"):
        model.attention_router.install(module_handlers={"layers.0.self_attn": 1})
    with pytest.raises(TypeError, match="site names must be strings"):
        model.attention_router.install(handlers={0: lambda *a: None})
