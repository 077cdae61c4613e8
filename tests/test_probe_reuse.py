"""Engine reuse (freezing / layer-selective caching of attention outputs and maps) and per-evaluation map
reductions, on a small random model: identities give exactly zero, and every mechanism agrees with an
independent computation (a router handler running eager float64 attention with its own cache)."""

import math

import pytest
import torch

from engine_fixtures import small_clip, small_model
from latentflow_fast.probe import MapRequest, ProbeEngine, Reduction, Reuse
from latentflow_fast.sampler import sample_ode

STEPS = 3  # 6 evaluations


@pytest.fixture(scope="module")
def setup():
    model = small_model(layers=3)
    engine = ProbeEngine(model)
    traj = engine.trajectory(small_clip(), steps=STEPS)
    return model, engine, traj


def self_sites(engine):
    return tuple(s for s in engine.sites if s.endswith("self_attn"))


def independent_target(model, traj, reuse):
    """Sample from the same noise with eager float64 attention at every site, applying `reuse` by its
    definition (Reuse docstring) with a cache of its own; returns the decoded target wave."""
    cache, now = {}, {"e": 0}

    def handler(site, q, k, v, mask):
        logits = q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(~mask[:, None, None, :], -math.inf)
        p = logits.softmax(-1)
        out = p @ v.double()
        if reuse is not None and site in reuse.sites:
            if reuse.reuses(site, now["e"]):
                out = cache[site] if reuse.what == "output" else cache[site] @ v.double()
            else:
                cache[site] = out if reuse.what == "output" else p
        return out.to(q.dtype)

    router = model.attention_router
    saved = dict(router.handlers)
    router.handlers.update({s: handler for s in model_sites(model)})
    velocity = model.velocity_fn(traj.inputs)

    def fn(state, t, evaluation):
        now["e"] = evaluation
        return velocity(state, t, evaluation)

    try:
        with torch.no_grad():
            final = sample_ode(fn, traj.inputs.noise, steps=traj.steps, method=traj.method).final
            target, _ = model.decode(final, traj.inputs)
    finally:
        router.handlers.clear()
        router.handlers.update(saved)
    return target.reshape(-1)


def model_sites(model):
    from latentflow_fast.probe import model_sites as sites

    return sites(model)


def engine_targets(engine, traj, rows):
    """Decoded targets of `rows` (Reuse) run through the engine's sweep, in row order."""
    got = {}

    def grab(target, residual, t):
        return [{"_target": target[r].clone()} for r in range(target.shape[0])]

    df = engine.sweep(traj, rows, end_effect=True, progress=False, end_metrics=grab)
    for _, row in df.iterrows():
        got[row["probe_id"]] = row["_target"]
    return [got[r.probe_id] for r in rows], df


def test_identities_are_exactly_zero(setup):
    model, engine, traj = setup
    E = traj.num_evaluations
    sites = self_sites(engine)
    identities = [Reuse(sites, "output", start=E), Reuse(sites, "map", start=E + 3),
                  Reuse(sites, "output", start=0, refresh=1), Reuse(sites, "map", start=2, refresh=1)]
    # mixed into one batch with real reuse rows: the identity rows must still be bit-identical to clean
    real = [Reuse(sites, "output", start=0, refresh=2), Reuse(sites[:1], "map", start=1)]
    targets, df = engine_targets(engine, traj, identities + real)
    for row, target in zip(identities, targets):
        assert torch.equal(target, traj.target), row
    for column in ("end_latent_change", "end_mrstft_to_clean"):
        values = df.set_index("probe_id").loc[[r.probe_id for r in identities], column]
        assert (values == 0).all(), column
        assert (df.set_index("probe_id").loc[[r.probe_id for r in real], column] > 0).all()


@pytest.mark.parametrize("what", ["output", "map"])
@pytest.mark.parametrize("schedule", [dict(start=2), dict(start=(1, 3, 2)), dict(start=0, refresh=2),
                                      dict(start=(3, 1, 2), refresh=3)])
def test_reuse_matches_independent_computation(setup, what, schedule):
    model, engine, traj = setup
    reuse = Reuse(self_sites(engine), what, **schedule)
    (target,), _ = engine_targets(engine, traj, [reuse])
    expected = independent_target(model, traj, reuse)
    clean = independent_target(model, traj, None)
    change = (expected - clean).norm()
    assert change > 1e-4 * clean.norm()  # the intervention does something
    # the engine (SDPA / probed kernel in float32) agrees with the float64 eager definition far below the change
    assert (target - expected).norm() < 1e-3 * change
    assert (traj.target - clean).norm() < 1e-3 * change


def test_map_reuse_is_identity_when_maps_cannot_change():
    # Known by construction: with zero query weights every self-attention map is uniform at every
    # evaluation, so reusing maps changes nothing (up to float rounding), while reusing outputs does.
    model = small_model(layers=2)
    with torch.no_grad():
        for block in model.transformer.layers:
            block.attention.wq.weight.zero_()
    engine = ProbeEngine(model)
    traj = engine.trajectory(small_clip(), steps=STEPS)
    sites = self_sites(engine)
    (frozen_map, frozen_out), _ = engine_targets(engine, traj, [Reuse(sites, "map", start=1),
                                                                Reuse(sites, "output", start=1)])
    assert (frozen_map - traj.target).norm() < 1e-5 * traj.target.norm()
    assert (frozen_out - traj.target).norm() > 1e-3 * traj.target.norm()


