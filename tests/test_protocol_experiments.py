"""Protocol experiments P0, P1, P2, P3, P5 on a very small configuration (random 2-layer model, 2 clips,
2 midpoint steps = 4 evaluations), plus the clip set, the effect definitions and the statistics."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model
from latentflow_fast.probe import Probe, ProbeEngine
from latentflow_fast.protocol import (clips as clips_mod, effects, p0_determinism, p1_pathways, p2_grid,
                                      p3_convergence, p5_scaffold, stats)
from latentflow_fast.protocol.base import ProtocolConfig, ProtocolContext

LAYERS, HEADS = 2, 2


def make_context(out_dir) -> ProtocolContext:
    torch.manual_seed(0)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=32, n_heads=HEADS, n_layers=LAYERS)
    model = build_tiny_model(cfg).eval()
    config = ProtocolConfig(num_clips=2, steps=2, time_bins=4, window=2, bootstrap=200)
    engine = ProbeEngine(model, backend=config.backend, time_bins=config.time_bins)
    clips = clips_mod.default_clips(config, model=model, seconds=0.25)
    return ProtocolContext(config=config, model=model, engine=engine, clips=clips, out_dir=out_dir, progress=False)


EXPERIMENTS = {"p0": p0_determinism, "p1": p1_pathways, "p2": p2_grid, "p3": p3_convergence, "p5": p5_scaffold}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every experiment run twice, each time in a fresh context and folder: (frames, ctx) per run.

    One intra-op thread: with two, elementwise ops over a batch of odd size can take a scalar tail path
    for the last row, whose last bits then differ from the clean run's (reported to the engine's owner);
    the exact-zero checks below are about the protocol code, not that.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for name in ("first", "second"):
            ctx = make_context(tmp_path_factory.mktemp(name))
            runs.append(({key: mod.EXPERIMENT.run(ctx) for key, mod in EXPERIMENTS.items()}, ctx))
    finally:
        torch.set_num_threads(threads)
    return runs


# ---------------------------------------------------------------------------------------------- experiments
@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_is_deterministic_resumable_and_reports(results, name, tmp_path):
    (first, ctx), (second, _) = results
    pd.testing.assert_frame_equal(first[name], second[name])  # fresh rerun: identical numbers
    again = EXPERIMENTS[name].EXPERIMENT.run(ctx)  # same folder: resumes from the store, nothing new
    pd.testing.assert_frame_equal(first[name], again)
    experiment = EXPERIMENTS[name].EXPERIMENT
    assert experiment.name == name
    summary = experiment.summarize(first[name], ctx)
    json.dumps(summary, allow_nan=False)
    for path, caption in experiment.figures(first[name], summary, tmp_path):
        assert path.is_file() and path.suffix == ".png" and len(caption) > 20


def test_p0_runs_are_bitwise_equal(results):
    df = results[0][0]["p0"]
    assert len(df) == 2 and df["bitwise_equal"].all() and (df["max_abs_diff"] == 0).all()
    assert p0_determinism.summarize(df)["bitwise_equal"] is True


ZERO_COLUMNS = ("local_effect", "end_latent_change", "semantic_shift_db", "semantic_projection",
                "acoustic_effect", "acoustic_logmel", "end_mrstft_to_clean", "semantic_v2", "acoustic_v2")


def test_p1_identity_swaps_are_exactly_zero_and_real_swaps_are_not(results):
    df = results[0][0]["p1"]
    per_clip = len(p1_pathways.V2_PROBES) + len(p1_pathways.V2_CONTROLS)  # both clips carry the controls
    assert len(df) == 2 * per_clip
    for column in ZERO_COLUMNS + ("probe_type", "scope", "group", "gain_group", "clean_si_sdri"):
        assert column in df.columns
    controls = df[df["probe_type"].str.contains("identity")]
    assert len(controls) == 2 * len(p1_pathways.V2_CONTROLS)
    assert (controls[list(ZERO_COLUMNS)].to_numpy() == 0).all()
    real = df[df["probe_type"].isin(["additive", "routing", "weights swap", "values swap"])]
    assert (real["local_effect"] > 0).all() and (real["end_latent_change"] > 0).all()
    assert (real["acoustic_v2"] > 0).all()
    full = df[(df["probe_type"] == "full patch") & (df["scope"] == "all layers")]
    assert np.allclose(full["semantic_projection"], 1.0)  # patching every layer reproduces the B run
    summary = p1_pathways.summarize(df, results[0][1])
    assert summary["identity_control_max_abs_effect"] == 0.0
    assert summary["dissociation"]["n_clips"] == 2
    assert set(summary["dissociation_by_sources"]) == {"2 sources", "3 sources"}
    ids = {(c["id"], c["subset"]) for c in summary["claims"]}
    assert ids == {(c[0], s) for c in p1_pathways.CLAIMS for s in ("all clips", "separated")}
    assert all(c["verdict_pre_holm"] == "not testable" for c in summary["claims"])  # n = 2: power


def test_text_swap_both_equals_the_counterfactual_run(results):
    """Known by construction: keys and values of B's text at every layer from evaluation 0 = prompting B."""
    from latentflow_fast.protocol.text_swap import TextSwapEngine, swap_probe

    ctx = results[0][1]
    pclip = ctx.clips[0]
    engine = TextSwapEngine(ctx.model, time_bins=4)
    kwargs = dict(steps=ctx.config.steps, seed=ctx.config.noise_seed, cache_heads=())
    clean = engine.record_text("a", pclip.clip, **kwargs)
    cf = engine.record_text("b", pclip.clip, prompt=pclip.counterfactual_prompt, **kwargs)
    outputs = {}

    def keep(target, residual, traj):
        outputs["target"] = target.clone()
        return [{} for _ in range(target.shape[0])]

    probes = [swap_probe("text swap", "b"), swap_probe("weights swap", "a"), swap_probe("values swap", "a"),
              swap_probe("weights swap", "b")]
    rows = engine.sweep(clean, probes, end_effect=True, progress=False, end_metrics=keep)
    assert torch.equal(outputs["target"][0], cf.target)  # bitwise: text reaches the DiT only there
    assert torch.equal(outputs["target"][1], clean.target) and torch.equal(outputs["target"][2], clean.target)
    assert rows["end_latent_change"].iloc[3] > 0
    with pytest.raises(ValueError, match="kind"):
        swap_probe("keys swap", "b")


