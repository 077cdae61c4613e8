"""P4 freezing, P5 scaffold and P6 LSAC (protocol v2) through the probe engine, on a very small configuration:
shapes, exact-zero controls, determinism, resume, the P3 interface and definitions known by construction."""

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model
from latentflow_fast.probe import ProbeEngine
from latentflow_fast.protocol import p4_freezing as p4
from latentflow_fast.protocol import p5_scaffold as p5
from latentflow_fast.protocol import p6_lsac as p6
from latentflow_fast.protocol.base import ProtocolConfig, ProtocolContext
from latentflow_fast.protocol.clips import default_clips
from latentflow_fast.protocol.layer_sets import group_sets, p3_split, warmup_starts

STEPS = 3  # 6 evaluations
CONFIG = ProtocolConfig(num_clips=1, steps=STEPS, freeze_starts=(1, 4, 99), freeze_sets=("split", "criteria", "all"),
                        lsac_refresh=(2, 4),
                        lsac_starts=("warmup", 0), lsac_sets=("split",), naive_midpoint_steps=(1, 2),
                        naive_euler_steps=(3,),
                        bootstrap=50, experiments=("p4", "p6"))
P3 = {"criteria": {"map": {"kstar": {0: 1, 1: 2, 2: 4}, "stable_layers": [0, 1], "fast_layers": [2]},
                   "output": {"kstar": {0: 3, 1: 1, 2: 2}, "stable_layers": [1, 2], "fast_layers": [0]}},
      "split": {"stable_layers": [1], "fast_layers": [0], "no_split": False}}
VOLATILE = ["wall_seconds", "wall_fraction", "batch_sampling_seconds"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=32, n_heads=2, n_layers=3)
    return build_tiny_model(cfg).eval()


def make_ctx(model, out_dir, p3=P3, config=CONFIG):
    clips = default_clips(config, model, seconds=0.125)
    ctx = ProtocolContext(config, model, ProbeEngine(model), clips, out_dir, progress=False)
    if p3 is not None:
        ctx.summaries["p3"] = copy.deepcopy(p3)
    return ctx


# ---------------------------------------------------------------------------------------------- P3 interface
def test_p3_split_reads_both_formats_and_no_split(model, tmp_path):
    split = p3_split(make_ctx(model, tmp_path))
    assert split["stable_layers"] == [1] and not split["no_split"] and set(split["criteria"]) == {"map", "output"}
    sets = group_sets(make_ctx(model, tmp_path), split)
    assert sets == {"stable": (1,), "fast": (0,), "map:stable": (0, 1), "map:fast": (2,), "output:stable": (1, 2),
                    "all": (0, 1, 2)}  # output:fast == fast: listed once
    assert warmup_starts(split, (0, 1, 2), None, 6) == (3, 2, 4)  # latest k* over the criteria
    assert warmup_starts(split, (0, 1), "map", 6) == (1, 2)
    old = p3_split(make_ctx(model, tmp_path, p3={"stable_layers": [0], "fast_layers": [1, 2],
                                                 "kstar_median_by_layer": {"0": 1.0, "1": 3.0, "2": 5.0}}))
    assert old["criteria"]["pooled_map"]["kstar"] == {0: 1, 1: 3, 2: 5} and not old["no_split"]
    none = p3_split(make_ctx(model, tmp_path, p3=None))
    assert none["no_split"] and "not part" in none["split_source"]
    assert group_sets(make_ctx(model, tmp_path, p3=None), none) == {"all": (0, 1, 2)}
    # no split: P3's top-level lists (its primary criterion) give the sets, flagged
    p3 = copy.deepcopy(P3)
    p3.update(split={"stable_layers": [], "fast_layers": [], "no_split": True}, stable_layers=[0, 1],
              fast_layers=[2], split_basis="map criterion (no_split)")
    flagged = p3_split(make_ctx(model, tmp_path, p3=p3))
    assert flagged["no_split"] and flagged["stable_layers"] == [0, 1] and "map criterion" in flagged["split_source"]


