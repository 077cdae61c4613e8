"""P4 causal freezing and P6 LSAC on a very small configuration: shapes, identities, determinism, resume."""

import copy

import pandas as pd
import pytest
import torch

from latentflow_fast.models.tiny import DEFAULT_TINY_CONFIG, build_tiny_model
from latentflow_fast.probe import ProbeEngine
from latentflow_fast.protocol import p4_freezing as p4
from latentflow_fast.protocol import p6_lsac as p6
from latentflow_fast.protocol.base import ProtocolConfig, ProtocolContext
from latentflow_fast.protocol.clips import default_clips

STEPS = 3  # 6 evaluations
CONFIG = ProtocolConfig(num_clips=1, steps=STEPS, freeze_starts=(1, 4, 99), lsac_refresh=(2, 4),
                        experiments=("p4", "p6"))
SPLIT = {"stable_layers": [1, 2], "fast_layers": [0]}
VOLATILE = ["wall_seconds", "full_wall_seconds"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = copy.deepcopy(DEFAULT_TINY_CONFIG)
    cfg["model"] = dict(dim=32, n_heads=2, n_layers=3)
    return build_tiny_model(cfg).eval()


def make_ctx(model, out_dir):
    clips = default_clips(CONFIG, model, seconds=0.125)
    ctx = ProtocolContext(CONFIG, model, ProbeEngine(model), clips, out_dir, progress=False)
    ctx.summaries = {"p3": dict(SPLIT)}
    return ctx


@pytest.fixture(scope="module")
def p4_run(model, tmp_path_factory):
    ctx = make_ctx(model, tmp_path_factory.mktemp("p4"))
    return ctx, p4.run(ctx)


def test_p4_rows_and_identity_controls(p4_run):
    ctx, df = p4_run
    # k0 in {1, 4} (99 is past the end) x {L0, L1, L2, stable, fast, all}, plus 2 controls, per clip
    assert len(df) == 2 * 6 + 2
    assert set(df["k0"]) == {1, 4, 6}
    controls = df[df["control"]]
    assert set(controls["layer_set"]) == {"all", "none"}
    # freezing from k0 = E (beyond the last evaluation) and branching with nothing frozen: exactly zero damage
    for column in ("mrstft_to_clean", "logmel_to_clean", "latent_change", "si_sdr_drop_db"):
        assert (controls[column] == 0).all(), column
    real = df[~df["control"]]
    assert (real[real["k0"] == 1]["latent_change"] > 0).all()
    assert real["frozen_fraction"].between(0, 1).all()
    summary = p4.summarize(df, ctx)
    assert summary["identity_control_max_abs_damage"] == 0
    assert summary["split_source"] == "p3" and summary["stable_layers"] == [1, 2]
    assert set(summary["damage"]) == {"L0", "L1", "L2", "stable", "fast", "all"}
    assert "stable_vs_fast" in summary


def test_p4_branch_equals_clean_run(model, p4_run):
    ctx, _ = p4_run
    pclip = ctx.clips[0]
    clean = p4.clean_run(ctx, pclip)
    inputs = p4._inputs(ctx, pclip)
    for rows in ([(2, ()), (3, ())], [(2 * STEPS, (0, 1, 2))]):  # rows of one batch branch in the same step
        finals = p4.run_branch(model, inputs, clean, rows, STEPS, "midpoint")
        for r in range(finals.shape[0]):
            assert torch.equal(finals[r], clean["final"][0])


def test_p4_is_deterministic_and_resumes(model, p4_run, tmp_path):
    _, df = p4_run
    ctx = make_ctx(model, tmp_path)
    again = p4.run(ctx)
    pd.testing.assert_frame_equal(df, again)
    shards = sorted((tmp_path / "results" / "p4").glob("part-*.parquet"))
    resumed = p4.run(make_ctx(model, tmp_path))  # everything stored: nothing recomputed or duplicated
    pd.testing.assert_frame_equal(again, resumed)
    assert sorted((tmp_path / "results" / "p4").glob("part-*.parquet")) == shards


def test_p6_counts_quality_and_determinism(model, tmp_path):
    ctx = make_ctx(model, tmp_path / "a")
    df = p6.run(ctx)
    variants = df.groupby("variant")["steps"].apply(lambda s: sorted(set(s))).to_dict()
    assert variants["full"] == [STEPS]
    assert set(df[df["variant"] == "lsac"]["refresh"]) == {2, 4}
    assert (df["self_attention_calls"] == df["expected_calls"]).all()
    full = df[df["variant"] == "full"]
    assert (full["mrstft_to_full"] == 0).all() and (full["degradation_db"] == 0).all()
    lsac = df[df["variant"] == "lsac"]
    assert (lsac["mrstft_to_full"] > 0).all()
    summary = p6.summarize(df, ctx)
    assert summary["all_counts_match_formula"]
    entry = summary["lsac"]["lsac_N2"]
    # 2 of 3 layers cached, refresh 2 over 6 evaluations: 2 * 3 / 18 calls saved
    assert entry["counted_saved_fraction"] == pytest.approx(1 / 3)
    assert entry["matched_naive_steps"] == p6.matched_steps(entry["self_attention_calls"], 3, STEPS, 2)
    assert entry["retention_ratio"] > 0 and entry["retention_ratio_mrstft"] > 0
    again = p6.run(make_ctx(model, tmp_path / "b"))
    pd.testing.assert_frame_equal(df.drop(columns=VOLATILE), again.drop(columns=VOLATILE))


def test_matched_steps_rule():
    # 4 layers, midpoint: s steps = 8 s calls. 96 calls -> 12 steps; 98 -> 12 (gap 2); 100 -> tie 12/13 -> 13
    assert p6.matched_steps(96, 4, 16, 2) == 12
    assert p6.matched_steps(98, 4, 16, 2) == 12
    assert p6.matched_steps(100, 4, 16, 2) == 13
    assert p6.matched_steps(1, 4, 16, 2) == 1