def test_identity_effects_known_by_construction():
    rng = np.random.default_rng(0)
    a, b, other, noise = (rng.normal(size=2000) for _ in range(4))
    clean = a + 0.1 * b + 0.3 * other
    outs = np.stack([clean, clean + 0.5 * b, clean + 0.2 * noise, 0.5 * a + 0.1 * b + 0.3 * other])
    rows = effects.identity_effects(outs, clean, None, a, b, (other,))
    assert rows[0]["semantic_v2"] == 0.0 and rows[0]["acoustic_v2"] == 0.0  # identical: exact zeros
    # a pure move toward B: position 0.1/1.1 -> 0.6/1.6, nothing off the stems' plane
    assert rows[1]["semantic_v2"] == pytest.approx(0.6 / 1.6 - 0.1 / 1.1) and rows[1]["acoustic_v2"] < 1e-12
    # a change off the plane: acoustic = |P_perp noise| / |clean|, semantic ~ 0
    assert abs(rows[2]["semantic_v2"]) < 0.02 and rows[2]["acoustic_v2"] == pytest.approx(
        0.2 * np.linalg.norm(noise) / np.linalg.norm(clean), rel=0.05)
    # re-weighting the stems (less A) moves the identity but is not acoustic
    assert rows[3]["semantic_v2"] > 0 and rows[3]["acoustic_v2"] < 1e-12
    # active samples only: a change outside the mask is invisible
    mask = np.zeros(2000, dtype=bool)
    mask[:1000] = True
    outside = clean.copy()
    outside[1500:] += 1.0
    (row,) = effects.identity_effects(outside[None], clean, None, a, b, (other,), active=mask)
    assert row["acoustic_v2"] == pytest.approx(0.0, abs=1e-12) and row["semantic_v2"] == pytest.approx(0.0, abs=1e-12)