# ---------------------------------------------------------------------------------------------- P4
@pytest.fixture(scope="module")
def p4_run(model, tmp_path_factory):
    ctx = make_ctx(model, tmp_path_factory.mktemp("p4"))
    return ctx, p4.run(ctx)


def test_p4_rows_controls_and_claims(p4_run):
    ctx, df = p4_run
    # k0 in {1, 4} (99 is past the end) x 6 layer sets x {output, map}, plus 2 controls, per clip
    assert len(df) == 2 * 6 * 2 + 2
    controls = df[df["control"]]
    for column in ("end_mrstft_to_clean", "end_latent_change", "si_sdr_drop_db"):
        assert (controls[column] == 0).all(), column  # identities: bitwise the clean output
    real = df[~df["control"]]
    assert (real[real["k0"] == 1]["end_latent_change"] > 0).all()
    assert set(real["what"]) == {"output", "map"}
    # freezing a layer set from k0 answers |F| (E - k0) of the L E self-attention calls from the cache
    row = real[(real["layer_set"] == "all") & (real["k0"] == 4)].iloc[0]
    assert row["frozen_fraction"] == pytest.approx(2 / 6)
    summary = p4.summarize(df, ctx)
    assert summary["identity_control_max_abs_damage"] == 0
    assert summary["layer_sets"]["stable"] == [1] and not summary["no_split"]
    # cost: 12 rows branch at evaluation 0 (k0 = 1, 6 evaluations), 12 at 3 (k0 = 4), controls at the last
    assert summary["grid"]["run"]["evaluations_per_clip"] == 12 * 6 + 12 * 3 + 2
    ids = [(c["id"], c["subset"]) for c in summary["claims"]]
    assert ids == [(i, s) for i in ("P4.output.mrstft", "P4.output.sisdr", "P4.map.mrstft", "P4.map.sisdr")
                   for s in ("all clips", "separated")]
    first = summary["claims"][0]
    expected = (real[(real["what"] == "output") & (real["layer_set"] == "fast")]["end_mrstft_to_clean"].mean()
                - real[(real["what"] == "output") & (real["layer_set"] == "stable")]["end_mrstft_to_clean"].mean())
    assert first["values"] == [pytest.approx(expected)] and first["direction"] == 1
    assert first["verdict_pre_holm"] == "not testable" and first["reason"].startswith("power")  # one clip


def test_p4_is_deterministic_and_resumes(model, p4_run, tmp_path):
    _, first = p4_run
    again = p4.run(make_ctx(model, tmp_path))
    key = ["clip_id", "probe_id"]
    a = first.drop(columns=VOLATILE, errors="ignore").sort_values(key).reset_index(drop=True)
    b = again.drop(columns=VOLATILE, errors="ignore").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    resumed = p4.run(make_ctx(model, tmp_path))  # everything stored: nothing recomputed or duplicated
    assert len(resumed) == len(again)


def test_p4_under_no_split_says_so(model, tmp_path):
    p3 = copy.deepcopy(P3)
    p3.update(split={"stable_layers": [], "fast_layers": [], "no_split": True}, stable_layers=[0, 1],
              fast_layers=[2], split_basis="map criterion (no_split)")
    config = ProtocolConfig(num_clips=1, steps=STEPS, freeze_starts=(4,), reuse_kinds=("output",))
    ctx = make_ctx(model, tmp_path, p3=p3, config=config)
    summary = p4.summarize(p4.run(ctx), ctx)
    assert summary["no_split"] and "no split" in summary["split_note"] and "map criterion" in summary["split_note"]
    assert summary["layer_sets"] == {"stable": [0, 1], "fast": [2]}
    claims = [c for c in summary["claims"] if c["subset"] == "all clips"]
    assert [c["id"] for c in claims] == ["P4.output.mrstft", "P4.output.sisdr"]
    assert all("no split" in c["claim"] for c in claims)