def test_skipped_attention_calls_are_counted(setup):
    _, engine, traj = setup
    sites = self_sites(engine)
    reuse = Reuse(sites, "output", start=0, refresh=2)  # evaluations 1, 3, 5 reuse at every site
    df = engine.sweep(traj, [reuse], end_effect=True, progress=False)
    assert reuse.reused_calls(traj.num_evaluations) == 3 * len(sites)
    assert int(df["batch_attention_calls_skipped"].iloc[0]) == 3 * len(sites)


def test_reuse_definition_and_errors():
    r = Reuse(("layers.0.self_attn", "layers.1.self_attn"), "map", start=(2, 4), refresh=2)
    assert [r.reuses("layers.0.self_attn", e) for e in range(6)] == [False, False, False, True, False, True]
    assert [r.reuses("layers.1.self_attn", e) for e in range(6)] == [False] * 5 + [True]
    assert r.first_reuse(6) == 3 and r.first_reuse(3) is None
    frozen = Reuse(("layers.0.self_attn",), start=3)
    assert [frozen.reuses("layers.0.self_attn", e) for e in range(5)] == [False, False, False, True, True]
    assert Reuse(("a.b",), start=1).probe_id != Reuse(("a.b",), "map", start=1).probe_id
    with pytest.raises(ValueError, match="start"):
        Reuse(("layers.0.self_attn",), start=0)  # freezing needs something computed first
    with pytest.raises(ValueError, match="what"):
        Reuse(("layers.0.self_attn",), "weights")
    with pytest.raises(ValueError, match="refresh"):
        Reuse(("layers.0.self_attn",), refresh=0)
    with pytest.raises(ValueError, match="patterns"):
        Reuse(("layers.*.self_attn",))
    with pytest.raises(ValueError, match="start"):
        Reuse(("layers.0.self_attn", "layers.1.self_attn"), start=(1,))
    with pytest.raises(TypeError, match="sites"):
        Reuse("layers.0.self_attn")


def test_reuse_needs_end_effect_and_known_sites(setup):
    _, engine, traj = setup
    with pytest.raises(ValueError, match="end_effect"):
        engine.sweep(traj, [Reuse(self_sites(engine), start=2)], progress=False)
    with pytest.raises(ValueError, match="unknown sites"):
        engine.sweep(traj, [Reuse(("layers.9.self_attn",), start=2)], end_effect=True, progress=False)


def test_reductions_match_materialised_maps(setup):
    model, engine, traj = setup
    sites = self_sites(engine)
    reductions = [Reduction("rowsum", "layers.*.self_attn", lambda p, site, e: p.sum(-1)),
                  Reduction("diag", sites[:1], lambda p, site, e: torch.diagonal(p, dim1=-2, dim2=-1).mean())]
    run = engine.trajectory(traj.clip, steps=STEPS, cache_heads=(), reductions=reductions)
    maps = engine.trajectory(traj.clip, steps=STEPS, cache_heads=(), maps=[MapRequest(s) for s in sites])
    E = traj.num_evaluations
    assert set(run.reductions) == {"rowsum", "diag"} and set(run.reductions["rowsum"]) == set(sites)
    assert run.reductions["rowsum"][sites[0]].shape == (E, engine.num_heads, traj.states[0].shape[1])
    assert torch.allclose(run.reductions["rowsum"][sites[1]], torch.ones(()), atol=1e-5)
    expected = torch.stack([torch.diagonal(maps.maps[(sites[0], e)], dim1=-2, dim2=-1).mean() for e in range(E)])
    assert torch.allclose(run.reductions["diag"][sites[0]], expected, rtol=1e-5, atol=1e-7)
    assert run.maps == {}  # nothing kept beyond the reductions
    assert torch.equal(run.final, traj.final)  # reducing does not change the run
    with pytest.raises(TypeError, match="fn"):
        Reduction("x", "layers.*", fn=3)


def test_reuse_rows_do_not_depend_on_their_batch(setup):
    # exact mode: a Reuse row gives the same bits alone, in a batch with other rows, and in any order
    _, engine, traj = setup
    sites = self_sites(engine)
    rows = [Reuse(sites, "output", start=0, refresh=2), Reuse(sites[1:], "map", start=0, refresh=3),
            Reuse(sites[:1], "map", start=1), Reuse(sites, "output", start=3)]
    together, _ = engine_targets(engine, traj, rows)
    reversed_, _ = engine_targets(engine, traj, rows[::-1])
    for i, row in enumerate(rows):
        (alone,), _ = engine_targets(engine, traj, [row])
        assert torch.equal(alone, together[i]) and torch.equal(alone, reversed_[len(rows) - 1 - i]), row