def test_p2_grid_shape_and_neutral_probe(results):
    df = results[0][0]["p2"]
    windows = len(p2_grid.window_starts(4, 2))
    assert len(df) == 2 * LAYERS * windows  # 2 layer groups (here one layer each) x windows x full patch
    assert len(p2_grid.grid_probes(LAYERS, HEADS, 4, 2, per_head=True)) == LAYERS * windows * (4 + HEADS)
    grid = p2_grid.grid_means(df, "full patch", "acoustic_v2")
    assert grid.shape == (LAYERS, windows) and np.isfinite(grid.to_numpy()).all()
    assert (df["acoustic_v2"] > 0).all()
    assert p2_grid.layer_groups(16, 2) == [(0, 9, "[0-9]"), (10, 15, "1[0-5]")]
    assert p2_grid.layer_groups(8, 2) == [(0, 3, "[0-3]"), (4, 7, "[4-7]")]
    assert len(p2_grid.group_probes(8, 32, 16, 2, ("additive", "routing"))) == 2 * 2 * 2
    with pytest.raises(ValueError, match="p2_types"):
        p2_grid.group_probes(8, 32, 16, 2, ("nonsense",))
    assert "layer groups" in p2_grid.summarize(df, results[0][1])["grid_reduction"]
    # A gate of 1 changes nothing: the engine + end metrics give exact zeros.
    ctx = results[0][1]
    pclip = ctx.clips[0]
    clean, cf = p1_pathways.prepare_runs(ctx, pclip)
    neutral = [Probe(site="layers.0.self_attn", intervention="head_ablation", value=1.0, evaluation=1, window=2)]
    rows = ctx.engine.sweep(clean, neutral, end_effect=True, progress=False,
                            end_metrics=effects.make_end_metrics(pclip, clean, cf))
    assert (rows[list(ZERO_COLUMNS)].to_numpy() == 0).all()


def test_p3_convergence_columns(results):
    df = results[0][0]["p3"]
    assert len(df) == 2 * LAYERS * 4
    last = df[df["evaluation"] == 3]
    assert np.allclose(last["sim_final"], 1.0) and (last["rel_change_final"] == 0).all()
    assert np.allclose(last["map_sim_final"], 1.0) and np.allclose(last["output_sim_final"], 1.0)
    assert df["kstar"].between(0, 3).all() and df["sim_prev"].isna().sum() == 2 * LAYERS
    assert df["kstar_map"].between(0, 3).all() and df["kstar_output"].between(0, 3).all()
    summary = p3_convergence.summarize(df, results[0][1])
    for crit in summary["criteria"].values():
        assert sorted(crit["stable_layers"] + crit["fast_layers"]) == list(range(LAYERS))
        assert 0 <= crit["bootstrap_stability"] <= 1
    split = summary["split"]
    agree = summary["criteria"]["map"]["stable_layers"] == summary["criteria"]["output"]["stable_layers"]
    assert split["no_split"] == (not agree or not all(c["fast_layers"] for c in summary["criteria"].values()))
    assert summary["stable_layers"] == summary["criteria"]["map"]["stable_layers"]
    assert {c["id"] for c in summary["claims"]} == {"P3.map", "P3.output"}


def test_p3_criteria_known_by_construction():
    """k* and the cross-fitted claim on tables whose answer is known: layer 1 settles late on every clip."""
    table = pd.DataFrame({0: [2, 3, 2, 1, 2, 3, 2, 2], 1: [20, 25, 22, 19, 30, 21, 24, 23],
                          2: [3, 2, 2, 2, 1, 3, 2, 4]}, index=[f"c{i}" for i in range(8)])
    summary = p3_convergence.criterion_summary(table, resamples=50, seed=0)
    assert summary["stable_layers"] == [0, 2] and summary["fast_layers"] == [1]
    assert summary["bootstrap_stability"] == 1.0 and summary["clips_with_same_split"] == 8
    values = p3_convergence.crossfit_values(table)
    assert (values > 15).all() and len(values) == 8
    centred = p3_convergence.centered_cosine(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]))
    assert centred == pytest.approx(1.0)
    assert p3_convergence.convergence_index([0.1, 0.99, 0.5, 0.96, 0.97], 0.95) == 3