# ---------------------------------------------------------------------------------------------- P5
def test_segment_affinity_and_flat_settling_by_construction():
    active = torch.tensor([False, True, True, False])
    T = 4
    uniform = torch.full((2, T, T), 1 / T)
    assert p5.segment_affinity(uniform, active) == pytest.approx(0.0, abs=1e-12)
    # attention that stays inside the query's own part: mass 1 there, uniform would put |part| / T = 0.5
    blocks = torch.zeros(1, T, T)
    for i in range(T):
        same = (active == active[i]).float()
        blocks[0, i] = same / same.sum()
    assert p5.segment_affinity(blocks, active) == pytest.approx(0.5)
    assert math.isnan(p5.segment_affinity(uniform, torch.ones(T, dtype=torch.bool)))
    # flat curves: no settle index from noise-level wiggles; a real change still settles
    assert math.isnan(p5.settle_index([0.5, 0.5001, 0.4999, 0.5], min_range=0.005))
    assert p5.settle_index([5, 1, 0.5, 0.52, 0.5], min_range=0.005) == 2


def test_p5_reads_one_trajectory_and_reports_claims(model, tmp_path):
    ctx = make_ctx(model, tmp_path)
    calls = []
    trajectory = ctx.engine.trajectory
    ctx.engine.trajectory = lambda *a, **k: calls.append(k) or trajectory(*a, **k)
    df = p5.run(ctx)
    assert len(calls) == 1 and calls[0]["reductions"]  # one clean run per clip, maps reduced on the fly
    layers = df[df["layer"] >= 0]
    assert len(layers) == 3 * 2 * STEPS and layers["segment_affinity"].notna().all()
    summary = p5.summarize(df, ctx)
    ids = [c["id"] for c in summary["claims"] if c["subset"] == "all clips"]
    assert ids == ["P5.segmentation_over_evaluations", "P5.segmentation_with_depth"]
    values = layers.groupby("evaluation")["segment_affinity"].mean()
    assert summary["claims"][0]["values"] == [pytest.approx(values.iloc[0] - values.iloc[-1])]  # quarter = 1
    # the same trajectory serves P4 / P6: nothing recomputed
    assert ctx.clean_trajectory(ctx.clips[0]) is ctx.clean_runs[ctx.clips[0].clip.clip_id] and len(calls) == 1


# ---------------------------------------------------------------------------------------------- P6
@pytest.fixture(scope="module")
def p6_run(model, tmp_path_factory):
    ctx = make_ctx(model, tmp_path_factory.mktemp("p6"))
    return ctx, p6.run(ctx)


def test_p6_rows_counts_and_frontier(p6_run, model):
    ctx, df = p6_run
    assert list(p6.lsac_sets(p3_split(ctx), ("split", "criteria"))) == ["stable", "map:stable", "output:stable"]
    assert list(p6.lsac_sets(p3_split(ctx), ("split",))) == ["stable"]
    lsac = df[df["variant"] == "lsac"]
    assert len(lsac) == 2 * 2 * 2  # kinds x starts x N for the agreed stable set
    summary_grid = p6.summarize(df, ctx)["grid"]["run"]
    assert summary_grid["evaluations_per_clip"] == 6 + (2 + 4 + 3) + int((6 - lsac["branch_evaluation"]).sum())
    assert set(df["variant"]) == {"full", "noise_floor", "naive", "lsac"}
    assert set(df[df["variant"] == "naive"]["probe_id"]) == {"naive-midpoint-1", "naive-midpoint-2", "naive-euler-3"}
    # counted calls agree with the engine's own count of skipped attention calls
    assert (lsac["reused_calls"] == lsac["engine_skipped_calls"]).all()
    row = lsac[(lsac["layer_set"] == "stable") & (lsac["start"] == "0") & (lsac["refresh"] == 2)
               & (lsac["what"] == "output")].iloc[0]
    assert row["reused_calls"] == 3 and row["calls_fraction"] == pytest.approx(1 - 3 / 18)
    clean = ctx.clean_trajectory(ctx.clips[0])
    T, tokens = clean.states[0].shape[1], clean.inputs.text.shape[1]
    flops = model.config.flops_per_evaluation(T, tokens)
    saved = 3 * 4 * T * T * model.config.dim  # 3 reused calls, q.k and p.v skipped (2 FLOPs per MAC)
    assert row["flops_fraction"] == pytest.approx(1 - saved / (6 * flops), rel=1e-9)
    assert (lsac["mrstft_to_full"] > 0).all()
    full = df[df["variant"] == "full"].iloc[0]
    assert full["mrstft_to_full"] == 0 and full["degradation_db"] == 0
    summary = p6.summarize(df, ctx)
    assert summary["all_counts_match_engine"]
    assert summary["noise_floor"]["mrstft"] > 0
    assert {c["id"] for c in summary["claims"]} == {"P6.lsac_vs_naive.flops.sisdr", "P6.lsac_vs_naive.calls.sisdr",
                                                     "P6.lsac_vs_naive.flops.mrstft"}
    everything = [c for c in summary["claims"] if c["subset"] == "all clips"]
    assert all(len(c["values"]) == 1 for c in everything)
    mrstft = next(c for c in everything if c["id"].endswith("mrstft"))
    assert mrstft["floor"] == pytest.approx(summary["noise_floor"]["mrstft"])
    for entry in summary["lsac"].values():
        assert entry["retention_si_sdr"]["verdict"] in ("indistinguishable", "lsac_better", "naive_better")


def test_p6_is_deterministic_and_resumes(model, p6_run, tmp_path):
    _, first = p6_run
    again = p6.run(make_ctx(model, tmp_path))
    key = ["clip_id", "probe_id"]
    a = first.drop(columns=VOLATILE, errors="ignore").sort_values(key).reset_index(drop=True)
    b = again.drop(columns=VOLATILE, errors="ignore").sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert len(p6.run(make_ctx(model, tmp_path))) == len(again)


def test_p6_verdicts_and_frontier_definitions():
    assert p6._verdict(0.01, 0.02, floor=0.05) == {"verdict": "indistinguishable"}  # never a ratio below the floor
    assert p6._verdict(0.01, 0.5, floor=0.05) == {"verdict": "lsac_better"}
    assert p6._verdict(0.2, 0.5, floor=0.05) == {"verdict": "lsac_better", "ratio_naive_over_lsac": 2.5}
    assert p6._verdict(0.5, 0.2, floor=0.05)["verdict"] == "naive_better"
    df = pd.DataFrame([
        {"clip_id": "c", "variant": "full", "method": "midpoint", "flops_fraction": 1.0, "si_sdr_db": 10.0},
        {"clip_id": "c", "variant": "naive", "method": "midpoint", "flops_fraction": 0.5, "si_sdr_db": 6.0},
        {"clip_id": "c", "variant": "naive", "method": "euler", "flops_fraction": 0.5, "si_sdr_db": 2.0}])
    assert p6.frontier(df, "c", "flops_fraction", "si_sdr_db", "midpoint", "midpoint")(0.75) == pytest.approx(8.0)
    assert p6.frontier(df, "c", "flops_fraction", "si_sdr_db", "euler", "midpoint") is None  # one point only
    assert p6.saved_flops_per_call("output", 10, 4) == 2 * p6.saved_flops_per_call("map", 10, 4)
    assert not np.isnan(p6.saved_flops_per_call("map", 10, 4))


def test_naive_runs_keep_only_step_reductions(model, tmp_path):
    config = ProtocolConfig(num_clips=1, steps=STEPS, naive_midpoint_steps=(2, 3, 12), naive_euler_steps=(3, 6, 7))
    ctx = make_ctx(model, tmp_path, config=config)
    assert p6.naive_runs(ctx) == [("midpoint", 2), ("euler", 3)]  # fewer than the full run's 6 evaluations


def test_end_metrics_are_picklable_for_worker_processes():
    import pickle

    for fn in (p4.end_metrics, p6.quality_end_metrics):
        assert pickle.loads(pickle.dumps(fn)) is fn