def test_p5_scaffold_columns(results):
    df = results[0][0]["p5"]
    layers = df[df["layer"] >= 0]
    assert len(layers) == 2 * LAYERS * 4 and len(df) == len(layers) + 2 * 5
    assert layers["locality"].between(0, 63).all() and layers["active_mass"].between(0, 1).all()
    final = df[df["probe_id"] == "env-final"]
    assert final["reference_contrast_db"].notna().all()


# ---------------------------------------------------------------------------------------------- definitions
def test_convergence_index_split_and_pooling():
    assert p3_convergence.convergence_index([0.5, 0.97, 0.9, 0.96, 1.0], 0.95) == 3
    assert p3_convergence.convergence_index([0.99, 0.99, 1.0], 0.95) == 0
    assert p3_convergence.split_layers({0: 1, 1: 5, 2: 2, 3: 8}) == ([0, 2], [1, 3])
    assert p3_convergence.split_layers({0: 2, 1: 2}) == ([0, 1], [])
    assert p3_convergence.stable_fast({0: 0, 1: 0}, {0: 3, 1: 1}) == ([1], [0], "kstar_centered")
    assert p3_convergence.stable_fast({0: 0, 1: 2}, {0: 3, 1: 1}) == ([0], [1], "kstar")
    uniform = torch.full((3, 2, 8, 4), 0.25)
    pooled = p3_convergence.pooled_maps(uniform, [0, 2, 4, 6, 8])
    assert pooled.shape == (3, 4, 4) and torch.allclose(pooled, torch.full_like(pooled, 0.25))


def test_locality_mass_settle_and_boundary_contrast():
    assert p5_scaffold.locality(torch.eye(5)[None]) == 0.0
    assert p5_scaffold.locality(torch.full((1, 3, 3), 1 / 3, dtype=torch.float64)) == pytest.approx(8 / 9)
    active = torch.tensor([True, False, False, False])
    assert math.isclose(p5_scaffold.active_mass(torch.full((2, 4, 4), 0.25), active), 0.25)
    assert p5_scaffold.settle_index([5, 1, 0.5, 0.52, 0.5]) == 2
    assert p5_scaffold.settle_index([1.0, 1.0]) == 0
    sr = 16_000
    wave = np.zeros(sr)
    wave[8000:] = np.sin(np.arange(8000) * 0.3)
    bounds = p5_scaffold.boundaries_of((8000, sr), sr, sr)
    assert bounds == [(8000, "onset")]
    assert p5_scaffold.boundary_contrast(wave, bounds, (8000, sr), sr) == pytest.approx(60.0, abs=0.1)
    assert p5_scaffold.boundary_contrast(np.ones(sr), bounds, (8000, sr), sr) == pytest.approx(0.0, abs=1e-9)


def test_effect_definitions():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, generator=g), torch.randn(4000, generator=g)
    clean = a + 0.05 * torch.randn(4000, generator=g)
    cf = b + 0.05 * torch.randn(4000, generator=g)
    rows = effects.effect_rows(torch.stack([clean, cf, 0.5 * (clean + cf)]), clean, cf, a, b)
    assert rows[0]["semantic_effect"] == 0 and rows[0]["acoustic_effect"] == 0
    assert rows[0]["semantic_projection"] == 0 and rows[0]["acoustic_reference"] == "clean"
    assert rows[1]["semantic_effect"] == pytest.approx(1.0) and rows[1]["acoustic_effect"] == 0
    assert rows[1]["acoustic_reference"] == "counterfactual" and rows[1]["identity_flipped"] is True
    assert rows[2]["semantic_projection"] == pytest.approx(0.5) and rows[2]["acoustic_effect"] > 0
    no_stems = effects.effect_rows(torch.stack([cf]), clean, cf)
    assert no_stems[0]["semantic_effect"] == pytest.approx(1.0) and math.isnan(no_stems[0]["semantic_shift_db"])
    tiny_gap = effects.effect_rows(torch.stack([cf]), clean, clean + 1e-4 * cf, a, b)
    assert math.isnan(tiny_gap[0]["semantic_effect"])  # the prompt change barely moves the output
    with pytest.raises(ValueError):
        effects.effect_rows(torch.zeros(3), clean)


# ---------------------------------------------------------------------------------------------- statistics
def test_paired_wilcoxon_hand_computed():
    result = stats.paired_wilcoxon([2, 3, 4, 5, 6], [1, 1, 1, 1, 1])
    assert result["statistic"] == 0 and result["p_value"] == pytest.approx(2 / 32) and result["n"] == 5
    zeros = stats.paired_wilcoxon([1, 2, 3], [1, 2, 3])
    assert zeros["statistic"] == 0 and zeros["p_value"] == 1.0
    dropped = stats.paired_wilcoxon([1, np.nan, 3], [0, 0, 0])
    assert dropped["n"] == 2
    assert math.isnan(stats.paired_wilcoxon([], [])["p_value"])
    with pytest.raises(ValueError):
        stats.paired_wilcoxon([1, 2], [1])


def test_bootstrap_ci_and_contrast():
    assert stats.bootstrap_ci([2.0] * 5) == (2.0, 2.0)
    assert stats.bootstrap_ci([3.0]) == (3.0, 3.0)
    assert all(math.isnan(v) for v in stats.bootstrap_ci([np.nan]))
    values = np.arange(20.0)
    lo, hi = stats.bootstrap_ci(values, resamples=500, seed=1)
    assert (lo, hi) == stats.bootstrap_ci(values, resamples=500, seed=1)  # seeded
    assert 0 <= lo < values.mean() < hi <= 19
    assert stats.contrast([1, 0, 0, 2], [0, 0, 1, 2]).tolist() == [1.0, 0.0, -1.0, 0.0]
    with pytest.raises(ValueError):
        stats.bootstrap_ci(values, resamples=0)


def test_dissociation_hand_computed():
    rows = []
    for i in range(4):
        rows.append({"clip_id": f"c{i}", "probe_type": "additive", "semantic_effect": 1.0, "acoustic_effect": 0.1})
        rows.append({"clip_id": f"c{i}", "probe_type": "routing", "semantic_effect": 0.1, "acoustic_effect": 1.0})
    result = stats.dissociation(pd.DataFrame(rows), resamples=100)
    assert result["n_clips"] == 4
    assert result["cells"]["additive/semantic_effect"]["mean"] == pytest.approx(1.0)
    assert result["contrast_semantic"]["mean"] == pytest.approx(0.9 / 1.1)
    assert result["contrast_acoustic"]["mean"] == pytest.approx(-0.9 / 1.1)
    assert result["interaction"]["mean"] == pytest.approx(1.8 / 1.1)
    assert result["tests"]["additive_vs_routing/semantic_effect"]["p_value"] == pytest.approx(2 / 16)
    assert result["double_dissociation"] is True


# ---------------------------------------------------------------------------------------------- clips
def test_default_clips_balanced_and_deterministic():
    config = ProtocolConfig(num_clips=4)
    first, second = clips_mod.default_clips(config), clips_mod.default_clips(config)
    assert [c.group for c in first].count("2 sources") == 2 and [c.group for c in first].count("3 sources") == 2
    for a, b in zip(first, second):
        assert a.clip.clip_id == b.clip.clip_id and torch.equal(a.clip.mixture, b.clip.mixture)
        assert a.counterfactual_prompt in a.classes and a.counterfactual_prompt != a.clip.prompt
        assert a.active_frames.shape == (500,) and a.active_frames.any()
        assert a.meta["gain_group"] in ("gain spread < 6 dB", "gain spread >= 6 dB")
    shifted = clips_mod.default_clips(ProtocolConfig(num_clips=4, clip_seed_offset=10))
    assert shifted[0].clip.clip_id != first[0].clip.clip_id
    with pytest.raises(ValueError):
        clips_mod.default_clips(ProtocolConfig(num_clips=0))


def test_clips_from_files(tmp_path):
    import soundfile as sf

    path = tmp_path / "mix.wav"
    sf.write(str(path), np.zeros((8000, 2), dtype=np.float32), 16_000)
    (clip,) = clips_mod.clips_from_files([path], ["sine tone"], ["chirp"])
    assert clip.sources is None and clip.clip.mixture.shape == (8000,) and clip.counterfactual_prompt == "chirp"
    with pytest.raises(ValueError):
        clips_mod.clips_from_files([path], ["a", "b"])
    with pytest.raises(ValueError):
        clips_mod.clips_from_files([tmp_path / "missing.wav"], ["sine tone"])
